"""The API reference builds from the docstrings (scripts/make_api_docs.py, pdoc) with no
unresolved name or failed import, and the README's pointers lead somewhere."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_api_docs  # noqa: E402


@pytest.mark.slow
def test_the_api_reference_builds_without_a_problem(tmp_path):
    assert make_api_docs.build(tmp_path) == []
    page = (tmp_path / "latentrag" / "core" / "interfaces.html").read_text("utf-8")
    from latentrag.core.interfaces import Estimator

    assert 'id="Estimator"' in page
    assert Estimator.__doc__.strip().splitlines()[0] in page  # the docstring is the page
    for module in make_api_docs.MODULES:
        path = tmp_path.joinpath(*module.split(".")).with_suffix(".html")
        assert path.is_file(), module


def test_lazy_public_names_are_documented(tmp_path):
    """`latentrag.load_run` and latentrag.testing's checks are imported on first use."""
    assert make_api_docs.build(tmp_path, ("latentrag", "latentrag.testing")) == []
    assert 'id="load_run"' in (tmp_path / "latentrag.html").read_text("utf-8")
    testing = (tmp_path / "latentrag" / "testing.html").read_text("utf-8")
    assert 'id="check_estimator"' in testing


def test_a_name_that_does_not_resolve_is_reported(tmp_path, monkeypatch):
    package = tmp_path / "src" / "half_documented"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Docs."""\n__all__ = ["missing"]\n')
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    problems = make_api_docs.build(tmp_path / "out", ("half_documented",))
    assert len(problems) == 1 and "'missing'" in problems[0]


def test_readme_points_at_files_that_exist():
    readme = (ROOT / "README.md").read_text("utf-8")
    paths = set(
        re.findall(r"\b((?:examples|docs|scripts|benchmarks)/[\w./-]+\.(?:toml|md|py))", readme)
    )
    assert "examples/jsa.toml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_the_readme_tour_config_is_examples_jsa_toml():
    readme = (ROOT / "README.md").read_text("utf-8")
    block = re.search(r"```toml\n# latentrag train examples/jsa.toml[^\n]*\n(.*?)```", readme, re.S)
    assert block is not None
    shipped = tomllib.loads((ROOT / "examples" / "jsa.toml").read_text("utf-8"))
    assert tomllib.loads(block.group(1)) == shipped
