"""Data-parallel training over torch.distributed, as started by ``torchrun``.

One process per rank. Every rank draws the same seeded global batch of `train.batch_size`
examples and keeps its own contiguous share (`shard`); after backward every rank holds the
gradient averaged over the ranks, so every rank takes the same optimizer step and the
parameters stay identical. Only rank 0 writes files.

How the gradients are averaged is `train.data_parallel` (`GradientSync`):

- ``"exact"``: after the last micro-batch, `average_gradients` all-reduces every parameter
  separately (deterministic; bit-for-bit repeatable on the CPU over gloo);
- ``"ddp"``: torch's DistributedDataParallel wraps the trained modules (`DDPLoss`), whose
  bucketed all-reduce overlaps backward (nccl on GPUs); ``no_sync`` on all micro-batches
  but the last. Both give the same parameters (the tests compare them within 1e-6), and
  in both a parameter that no rank gave a gradient keeps none (AdamW then leaves it alone);
- ``"auto"``: ddp when training on CUDA under torchrun, exact otherwise.

Under torchrun on GPUs each process trains on ``cuda:LOCAL_RANK``.

Per-example estimator state (JSA's persistent chains) is kept whole on every rank: after each
step the entries a rank changed are gathered and applied everywhere (`merge_example_state`),
so an example's chain continues on whichever rank visits it next, and rank 0's checkpoint
holds every chain.

Outside torchrun (WORLD_SIZE unset or 1) every function here is a cheap no-op.
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from latentrag.core.interfaces import EstimatorOutput
from latentrag.core.types import Batch

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


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
        torch.cuda.set_device(local_rank())
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


# -- how gradients are averaged (train.data_parallel) -----------------------------------

Mode = Literal["exact", "ddp"]


def choose_mode(setting: str, device: torch.device, world: int) -> Mode | None:
    """The averaging a `train.data_parallel` setting means here; None alone (one process)."""
    if world <= 1:
        return None
    if setting == "auto":
        return "ddp" if device.type == "cuda" else "exact"
    if setting not in ("exact", "ddp"):
        raise ValueError(f"unknown data_parallel setting {setting!r}")
    return setting  # type: ignore[return-value]


Loss = Callable[[Batch], EstimatorOutput]


class _TrainedModules(nn.Module):
    """The trained modules under one module, so that DDP sees exactly the trained
    parameters; its forward is the estimator's loss, which drives them all."""

    def __init__(self, modules: Sequence[nn.Module], loss: Loss) -> None:
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self._loss = loss
        self._params = [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: Batch) -> EstimatorOutput:
        out = self._loss(batch)
        if torch.is_grad_enabled() and not out.loss.requires_grad:
            out.loss = self._touch_all(out.loss)
        return out

    def _touch_all(self, loss: Tensor) -> Tensor:
        """A loss without a graph here would leave this rank out of DDP's all-reduce while
        the others wait in it. A non-finite one (the step is skipped or stops) gets a zero
        path to every parameter so the rank takes part; a finite one stays as it is (the
        trainer reports it)."""
        if math.isfinite(loss.item()):
            return loss
        zero = sum((p.reshape(-1)[:1].sum() * 0.0 for p in self._params), loss.new_zeros(()))
        return loss.detach() + zero


class GradientSync:
    """How a rank's gradients become the global batch's mean gradient.

    mode: `choose_mode`'s answer (None alone: nothing to do). modules: the trained modules;
    parameters: the trained parameters (the same, as `RoleParameters` lists them); loss:
    the estimator's loss on a batch. Use as::

        for last in (False, ..., True):          # the micro-batches
            with sync.micro_batch(last):
                out = sync.loss(batch); out.loss.backward()
        sync.finish()
    """

    def __init__(
        self,
        mode: Mode | None,
        modules: Sequence[nn.Module],
        parameters: Sequence[Tensor],
        loss: Loss,
    ) -> None:
        self.mode = mode
        self.parameters = list(parameters)
        self._loss = loss
        self.ddp: DistributedDataParallel | None = None
        if mode == "ddp":
            holder = _TrainedModules(_unique(modules), loss)
            _check_same_parameters(holder._params, self.parameters)
            # device_ids=None: one device per process, and batches (text) stay where they are
            self.ddp = DistributedDataParallel(
                holder, find_unused_parameters=True, **_no_buffer_sync()
            )

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """The context of one micro-batch's forward and backward: DDP all-reduces only
        during the last one (gradients accumulate locally before)."""
        context = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
        with context:
            yield

    def loss(self, batch: Batch) -> EstimatorOutput:
        return self.ddp(batch) if self.ddp is not None else self._loss(batch)

    def finish(self) -> None:
        """After the last micro-batch's backward: the exact path averages now."""
        if self.mode == "exact":
            average_gradients(self.parameters)


def _no_buffer_sync() -> dict[str, bool]:
    """Buffers are not broadcast before each forward (the spelling changed in torch 2.13)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _unique(modules: Sequence[nn.Module]) -> list[nn.Module]:
    return list({id(m): m for m in modules}.values())


def _check_same_parameters(found: Sequence[Tensor], trained: Sequence[Tensor]) -> None:
    if {id(p) for p in found} != {id(p) for p in trained}:
        raise RuntimeError(
            f"data_parallel = 'ddp': the trained modules hold {len(found)} trainable "
            f"parameters, the optimizer {len(trained)}"
        )
