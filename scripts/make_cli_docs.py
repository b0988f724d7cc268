"""Write docs/cli.md, the command-line reference, from the click commands themselves.

    python scripts/make_cli_docs.py          # rewrite docs/cli.md
    python scripts/make_cli_docs.py --check  # exit 1 when docs/cli.md is out of date

tests/test_cli_docs.py fails when the committed page differs from what this prints, so a
changed command, option or help text comes with its regenerated page.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from latentrag.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100  # fixed, so the page does not depend on the terminal that wrote it

HEADER = """\
# Command-line reference

Generated from the commands by `python scripts/make_cli_docs.py` (do not edit by hand;
`tests/test_cli_docs.py` checks that this page is up to date).

- `-h` and `--help` show a command's help.
- `--json` (on `components`, `plugins`, `config show`, `evaluate`, `gradcheck`, `sweep`,
  `report`) prints exactly one JSON document on stdout; progress bars, warnings and errors go
  to stderr.
- Exit status: `0` ok; `1` a runtime failure (a non-finite loss or another training error, a
  sweep cell or demo run that failed); `2` bad input (a config, data file or option: one line
  on stderr naming the file and key).
- Shell completion (bash; use `zsh_source` or `fish_source` for zsh and fish):

  ```bash
  eval "$(_LATENTRAG_COMPLETE=bash_source latentrag)"
  ```
"""


def contexts(
    command: click.Command, name: str, parent: click.Context | None = None
) -> Iterator[click.Context]:
    """A context for `command` and each of its subcommands, depth first, names sorted."""
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    yield ctx
    if isinstance(command, click.Group):
        for sub_name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                yield from contexts(sub, sub_name, ctx)


def render() -> str:
    """The whole page: the header, then one section per command with its help text."""
    sections = [HEADER]
    for ctx in contexts(main, "latentrag"):
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{ctx.get_help()}\n```\n")
    return "\n".join(sections)


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with docs/cli.md")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text("utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is out of date: run python scripts/make_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, "utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
