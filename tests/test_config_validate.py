"""`latentrag config validate` checks estimator.k against the size of the config's corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from latentrag.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"

TOY = """\
[data]
source = "toy"
[retriever]
name = "bm25"
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
k = 30
"""


def validate(path: Path, *sets: str):
    args = ["config", "validate", str(path)]
    for text in sets:
        args += ["--set", text]
    return CliRunner().invoke(main, args)


@pytest.fixture
def toy_config(tmp_path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(TOY)
    return path


def test_k_larger_than_the_toy_corpus_is_one_line(toy_config):
    result = validate(toy_config)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {toy_config}: estimator.k: 30 is larger than the corpus (12 passages)\n"
    )


@pytest.mark.parametrize(
    "sets",
    [
        ["estimator.k=12"],  # exactly the corpus
        ['estimator.candidates="corpus"'],  # k is not used: the whole corpus is the set
    ],
)
def test_k_the_corpus_can_serve_passes(toy_config, sets):
    result = validate(toy_config, *sets)
    assert result.exit_code == 0, result.stderr
    assert (
        result.stdout
        == f"{toy_config}: ok (retriever=bm25, generator=hf-causal-lm, estimator=topk)\n"
    )


def test_the_shipped_squad_slice_has_300_passages():
    demo = EXAMPLES / "demo.toml"
    assert validate(demo, "estimator.k=300").exit_code == 0
    result = validate(demo, "estimator.k=301")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {demo}: estimator.k: 301 is larger than the corpus (300 passages)\n"
    )


def test_a_jsonl_corpus_is_counted_relative_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    lines = [f'{{"id": "p{i}", "text": "passage {i}"}}' for i in range(3)]
    (tmp_path / "data" / "passages.jsonl").write_text("\n".join(lines) + "\n\n")
    path = tmp_path / "jsonl.toml"
    path.write_text(
        TOY.replace('source = "toy"', 'source = "jsonl"\ncorpus = "data/passages.jsonl"')
    )
    result = validate(path, "estimator.k=4")
    assert result.exit_code == 2
    assert result.stderr.endswith("estimator.k: 4 is larger than the corpus (3 passages)\n")
    assert validate(path, "estimator.k=3").exit_code == 0


def test_an_estimator_with_its_own_k_is_checked_too(toy_config):
    result = validate(toy_config, 'estimator.name="jsa"', 'posterior.name="bm25"')
    assert result.exit_code == 2
    assert "estimator.k: 30 is larger than the corpus (12 passages)" in result.stderr


def test_the_check_imports_no_torch(toy_config):
    code = (
        "import sys; from click.testing import CliRunner; from latentrag.cli import main;"
        f"r = CliRunner().invoke(main, ['config', 'validate', {str(toy_config)!r}]);"
        "assert r.exit_code == 2, r.output;"
        f"r = CliRunner().invoke(main, ['config', 'validate', {str(EXAMPLES / 'demo.toml')!r}]);"
        "assert r.exit_code == 0, r.output;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
