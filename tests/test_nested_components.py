"""Components that contain components: a third-party fusion retriever (tests/plugin_packages/
latentrag_fusion.py) wrapping two retrievers that only a test's registry knows."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from conftest import install_plugin

from latentrag import hookimpl
from latentrag.core.config import StrictModel, resolve
from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Retriever
from latentrag.core.registry import Registry
from latentrag.core.types import Candidates
from latentrag.testing.checks import check_config_round_trip, check_retriever
from latentrag.toy.corpus import toy_corpus, toy_examples


class TrigramConfig(StrictModel):
    lowercase: bool = True


class TrigramRetriever(Retriever):
    """Character-trigram overlap, normalised by the passage's trigram count."""

    def __init__(self, config: TrigramConfig) -> None:
        self.config = config
        self.docs: list[set[str]] = []

    def grams(self, text: str) -> set[str]:
        text = text.lower() if self.config.lowercase else text
        return {text[i : i + 3] for i in range(len(text) - 2)}

    def index(self, corpus) -> None:
        self.docs = [self.grams(p.text) for p in corpus]

    def retrieve(self, queries, k):
        scores = torch.tensor(
            [[len(self.grams(q) & d) / len(d) ** 0.5 for d in self.docs] for q in queries]
        )
        top = torch.topk(scores, k, dim=1, sorted=True)
        return Candidates(top.indices, top.values)


class TrigramPlugin:
    @hookimpl
    def register_components(self, register):
        register("retriever", "trigram", TrigramRetriever, TrigramConfig, "trigram overlap")


FUSION = {
    "name": "fusion",
    "first": {"name": "keyword", "min_length": 4},
    "second": {"name": "trigram"},
}


@pytest.fixture
def test_registry(plugin_site) -> Registry:
    """No builtins, no entry points: the keyword, trigram and fusion plugins only."""
    install_plugin(plugin_site, "latentrag_keyword", "keyword")
    install_plugin(plugin_site, "latentrag_fusion", "fusion")
    registry = Registry().load(builtins=False, entry_points=False)
    registry.register(importlib.import_module("latentrag_keyword"), "keyword")
    registry.register(importlib.import_module("latentrag_fusion"), "fusion")
    registry.register(TrigramPlugin(), "trigram")
    return registry


def build(registry: Registry, section: dict):
    resolved = resolve({"retriever": section}, "cfg.toml", registry=registry)
    spec, settings = resolved.component("retriever")
    return spec.build(settings, resolved.build_context())


def test_fusion_wraps_two_retrievers_of_a_test_registry(test_registry):
    fusion = build(test_registry, FUSION)
    first, second = fusion.inner
    assert type(first).__name__ == "KeywordRetriever" and first.config.min_length == 4
    assert isinstance(second, TrigramRetriever)

    corpus, examples = toy_corpus(), toy_examples()
    fusion.index(corpus)
    found = fusion.retrieve([e.question for e in examples], 3)
    assert [corpus[row].id for row in found.indices[:, 0].tolist()] == [
        e.gold_ids[0] for e in examples
    ]
    # both inner retrievers rank the gold passage first: 1/(60+1) twice
    torch.testing.assert_close(found.scores[:, 0], torch.full((12,), 2 / 61))


def test_inner_names_are_looked_up_in_the_resolving_registry(test_registry):
    registry = Registry().load(entry_points=False)  # builtins, but no trigram
    registry.register(importlib.import_module("latentrag_fusion"), "fusion")
    with pytest.raises(ConfigError) as info:
        resolve({"retriever": FUSION}, "cfg.toml", registry=registry)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("cfg.toml: retriever.first.name: unknown retriever 'keyword'")
    assert lines[1].startswith("cfg.toml: retriever.second.name: unknown retriever 'trigram'")


def test_a_typo_inside_a_sub_section_names_its_full_path(test_registry):
    section = {**FUSION, "second": {"name": "trigram", "modle": "x"}}
    with pytest.raises(ConfigError) as info:
        resolve({"retriever": section}, "cfg.toml", registry=test_registry)
    assert str(info.value) == "cfg.toml: retriever.second.modle: unknown key"


def test_fusion_passes_the_retriever_checks(test_registry):
    resolved = resolve({"retriever": FUSION}, registry=test_registry)
    check_config_round_trip(resolved.component("retriever")[1])
    check_retriever(lambda: build(test_registry, FUSION))


def test_config_validate_prints_the_full_path_in_one_line(plugin_site, tmp_path):
    install_plugin(plugin_site, "latentrag_fusion", "fusion")
    config = tmp_path / "fusion.toml"
    config.write_text(
        '[retriever]\nname = "fusion"\n[retriever.first]\nname = "bm25"\n'
        '[retriever.second]\nname = "dpr"\nmodle = "minilm"\n'
    )
    command = [sys.executable, "-m", "latentrag.cli", "config", "validate", str(config)]
    bad = subprocess.run(command, capture_output=True, text=True)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == f"error: {config}: retriever.second.modle: unknown key\n"

    config.write_text(config.read_text().replace("modle", "model"))
    good = subprocess.run(command, capture_output=True, text=True)
    assert (good.returncode, good.stderr) == (0, ""), good.stderr
    assert good.stdout == f"{config}: ok (retriever=fusion)\n"
