"""A memory-bounded LRU cache of a frozen causal LM's passage key/value states.

A passage read alone from position 0 (per-passage reading with the passage first in the
prompt, or the joint reader's parallel-encoded passages) has key/value states that no
question changes: computed once, they are reused exactly while the weights stay the same.

Entries are keyed by the passage's token ids. The cache is tied to the weights by a
fingerprint of every parameter (identity, storage address and in-place version counter):
an optimizer step, `load_state_dict`, an in-place edit or a `.to()` changes it, and the
next lookup then starts from an empty cache. Entries may be stored in bfloat16 to halve
their memory (then exact only to bfloat16 precision); they are cast back to the model's
dtype when read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from latentrag.plugins.joint_attention import PassageStates

Fingerprint = tuple[tuple[int, int, int], ...]


def weights_fingerprint(model: nn.Module) -> Fingerprint:
    """What changes whenever any parameter's values may have changed (cheap: no data read)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


class PassageCache:
    """token ids -> PassageStates, least recently used evicted beyond `budget_bytes`.

    Counters: `hits` and `misses` (passage rows served from / computed for the cache),
    `evictions`, `invalidations` (weight changes that emptied it), `bytes` held now.
    """

    def __init__(self, budget_bytes: int, storage_dtype: torch.dtype | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"passage cache budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.storage_dtype = storage_dtype
        self._entries: OrderedDict[tuple[int, ...], PassageStates] = OrderedDict()
        self._fingerprint: Fingerprint | None = None
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: object) -> bool:
        return tuple(ids) in self._entries  # type: ignore[arg-type]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
        }

    def check_weights(self, model: nn.Module) -> None:
        """Empty the cache if `model`'s weights are not those its entries were computed with."""
        fingerprint = weights_fingerprint(model)
        if fingerprint != self._fingerprint:
            if self._entries:
                self.invalidations += 1
            self.clear()
            self._fingerprint = fingerprint

    def states(
        self,
        model: nn.Module,
        rows: list[list[int]],
        compute: Callable[[list[list[int]]], list[PassageStates]],
    ) -> list[PassageStates]:
        """The states of each row: cached ones, the others from one `compute` call (each
        distinct row once). Every row of this call is served even when the budget cannot
        hold them all at once."""
        self.check_weights(model)
        keys = [tuple(row) for row in rows]
        found: dict[tuple[int, ...], PassageStates] = {}
        for key in dict.fromkeys(keys):
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                found[key] = entry
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        self.hits += sum(key in found for key in keys)
        self.misses += len(keys) - sum(key in found for key in keys)
        if missing:
            for key, states in zip(missing, compute([list(key) for key in missing])):
                stored = states.to(self.storage_dtype) if self.storage_dtype else states
                found[key] = stored
                self._put(key, stored)
        return [found[key] for key in keys]

    def _put(self, key: tuple[int, ...], states: PassageStates) -> None:
        size = states.nbytes
        if size > self.budget_bytes:
            return  # would evict everything and still not fit
        while self.bytes + size > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        self._entries[key] = states
        self.bytes += size
