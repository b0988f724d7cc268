"""Ablation sweeps: a grid of config values times seeds, one training run per cell.

A sweep folder holds `sweep.json` (what was swept: refusing to mix two sweeps) and one
folder per cell with `cell.json` (its grid values and seed, written when it starts) and
the run's own files. A cell whose `eval.json` exists is finished and skipped, so a killed
sweep is resumed by running the same command again; shards (`--shard I/N`) split the cells
round-robin and can share one folder or be copied into one afterwards.

Sweeping estimators whose settings differ (`--grid estimator.name=topk,jsa`): the
``[estimator]`` section holds what they share, and a sub-table named after an estimator
holds what only that one reads; it applies to the cells that run that estimator::

    [estimator]
    name = "topk"
    k = 4                  # every estimator
    [estimator.jsa]        # only the cells with estimator.name = "jsa"
    samples = 4
    chain = "fresh"

A cell's ``[estimator]`` is the shared keys, then its estimator's sub-table, then the
``--set`` and ``--grid`` values (``estimator.k=2`` for all, ``estimator.jsa.samples=8`` for
one). A shared key that the cell's estimator does not have but another swept estimator has
is dropped from that cell, with one warning line per cell naming the keys and the
estimator; a key that no swept estimator has stays an error naming it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentrag.core.config import (
    ResolvedConfig,
    apply_overrides,
    parse_override,
    read_toml,
    resolve,
)
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.registry import Registry, default_registry
from latentrag.io.atomic import atomic_write_bytes
from latentrag.training.run_folder import EVAL_FILE, METRICS_FILE

SWEEP_FILE = "sweep.json"
CELL_FILE = "cell.json"
ERROR_FILE = "error.txt"
SEED_KEY = "train.seed"
MAX_PART_LENGTH = 40
MAX_NAME_LENGTH = 180
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")

TrainFn = Callable[..., Any]  # train_fn(resolved, config_path, out_dir, resume=...)


@dataclass(frozen=True)
class GridAxis:
    """One `--grid key=v1,v2` option: the key, the values as typed, and as parsed."""

    key: str
    raw_values: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a value for every grid key, and a seed."""

    index: int
    assignment: dict[str, Any]  # key -> parsed value, in grid order
    raw: dict[str, str]  # key -> value as typed (what the overrides pass on)
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={text}" for key, text in self.raw.items()] + [f"{SEED_KEY}={self.seed}"]

    @property
    def name(self) -> str:
        return cell_name(self.raw, self.seed)


@dataclass
class CellResult:
    """What happened to one cell in this invocation: "done", "skipped" or "failed"."""

    name: str
    status: str
    error: str = ""
    seconds: float = 0.0


# -- grid ---------------------------------------------------------------------------------


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so `eval.recall_at=[1,5],[1,20]` works."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_grid_entry(entry: str) -> GridAxis:
    """`estimator.name=topk,jsa` -> GridAxis; values are parsed like `--set` values."""
    key, sep, rest = entry.partition("=")
    key = key.strip()
    raw_values = _split_values(rest) if sep else []
    if not sep or not key or not all(raw_values):
        raise ConfigError(f"--grid {entry!r}: expected KEY=V1,V2,..., e.g. estimator.name=topk,jsa")
    if len(set(raw_values)) != len(raw_values):
        raise ConfigError(f"--grid {entry!r}: a value is listed twice")
    if key == SEED_KEY:
        raise ConfigError(f"--grid {entry!r}: sweeps set {SEED_KEY} themselves; use --seeds N")
    values = tuple(parse_override(f"{key}={raw}")[1] for raw in raw_values)
    return GridAxis(key, tuple(raw_values), values)


def parse_grid(grid: Sequence[str]) -> list[GridAxis]:
    axes = [parse_grid_entry(entry) for entry in grid]
    seen: set[str] = set()
    for axis in axes:
        if axis.key in seen:
            raise ConfigError(f"--grid: key {axis.key!r} is given in two --grid options")
        seen.add(axis.key)
    return axes


