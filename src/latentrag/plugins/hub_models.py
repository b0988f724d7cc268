"""Model settings that name a Hugging Face id ("org/name"), found in the local HF cache.

Torch-free (config validation imports it): a model setting is a packaged name, a local
folder, or an id whose snapshot is already in the cache ($HF_HUB_CACHE, else $HF_HOME/hub,
else ~/.cache/huggingface/hub, read when called so that tests may point it elsewhere).
Nothing is downloaded: run with HF_HUB_OFFLINE=1, or fetch the model first with
`huggingface-cli download ID`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder as the environment sets it now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()
    return Path(home) / "hub"


def cached_snapshot(model_id: str) -> Path | None:
    """The cached snapshot folder of a hub id (its config.json's folder), or None."""
    if not _HUB_ID.fullmatch(model_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json", cache_dir=hub_cache_dir())
    return Path(found).parent if isinstance(found, str) else None


def local_model_dir(model: str) -> Path | None:
    """The folder a model setting stands for: a local folder, else a cached hub id's
    snapshot; None when it is neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    return cached_snapshot(model)


def check_model_setting(model: str, packaged: Sequence[str]) -> str:
    """A config validator: `model` is packaged, a local folder or a cached hub id; else
    a one-line ValueError naming it."""
    if model in packaged or local_model_dir(model) is not None:
        return model
    names = ", ".join(repr(name) for name in packaged)
    if _HUB_ID.fullmatch(model):
        raise ValueError(
            f"model {model!r} is not in the Hugging Face cache ({hub_cache_dir()}); "
            f"download it first (huggingface-cli download {model})"
        )
    raise ValueError(f"{model!r} is neither one of {names}, a local folder nor a Hugging Face id")
