"""The documentation's code runs: every python block of docs/plugins.md, in order."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

DOCS = Path(__file__).parents[1] / "docs"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_plugin_guide_code_runs():
    text = (DOCS / "plugins.md").read_text()
    code = blocks(text, "python")
    assert len(code) >= 5
    namespace: dict = {"__name__": "plugin_guide"}
    for block in code:
        exec(compile(block, "docs/plugins.md", "exec"), namespace)
    assert namespace["retriever"].config.min_length == 4


def test_plugin_guide_toml_parses():
    text = (DOCS / "plugins.md").read_text()
    for block in blocks(text, "toml"):
        data = tomllib.loads(block)
        assert data["project"]["entry-points"]["latentrag"]
