"""Where training runs and in which precision (``train.device``, ``train.precision``).

The trainer moves every component's trainable modules (and a generator's whole model, frozen
or not) to the device once, before building the optimizer; components create their tensors
on the device of their parameters. Autocast wraps only the estimator's forward pass; fp16
also scales the loss (`Precision.backward`, `Precision.step`) so small gradients survive;
a step whose scaled gradient overflows is skipped and the scale lowered (`overflowed`), and
the scaler's state is checkpointed with the optimizer's (`checkpointer`).
On the CPU in fp32 nothing changes: no autocast, no scaler, the same kernels as before.
Under torchrun, "cuda" means the process's own GPU, ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from latentrag.core.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(
    name: str, source: str = "config", local_rank: int | None = None
) -> torch.device:
    """The torch device for a `train.device` setting; a device this machine lacks is a
    ConfigError (one line, naming the key). local_rank: this process's index on its machine
    under torchrun, where "cuda" (and "auto" on a GPU machine) means ``cuda:local_rank``."""
    setting = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"  # one GPU per process
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{source}: train.device: {setting!r} but this machine has no GPU")
        if device.index is not None and device.index >= count:
            meant = f" (LOCAL_RANK {local_rank}: {name})" if name != setting else ""
            raise ConfigError(
                f"{source}: train.device: {setting!r}{meant} but this machine has {count} GPU(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{source}: train.device: 'mps' but MPS is not available here")
    return device


def place(pipeline: Any, device: torch.device) -> None:
    """Move every component's trainable modules, and a generator's model, to `device`."""
    for component in pipeline.roles().values():
        for module in component.trainable_modules().values():
            module.to(device)
        model = getattr(component, "model", None)
        if isinstance(model, nn.Module):
            model.to(device)


def _check_supported(precision: str, device: torch.device, source: str) -> None:
    """fp16 on the CPU is refused: bf16 does the same job there without a scaler."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{source}: train.precision: 'fp16' needs a GPU; use 'bf16'")


class Precision:
    """Autocast and loss scaling for `train.precision` on a device."""

    def __init__(self, precision: str, device: torch.device, source: str = "config") -> None:
        _check_supported(precision, device, source)
        self.dtype = _DTYPES.get(precision)
        self.device = device
        enabled = precision == "fp16"
        #: fp16's loss scaler; the checkpointer saves and restores its state
        self.scaler = torch.amp.GradScaler(device.type, enabled=True) if enabled else None

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward pass's context: autocast to bf16/fp16, nothing for fp32."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale (before norms and clipping)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def overflowed(self, loss: float) -> bool:
        """Whether a non-finite gradient is fp16's loss scale overflowing (the loss is
        finite): the scaler's ordinary business, the step is skipped and the scale lowered
        even with ``on_nonfinite = "stop"``."""
        return self.scaler is not None and math.isfinite(loss)

    def skip(self) -> None:
        """A skipped step (non-finite gradient): fp16 lowers its loss scale."""
        if self.scaler:
            self.scaler.update()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
