"""The run log, ``metrics.jsonl``: one JSON object per line, flushed as it is written.

A step's line holds ``step``, ``loss``, ``lr`` (per role), ``grad_norm`` (absent on a
skipped step), ``skipped``, ``skipped_steps``, ``wall_s`` and the estimator's diagnostics;
an evaluation's line is ``{"step": s, "eval": {...}}``. Non-finite numbers are written as
null (JSON has no NaN).

Every line written also goes to the run's loggers (`loggers`: TensorBoard with
``train.loggers``, the plugins' `log_record` hooks), each given the line as read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from latentrag.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from latentrag.core.config import ResolvedConfig
    from latentrag.training.loggers import RecordLogger

#: keys of a step's line; an estimator diagnostic of the same name is logged as estimator.<name>
RESERVED = frozenset(
    {"step", "loss", "lr", "grad_norm", "skipped", "skipped_steps", "wall_s", "eval"}
)


def json_safe(value: Any) -> Any:
    """Non-finite floats become None; nested dicts are walked."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def diagnostic_key(name: str) -> str:
    """The log key of an estimator diagnostic (reserved names get an ``estimator.`` prefix)."""
    return f"estimator.{name}" if name in RESERVED else name


class RunLog(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """metrics.jsonl, appended one flushed line at a time. Opening it keeps only the lines
    of steps <= keep_through (0: none), so a resumed run writes no duplicates.

    loggers: also given each line written, parsed back (each its own copy)."""

    def __init__(self, path: Path, keep_through: int, loggers: Sequence[RecordLogger] = ()) -> None:
        kept = [line for line in _read_lines(path) if _line_step(line) <= keep_through]
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._loggers = list(loggers)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(json_safe(record), allow_nan=False)
        self._handle.write(line + "\n")
        self._handle.flush()
        for logger in self._loggers:
            logger.write(json.loads(line))

    def close(self) -> None:
        self._handle.close()
        for logger in self._loggers:
            logger.close()


class NoLog:
    """The run log of a process that writes no files (ranks other than 0)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_run_log(
    path: Path, keep_through: int, writes: bool, config: ResolvedConfig | None = None
) -> RunLog:
    """`MetricsLog` at path, or `NoLog` for a process that does not write; with the run's
    config, its loggers (`loggers.build_loggers`) receive every record too."""
    if not writes:
        return NoLog()
    from latentrag.training.loggers import build_loggers

    loggers = build_loggers(config, path.parent, keep_through) if config is not None else []
    return MetricsLog(path, keep_through, loggers)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _line_step(line: str) -> float:
    """The step of a line; a torn or foreign line sorts after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
