"""What makes training repeatable: seeded global RNGs, deterministic kernels, and a data
order that is a function of (seed, epoch) alone, so it can be resumed from a position."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Deterministic torch kernels (warning where none exists) for the block's duration."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"latentrag-data-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class DataOrder:
    """Which example comes next: epoch e visits a permutation seeded by (seed, e); a batch
    that runs past the end of an epoch continues into the next one."""

    size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        self._order: list[int] = []
        self._order_epoch = -1

    def _permutation(self) -> list[int]:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.size, generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def take(self, count: int) -> list[int]:
        rows = []
        for _ in range(count):
            rows.append(self._permutation()[self.index])
            self.index += 1
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return rows

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}
