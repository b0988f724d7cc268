"""Remembered log p(y|x,h) of a frozen generator, shared by the pipelines given it.

A generator without trainable modules (e.g. `freeze = true`) gives the same log-likelihood
for the same question, answer and passage at every step, in every run: scoring it once is
enough. A pipeline built with ``loglik_cache=LoglikCache(...)`` consults it in
`Pipeline.rows_loglik` (the cache is passed explicitly: whoever owns it, the demo or a run,
hands it to the pipelines that share it); a trainable generator is always scored afresh.

Entries are keyed by a digest of (generator identity, question, target, passage text,
reduce). The identity is the generator's class and its full config: a frozen generator's
weights are whatever its config loads. A cache with a `path` is read from that JSON file
when created and written back atomically by `save()`, so that later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentrag.core.errors import LatentragError
from latentrag.core.pipeline import ScoreFn
from latentrag.io.atomic import atomic_write_bytes

FORMAT_VERSION = 1


class LoglikCache:
    """digest -> (value, dtype name); `hits` and `misses` count looked-up pairs. A
    `core.pipeline.ScoreCache`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._values: dict[str, tuple[float, str]] = {}
        self._device = torch.device("cpu")
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            self._values = _read(self.path)

    def __len__(self) -> int:
        return len(self._values)

    def loglik(
        self,
        generator: Any,
        queries: Sequence[str],
        passages: Sequence[str],
        targets: Sequence[str],
        reduce: str,
        score: ScoreFn,
    ) -> Tensor:
        """Log-likelihoods [n] of the n (query, passage, target) triples. For a frozen
        generator (see `generator_identity`) `score` is called once, on the triples not
        cached yet (not at all when every one is); any other is scored on every triple."""
        identity = generator_identity(generator)
        if identity is None:
            return score(list(queries), [[p] for p in passages], list(targets))
        digests = [
            _digest(identity, q, t, p, reduce) for q, p, t in zip(queries, passages, targets)
        ]
        first: dict[str, int] = {}
        for i, digest in enumerate(digests):
            first.setdefault(digest, i)
        missing = [i for digest, i in first.items() if digest not in self._values]
        self.misses += len(missing)
        self.hits += len(digests) - len(missing)
        if missing:
            fresh = score(
                [queries[i] for i in missing],
                [[passages[i]] for i in missing],
                [targets[i] for i in missing],
            ).detach()
            dtype = str(fresh.dtype).removeprefix("torch.")
            for i, value in zip(missing, fresh.tolist()):
                self._values[digests[i]] = (value, dtype)
            self._device = fresh.device
        entries = [self._values[d] for d in digests]
        dtype = getattr(torch, entries[0][1])
        return torch.tensor([value for value, _ in entries], dtype=dtype, device=self._device)

    def save(self) -> None:
        """Write the cache to its path (atomically); a no-op for an in-memory cache."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": FORMAT_VERSION, "values": self._values}
        atomic_write_bytes(self.path, json.dumps(data).encode("utf-8"))


def _digest(identity: str, question: str, target: str, passage: str, reduce: str) -> str:
    text = json.dumps([identity, question, target, passage, reduce])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _read(path: Path) -> dict[str, tuple[float, str]]:
    try:
        data = json.loads(path.read_text("utf-8"))
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
        return {key: (float(value), str(dtype)) for key, (value, dtype) in data["values"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LatentragError(f"{path}: not a log-likelihood cache ({exc}); delete it") from None


def generator_identity(generator: object) -> str | None:
    """Class and config of a frozen generator; None when it has trainable modules or no
    config to identify its weights by (such a generator is never cached)."""
    trainable = getattr(generator, "trainable_modules", None)
    if trainable is None or trainable():
        return None
    config = getattr(generator, "config", None)
    dump = getattr(config, "model_dump", None)
    if dump is None:
        return None
    cls = type(generator)
    settings = json.dumps(dump(mode="json"), sort_keys=True)
    return f"{cls.__module__}.{cls.__qualname__}:{settings}"
