"""Every config the repository ships is valid: each pipeline config under examples/ through
`latentrag config validate` (which also checks estimator.k against the corpus), the demo's
config for every estimator the demo sweeps, and each gradcheck config with every estimator
`latentrag gradcheck` compares by default."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import load_config, read_toml
from latentrag.experiments.sweep import expand_grid, resolve_cells

EXAMPLES = Path(__file__).parents[1] / "examples"
#: configs anywhere under examples/ (packaging files are not configs)
SHIPPED = sorted(p for p in EXAMPLES.rglob("*.toml") if p.name != "pyproject.toml")
#: a gradcheck config holds a tractable [benchmark] instead of a pipeline
PIPELINES = [p for p in SHIPPED if "benchmark" not in read_toml(p)]
GRADCHECKS = [p for p in SHIPPED if p.name.startswith("gradcheck")]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(EXAMPLES)) for p in paths]


def test_the_shipped_configs_are_found():
    names = {p.name for p in SHIPPED}
    assert {"demo.toml", "grerank.toml"} <= names
    assert {p.name for p in PIPELINES} >= {"demo.toml", "grerank.toml"}
    assert GRADCHECKS, "no examples/gradcheck*.toml"


@pytest.mark.parametrize("path", PIPELINES, ids=ids(PIPELINES))
def test_shipped_pipeline_config_validates(path):
    resolved = load_config(path)
    assert "retriever" in resolved.components
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (")


def test_the_demo_config_resolves_for_every_estimator_it_sweeps():
    from latentrag.experiments.demo import DEMO_CONFIG, DEMO_ESTIMATORS

    assert DEMO_CONFIG.read_bytes() == (EXAMPLES / "demo.toml").read_bytes()  # packaged copy
    cells = expand_grid([f"estimator.name={','.join(DEMO_ESTIMATORS)}"], 1)
    resolved = resolve_cells(DEMO_CONFIG, cells, [])
    assert [r.component("estimator")[0].name for r in resolved] == list(DEMO_ESTIMATORS)


@pytest.mark.parametrize("path", GRADCHECKS, ids=ids(GRADCHECKS))
def test_shipped_gradcheck_config_builds_every_compared_estimator(path):
    from latentrag.experiments.gradcheck import load_setup

    setup = load_setup(path)
    labels = setup.labels()
    built = setup.build_estimators(labels)
    assert list(built) == labels and labels
