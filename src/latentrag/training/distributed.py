"""Data-parallel training over torch.distributed, as started by ``torchrun``.

One process per rank. Every rank draws the same seeded global batch of `train.batch_size`
examples and keeps its own contiguous share (`shard`); after backward the gradients are
averaged (`average_gradients`: one deterministic all-reduce per parameter), so every rank
takes the same optimizer step and the parameters stay identical. Only rank 0 writes files.

Per-example estimator state (JSA's persistent chains) is kept whole on every rank: after each
step the entries a rank changed are gathered and applied everywhere (`merge_example_state`),
so an example's chain continues on whichever rank visits it next, and rank 0's checkpoint
holds every chain.

Outside torchrun (WORLD_SIZE unset or 1) every function here is a cheap no-op.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (env WORLD_SIZE > 1); gloo for CPU tensors
    and nccl for CUDA ones. Returns whether training is distributed."""
    if active():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    if active():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank's own random streams (rank 0 keeps `seed`, so one process is as before)."""
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"latentrag-rank:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # numpy takes seeds below 2**32


def shard(rows: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank's contiguous share of a global batch (its length must divide by world)."""
    size = len(rows) // world
    return list(rows[rank * size : (rank + 1) * size])


def broadcast_parameters(params: Iterable[Tensor]) -> None:
    """Copy rank 0's values into every rank (identical starting points)."""
    if not active():
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def average_gradients(params: Sequence[Tensor]) -> None:
    """Replace each gradient by its mean over the ranks. A parameter without a gradient on
    some rank counts zero there; one without a gradient anywhere keeps none (as alone)."""
    if not active():
        return
    world = dist.get_world_size()
    has_grad = torch.tensor([float(p.grad is not None) for p in params])
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for param, any_grad in zip(params, has_grad.tolist()):
        if not any_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


def reduce_metrics(record: dict[str, Any], summed: Iterable[str] = ()) -> dict[str, Any]:
    """Numbers averaged over the ranks (those named in `summed` are totals); others as is.
    Every rank must hold the same numeric keys."""
    if not active():
        return record
    keys = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and k != "step")
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    world, totals = dist.get_world_size(), set(summed)
    out = dict(record)
    for key, value in zip(keys, values.tolist()):
        out[key] = int(value) if key in totals else value / world
    return out


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def changed_entries(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict]:
    """For each dict-valued entry of an estimator state (a per-example cache), the keys
    whose value differs from `before`."""
    changes = {}
    for name, value in after.items():
        if isinstance(value, dict):
            old = before.get(name) or {}
            changes[name] = {k: v for k, v in value.items() if k not in old or old[k] != v}
    return changes


def merge_example_state(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """This rank's estimator state `after` a step, with every rank's per-example changes
    (made since `before`) applied; entries that are not dicts (the rank's RNG) stay own."""
    merged = dict(after)
    for changes in gather(changed_entries(before, after)):
        for name, entries in changes.items():
            merged[name] = {**merged.get(name, {}), **entries}
    return merged
