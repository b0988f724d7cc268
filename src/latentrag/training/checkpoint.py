"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``ROOT/ckpt-<step>/`` holding

- ``<stem>.safetensors`` for each group of tensors (the trainer writes ``model`` and
  ``optimizer``),
- ``state.json`` for everything else (step, data position, RNG states, estimator state...),
- ``manifest.json`` with the sha256 of every other file.

It is written to ``ckpt-<step>.tmp/``, every file and the directory are fsynced, and only
then is it renamed to ``ckpt-<step>/``; a ``latest`` file (itself replaced atomically) names
the newest one, for people and tools. A crash or a full disk therefore never damages an
existing checkpoint. Loading verifies the checksums and never unpickles; `load_latest`
skips a damaged checkpoint, warns, and falls back to the newest one that verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from latentrag.core.errors import LatentragError
from latentrag.io.atomic import atomic_write_bytes, fsync_dir
from latentrag.training.run_folder import CHECKPOINT_PREFIX as PREFIX
from latentrag.training.run_folder import LATEST_FILE as LATEST

KEEP_LAST = 2
MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = 1
_FINISHED = re.compile(rf"^{PREFIX}(\d+)$")
_LEFTOVER = re.compile(rf"^{PREFIX}\d+\.(tmp|old)$")


class CheckpointError(LatentragError):
    """A checkpoint could not be written, or is missing, incomplete or corrupted."""


@dataclass
class Checkpoint:
    """What a checkpoint holds: named groups of tensors and a JSON-serialisable state."""

    step: int
    tensors: dict[str, dict[str, Tensor]]
    state: dict[str, Any]
    path: Path | None = None
    #: damaged newer checkpoints skipped to find this one (filled by `load_latest`)
    notes: list[str] = field(default_factory=list)


# -- paths ------------------------------------------------------------------------------


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories under root as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _FINISHED.match(p.name))]
    return sorted(found)


# -- writing ----------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> str:
    """Write and fsync one file; return its sha256."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def _storable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; safetensors refuses tensors sharing storage (tied
    weights), so every tensor after the first on a storage is copied."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return json.dumps(obj, allow_nan=False, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store {what} as JSON: {exc}") from None


def _install(tmp: Path, final: Path) -> None:
    """Rename tmp to final; a directory cannot replace a non-empty one, so an existing
    final (a damaged checkpoint of the same step being rewritten) is moved aside first."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _prune(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: str | Path, checkpoint: Checkpoint, keep_last: int = KEEP_LAST) -> Path:
    """Write `checkpoint` atomically under root, point `latest` at it, keep the last N."""
    root = Path(root)
    final = checkpoint_path(root, checkpoint.step)
    tmp = final.with_name(final.name + ".tmp")
    state = _json_bytes(checkpoint.state, f"the state of checkpoint {final}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
        digests = {}
        for stem, tensors in checkpoint.tensors.items():
            data = safetensors.torch.save(_storable(tensors))
            digests[f"{stem}.safetensors"] = _write_file(tmp / f"{stem}.safetensors", data)
        digests[STATE] = _write_file(tmp / STATE, state)
        manifest = {"format": FORMAT, "step": checkpoint.step, "files": digests}
        _write_file(tmp / MANIFEST, _json_bytes(manifest, "the manifest"))
        fsync_dir(tmp)
        _install(tmp, final)
        fsync_dir(root)
        atomic_write_bytes(root / LATEST, f"{final.name}\n".encode())
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror or str(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {reason}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, max(keep_last, 1))
    return final


# -- reading ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _read_manifest(path: Path) -> dict[str, str]:
    manifest = _read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE not in files:
        raise CheckpointError(f"{path / MANIFEST}: no file list with {STATE}")
    return files


def _verify(path: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"{file}: sha256 mismatch (truncated or corrupted)")


def _load_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(file)
    except Exception as exc:  # SafetensorError and friends: a bad header or body
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: unreadable safetensors ({reason})") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify one checkpoint directory; CheckpointError if anything is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    files = _read_manifest(path)
    _verify(path, files)
    state = _read_json(path / STATE)
    tensors = {
        name.removesuffix(".safetensors"): _load_tensors(path / name)
        for name in files
        if name.endswith(".safetensors")
    }
    match = _FINISHED.match(path.name)
    step = int(match.group(1)) if match else int(state.get("step", 0))
    return Checkpoint(step, tensors, state, path)


def load_latest(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint under root that verifies, or None when there is none.

    Damaged newer ones are skipped with a warning (also listed in `Checkpoint.notes`);
    if every checkpoint is damaged, raise CheckpointError rather than start over silently.
    """
    notes: list[str] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as exc:
            notes.append(f"skipped damaged checkpoint: {exc}")
            warnings.warn(notes[-1], stacklevel=2)
            continue
        checkpoint.notes = notes
        return checkpoint
    if notes:
        raise CheckpointError(f"no usable checkpoint in {root}; {notes[0]}")
    return None


# -- optimizer state --------------------------------------------------------------------


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state_dict into tensors named ``optim.state.<param>.<name>`` and
    a JSON-serialisable rest (param groups, non-tensor per-parameter values)."""
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.state.{index}.{name}"] = value
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    """The inverse of `flatten_optimizer`: a state_dict for `Optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in tensors.items():
        _, _, index, name = key.split(".", 3)
        state[int(index)][name] = value
    for index, values in meta.get("state", {}).items():
        state[int(index)].update(values)
    return {"state": dict(state), "param_groups": meta["param_groups"]}


# -- random number generators -----------------------------------------------------------


def _b64(tensor: Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch RNG states, JSON-serialisable."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNGs to a state from `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])