def expand_grid(grid: Sequence[str], seeds: int) -> list[Cell]:
    """Cartesian product of the grid (in the order given) times seeds 0..seeds-1."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least one seed")
    axes = parse_grid(grid)
    cells = []
    combos = itertools.product(*(range(len(axis.values)) for axis in axes))
    for combo in combos:
        assignment = {axis.key: axis.values[i] for axis, i in zip(axes, combo)}
        raw = {axis.key: axis.raw_values[i] for axis, i in zip(axes, combo)}
        for seed in range(seeds):
            cells.append(Cell(len(cells), assignment, raw, seed))
    return cells


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _safe_part(text: str) -> str:
    """Filesystem-safe and short; a hash of the original keeps altered names unique."""
    safe = _SAFE.sub("-", text)[:MAX_PART_LENGTH]
    return safe if safe == text else f"{safe}~{_short_hash(text)}"


def cell_name(raw: dict[str, str], seed: int) -> str:
    """A readable folder name, e.g. `estimator.name=jsa__retriever.name=bm25__seed=0`."""
    parts = [f"{_safe_part(key)}={_safe_part(value)}" for key, value in raw.items()]
    name = "__".join([*parts, f"seed={seed}"])
    if len(name) > MAX_NAME_LENGTH:
        name = f"{name[:MAX_NAME_LENGTH]}~{_short_hash(name)}"
    return name


# -- shards ---------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """`"1/4"` -> (1, 4): shard 1 (0-based) of 4."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """Round-robin by index in the expanded list: shards are disjoint and cover every cell."""
    if shard is None:
        return list(cells)
    index, count = shard
    return list(cells[index::count])


# -- the sweep folder -----------------------------------------------------------------------


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")


def sweep_manifest(
    config_path: Path, axes: Sequence[GridAxis], seeds: int, overrides: Sequence[str]
) -> dict[str, Any]:
    return {
        "config": str(config_path),
        "config_sha256": hashlib.sha256(config_path.read_bytes()).hexdigest(),
        "grid": [{"key": axis.key, "values": list(axis.values)} for axis in axes],
        "seeds": seeds,
        "overrides": list(overrides),
    }


# The config's path may differ between machines running shards; its content may not.
_IDENTITY_KEYS = ("config_sha256", "grid", "seeds", "overrides")


def claim_folder(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write `sweep.json`, or check that the one already there describes this sweep."""
    path = out_dir / SWEEP_FILE
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _json_bytes(manifest))
        return
    try:
        existing = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); use another --out") from None
    ours = json.loads(_json_bytes(manifest))  # compare as JSON, like what is on disk
    for key in _IDENTITY_KEYS:
        if existing.get(key) != ours[key]:
            raise ConfigError(
                f"{path}: a different sweep lives in this folder ({key}: "
                f"{existing.get(key)!r} there, {ours[key]!r} now); use another --out"
            )


class SweepWarning(UserWarning):
    """A cell's config was adapted (shared estimator keys its estimator does not have)."""


def _estimator_fields(registry: Registry, name: object) -> set[str] | None:
    """The config keys of estimator `name`, None when it is not registered."""
    if not isinstance(name, str):
        return None
    try:
        return set(registry.get("estimator", name).config_model.model_fields)
    except LatentragError:
        return None


def _split_section(section: Any, fields: set[str], registry: Registry) -> tuple[dict, dict]:
    """[estimator] as (shared keys, per-estimator sub-tables): a table-valued key named after
    a registered estimator is a sub-table unless the cell's estimator has a key of that name."""
    if not isinstance(section, dict):
        return {}, {}
    shared, own = {}, {}
    for key, value in section.items():
        is_sub = isinstance(value, dict) and key not in fields and key != "name"
        if is_sub and _estimator_fields(registry, key) is not None:
            own[key] = value
        else:
            shared[key] = value
    return shared, own


def cell_data(
    base: dict[str, Any],
    overrides: Sequence[str],
    swept: Sequence[str],
    registry: Registry,
    cell: str = "",
) -> dict[str, Any]:
    """A cell's config dict: `base` with `overrides` applied, its estimator's sub-table
    merged into [estimator] and every sub-table removed, and the shared keys that its
    estimator lacks but one of the `swept` estimators has dropped (one warning)."""
    data = apply_overrides(base, list(overrides))
    name = data["estimator"].get("name") if isinstance(data.get("estimator"), dict) else None
    fields = _estimator_fields(registry, name)
    if fields is None:
        return data  # no [estimator] or an unknown one: resolve() reports it
    given = apply_overrides({}, list(overrides)).get("estimator", {})
    file_shared, file_own = _split_section(base.get("estimator"), fields, registry)
    given_shared, given_own = _split_section(given, fields, registry)
    # the file's shared keys < its sub-table < --set/--grid shared keys < their sub-table
    own = [file_own.get(name, {}), given_own.get(name, {})]
    section = {**file_shared, **own[0], **given_shared, **own[1]}
    dropped = _foreign_keys(section, fields, {*own[0], *own[1]}, swept, name, registry)
    if dropped:
        keys = ", ".join(f"estimator.{key}" for key in dropped)
        where = f"cell {cell}: " if cell else ""
        message = f"{where}{keys} dropped: estimator {name!r} has no such key"
        warnings.warn(message, SweepWarning, stacklevel=2)
    data["estimator"] = {k: v for k, v in section.items() if k not in dropped}
    return data


def _foreign_keys(
    section: dict[str, Any],
    fields: set[str],
    own: set[str],
    swept: Sequence[str],
    name: str,
    registry: Registry,
) -> list[str]:
    """Shared keys that estimator `name` lacks and another swept estimator has."""
    others = [_estimator_fields(registry, n) or set() for n in swept if n != name]
    return [
        key
        for key in section
        if key != "name"
        and key not in fields
        and key not in own
        and any(key in other for other in others)
    ]


