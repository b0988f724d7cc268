"""The documentation's code runs: every python block of docs/plugins.md, in order, and every
pipeline config in it resolves with the guide's plugins (the estimator's trains two steps)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from latentrag.core.config import resolve
from latentrag.core.registry import Registry

DOCS = Path(__file__).parents[1] / "docs"
GUIDE = (DOCS / "plugins.md").read_text()


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def guide() -> dict:
    """The namespace the guide's python blocks leave behind, run in order."""
    namespace: dict = {"__name__": "plugin_guide"}
    for block in blocks(GUIDE, "python"):
        # dont_inherit: the blocks run as a reader runs them, without this file's __future__
        exec(compile(block, "docs/plugins.md", "exec", dont_inherit=True), namespace)
    return namespace


def test_plugin_guide_code_runs(guide):
    assert len(blocks(GUIDE, "python")) >= 9
    assert guide["retriever"].config.min_length == 4
    assert type(guide["fusion"]).__name__ == "FusionRetriever"


def test_the_guide_estimator_declares_what_it_trains(guide):
    estimator = guide["StochasticEM"](guide["StochasticEMConfig"]())
    assert estimator.trained_roles() == ("retriever", "generator")
    assert (estimator.objective().temperature, estimator.objective().reduce) == (0.1, "sum")


def test_plugin_guide_toml_parses():
    for block in blocks(GUIDE, "toml"):
        data = tomllib.loads(block)
        if "project" in data:
            assert data["project"]["entry-points"]["latentrag"]


def pipeline_configs() -> list[dict]:
    configs = [tomllib.loads(block) for block in blocks(GUIDE, "toml")]
    return [data for data in configs if "project" not in data]


def test_plugin_guide_configs_resolve_and_train(guide, tmp_path, one_thread):
    from latentrag.experiments.runs import train_run

    registry = Registry().load(entry_points=False)
    for name in ("plugin", "em_plugin", "fusion_plugin"):
        registry.register(guide[name], name)
    configs = pipeline_configs()
    assert len(configs) == 2
    for data in configs:
        resolve(data, "docs/plugins.md", registry=registry)
    [trained] = [data for data in configs if "train" in data]
    # evaluate on two questions with short answers: training is what is tested here
    trained = {**trained, "data": {**trained["data"], "max_eval": 2}}
    trained["eval"] = {"max_new_tokens": 2, "recall_at": [1]}
    resolved = resolve(trained, "docs/plugins.md", registry=registry)
    assert resolved.component("estimator")[0].name == "stochastic-em"
    train_run(resolved, tmp_path / "guide.toml", tmp_path / "run")
    steps = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(0.0 < s["posterior_max"] <= 1.0 for s in steps)
