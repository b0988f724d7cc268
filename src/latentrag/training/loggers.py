"""Where a run's log goes besides ``metrics.jsonl``: the builtin TensorBoard writer
(``train.loggers = ["tensorboard"]``) and every plugin's `log_record` hook.

Each logger receives every record `run_log.MetricsLog` writes, as read back from its line.
A logger that raises is reported once (a warning) and receives nothing more from that run:
a dashboard that goes away never stops training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from latentrag.core.config import ResolvedConfig
from latentrag.core.errors import ConfigError
from latentrag.core.registry import default_registry
from latentrag.training.run_folder import TENSORBOARD_DIR


class RecordLogger(Protocol):
    """Receives the records of one run's log."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The (tag, value) numbers of a record: ``eval/<metric>`` for an evaluation, else
    ``train/<key>`` (``train/lr/<role>`` for nested tables); booleans count as 0/1, and
    what is not a number (a null, a string) is left out."""
    if "eval" in record:
        yield from _flatten("eval", record["eval"])
    else:
        yield from _flatten("train", {k: v for k, v in record.items() if k != "step"})


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}/{key}", inner)
    elif isinstance(value, (bool, int, float)):
        yield prefix, float(value)


class TensorBoardLogger:
    """The records' numbers (`scalars`) as TensorBoard events in ``RUN/tensorboard``, at
    each record's step. A resumed run purges the events after its checkpoint's step."""

    def __init__(self, log_dir: Path, resumed_at: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.loggers: 'tensorboard' needs the tensorboard package "
                "(pip install tensorboard)"
            ) from None
        purge = resumed_at + 1 if resumed_at > 0 else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class HookLogger:
    """One plugin's `log_record` hook, for one run folder."""

    def __init__(self, hook: Callable[..., None], run_dir: Path) -> None:
        self.hook, self.run_dir = hook, run_dir

    def write(self, record: dict[str, Any]) -> None:
        self.hook(record=record, run_dir=self.run_dir)

    def close(self) -> None:
        pass


class Guarded:
    """A logger whose first exception is a warning and switches it off for the run."""

    def __init__(self, name: str, logger: RecordLogger) -> None:
        self.name, self.logger, self.failed = name, logger, False

    def write(self, record: dict[str, Any]) -> None:
        if not self.failed:
            self._call(self.logger.write, record)

    def close(self) -> None:
        if not self.failed:
            self._call(self.logger.close)

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:  # a logger must never stop training
            self.failed = True
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(
                f"logger {self.name} failed ({reason}); it receives no more records of this run",
                stacklevel=2,
            )


def build_loggers(config: ResolvedConfig, run_dir: Path, resumed_at: int = 0) -> list[Guarded]:
    """The loggers of a run: those named in ``train.loggers``, then each plugin's
    `log_record` hook (from the registry that resolved the config). ConfigError, naming the
    key, when a named logger cannot work here (its package is missing)."""
    loggers: list[Guarded] = []
    for name in config.pipeline.train.loggers:
        if name == "tensorboard":
            try:
                logger = TensorBoardLogger(run_dir / TENSORBOARD_DIR, resumed_at)
            except ConfigError as exc:
                raise ConfigError(f"{config.source}: {exc}") from None
            loggers.append(Guarded("tensorboard", logger))
    registry = config.registry or default_registry()
    for plugin, hook in registry.record_loggers():
        loggers.append(Guarded(f"of plugin {plugin!r}", HookLogger(hook, run_dir)))
    return loggers
