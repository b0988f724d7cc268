"""Every hook has a docstring, a section in the plugin guide, and a test (as datasette does)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from latentrag.core import hookspecs

ROOT = Path(__file__).parents[1]
HOOKS = [
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "latentrag_spec")
]


def test_there_are_hooks():
    assert HOOKS == ["log_record", "register_components"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert inspect.getdoc(getattr(hookspecs, hook))
    assert f"`{hook}(" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    assert any(f"def {hook}(" in p.read_text() for p in tests)
