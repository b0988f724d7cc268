"""TOML output for resolved configs (`config show`, a run folder's `config.toml`): tomli-w,
with the scalars of a table before its sub-tables and no leading blank line."""

from __future__ import annotations

from typing import Any

import tomli_w


def dumps(data: dict[str, Any]) -> str:
    """`data` as TOML text; TypeError naming the value when TOML cannot hold it (None...)."""
    return tomli_w.dumps(data).lstrip("\n")