def _swept_estimators(cells: Sequence[Cell]) -> list[str]:
    names = [cell.assignment.get("estimator.name") for cell in cells]
    return list(dict.fromkeys(n for n in names if isinstance(n, str)))


def resolve_cells(
    config_path: Path,
    cells: Sequence[Cell],
    overrides: Sequence[str],
    registry: Registry | None = None,
) -> list[ResolvedConfig]:
    """Resolve every cell's config (see `cell_data`); one ConfigError naming each bad cell
    before any run."""
    registry = registry or default_registry()
    base = read_toml(config_path)
    swept = _swept_estimators(cells)
    resolved, problems = [], {}
    for cell in cells:
        try:
            data = cell_data(base, [*overrides, *cell.overrides], swept, registry, cell.name)
            resolved.append(resolve(data, str(config_path), registry))
        except LatentragError as exc:
            for line in str(exc).splitlines():
                problems.setdefault(line, []).append(cell.name)
    if problems:
        lines = []
        for line, names in problems.items():
            where = f"all {len(cells)} cells" if len(names) == len(cells) else ", ".join(names)
            lines.append(f"{line} [{where}]")
        raise ConfigError("\n".join(lines))
    return resolved


def has_checkpoint(cell_dir: Path) -> bool:
    """True when a killed run left checkpoints (`ckpt-<step>/`, here or one level down)."""
    patterns = ("ckpt-*", "*/ckpt-*")
    return any(not p.name.endswith(".tmp") for pattern in patterns for p in cell_dir.glob(pattern))


def _error_text(exc: BaseException) -> tuple[str, str]:
    message = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return line, "".join(traceback.format_exception(exc))


# -- running --------------------------------------------------------------------------------


def _default_train_fn() -> TrainFn:
    from latentrag.experiments.runs import (
        train_run,  # imports torch: only when a sweep really trains
    )

    return train_run


def run_cell(
    cell: Cell, resolved: ResolvedConfig, config_path: Path, out_dir: Path, train_fn: TrainFn
) -> CellResult:
    """Run one cell unless it is finished; any Exception becomes a "failed" result."""
    cell_dir = out_dir / cell.name
    if (cell_dir / EVAL_FILE).exists():
        return CellResult(cell.name, "skipped")
    cell_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "name": cell.name,
        "index": cell.index,
        "assignment": cell.assignment,
        "seed": cell.seed,
        "overrides": cell.overrides,
    }
    atomic_write_bytes(cell_dir / CELL_FILE, _json_bytes(info))
    resume = has_checkpoint(cell_dir)
    if not resume:  # a run killed before its first checkpoint starts over
        (cell_dir / METRICS_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        train_fn(resolved, config_path, cell_dir, resume=resume)
    except Exception as exc:  # KeyboardInterrupt and SystemExit stop the sweep instead
        line, trace = _error_text(exc)
        atomic_write_bytes(cell_dir / ERROR_FILE, f"{line}\n\n{trace}".encode())
        return CellResult(cell.name, "failed", line, time.perf_counter() - start)
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    return CellResult(cell.name, "done", "", time.perf_counter() - start)


def _describe(result: CellResult) -> str:
    if result.status == "skipped":
        return f"{result.name}: skipped (already finished)"
    if result.status == "failed":
        return f"{result.name}: FAILED after {result.seconds:.1f} s: {result.error}"
    return f"{result.name}: done in {result.seconds:.1f} s"


def run_sweep(
    config_path: Path,
    grid: Sequence[str],
    seeds: int,
    out_dir: Path,
    overrides: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    train_fn: TrainFn | None = None,
    registry: Registry | None = None,
) -> list[CellResult]:
    """Run this shard's cells of the sweep into `out_dir`, skipping finished ones.

    `registry` resolves the cells' components (default: the process-wide one)."""
    from tqdm.auto import tqdm

    config_path, out_dir = Path(config_path), Path(out_dir)
    overrides = list(overrides)
    if any(parse_override(text)[0] == SEED_KEY.split(".") for text in overrides):
        raise ConfigError(f"--set {SEED_KEY}: sweeps set the seed per run; use --seeds N")
    axes = parse_grid(grid)
    cells = expand_grid(grid, seeds)
    grid_keys = {axis.key for axis in axes}
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key in grid_keys:
            raise ConfigError(f"--set {text!r}: {key} is also swept by --grid")
    resolved = resolve_cells(config_path, cells, overrides, registry)
    claim_folder(out_dir, sweep_manifest(config_path, axes, seeds, overrides))

    train_fn = train_fn or _default_train_fn()
    results = []
    bar = tqdm(shard_cells(cells, shard), desc="sweep", unit="run", position=0, file=sys.stderr)
    for cell in bar:
        bar.set_postfix_str(cell.name, refresh=True)
        result = run_cell(cell, resolved[cell.index], config_path, out_dir, train_fn)
        results.append(result)
        tqdm.write(_describe(result), file=sys.stderr)
    bar.close()
    return results
