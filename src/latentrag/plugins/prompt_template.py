"""The check every prompt-template setting shares (pydantic validators call it; no torch)."""

from __future__ import annotations

import string


def check_prompt_template(value: str) -> str:
    """`value` unchanged when it is a format string using exactly {question} and {passage}."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a format string: {exc}") from None
    if fields != {"question", "passage"}:
        raise ValueError(f"must use exactly {{question}} and {{passage}}, found {fields}")
    return value
