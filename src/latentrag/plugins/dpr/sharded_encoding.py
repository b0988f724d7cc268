"""Corpus encoding shared among the ranks of a ``torchrun`` job.

A dense retriever refreshing its index during data-parallel training would otherwise encode
the whole corpus on every rank. `encode_sharded` has each rank encode a contiguous 1/N of
the texts and all-gathers the parts, so every rank ends with the same full matrix, in the
original order, for 1/N of the encoding work. It is a collective: every rank must call it
with the same texts, at the same point (an index build or refresh that all ranks run, never
an evaluation that only rank 0 runs).

Plugins may not import ``latentrag.training``, so this uses ``torch.distributed`` directly.
With the trainer's ``"cpu:gloo,cuda:nccl"`` backend, CPU vectors travel over gloo and CUDA
vectors over nccl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

#: encode(texts) -> vectors [len(texts), ...], one row per text
Encode = Callable[[Sequence[str]], Tensor]


def share(count: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) rows of `count` that `rank` encodes: contiguous, in rank order, the
    first ``count % world`` ranks taking one row more."""
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def encode_sharded(
    encode: Encode, texts: Sequence[str], group: dist.ProcessGroup | None = None
) -> Tensor:
    """`encode(texts)`, computed by the ranks of `group` (default: the whole job) together.

    Alone (torch.distributed not initialised, or one rank) this is just ``encode(texts)``.
    Otherwise each rank encodes its `share` of the texts and receives the others' parts:
    the result is the full [len(texts), ...] matrix, detached, on the device and in the
    dtype `encode` returned. With fewer texts than ranks every rank encodes them all.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return encode(texts)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1 or len(texts) < world:
        return encode(texts)
    start, end = share(len(texts), rank, world)
    part = encode(texts[start:end]).detach()
    if part.shape[0] != end - start:
        raise ValueError(f"encode returned {part.shape[0]} rows for {end - start} texts")
    longest = -(-len(texts) // world)  # all_gather needs equal shapes: pad to the largest share
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    rows = [share(len(texts), r, world) for r in range(world)]
    return torch.cat([p[: end - start] for p, (start, end) in zip(parts, rows)])
