"""docs/cli.md is what scripts/make_cli_docs.py generates from the click commands: a changed
command, option or help text comes with its regenerated page."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_cli_docs  # noqa: E402

from latentrag.cli import main  # noqa: E402


def test_docs_cli_md_is_up_to_date():
    committed = (ROOT / "docs" / "cli.md").read_text("utf-8")
    assert committed == make_cli_docs.render(), (
        "docs/cli.md is out of date: run `python scripts/make_cli_docs.py` and commit it"
    )


def test_every_command_has_a_section_with_its_options():
    text = make_cli_docs.render()
    paths = [ctx.command_path for ctx in make_cli_docs.contexts(main, "latentrag")]
    assert {"latentrag config show", "latentrag sweep", "latentrag index build"} <= set(paths)
    for path in paths:
        assert f"## `{path}`\n\n```text\nUsage: {path} " in text, path
    assert text.count("-h, --help") == len(paths)
    for command in ("components", "plugins", "config show", "evaluate", "sweep", "report"):
        section = text.split(f"## `latentrag {command}`\n")[1].split("\n## ")[0]
        assert re.search(r"\n  --json +Print one JSON document on stdout", section), command
