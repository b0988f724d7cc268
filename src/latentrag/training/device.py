"""Where training runs and in which precision (``train.device``, ``train.precision``).

The trainer moves every component's trainable modules (and a generator's whole model, frozen
or not) to the device once, before building the optimizer; components create their tensors
on the device of their parameters. Autocast wraps only the estimator's forward pass; fp16
also scales the loss (`Precision.backward`, `Precision.step`) so small gradients survive.
On the CPU in fp32 nothing changes: no autocast, no scaler, the same kernels as before.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from latentrag.core.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, source: str = "config") -> torch.device:
    """The torch device for a `train.device` setting; a device this machine lacks is a
    ConfigError (one line, naming the key)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{source}: train.device: {name!r} but this machine has no GPU")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{source}: train.device: {name!r} but this machine has {count} GPU(s)"
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


class Precision:
    """Autocast and loss scaling for `train.precision` on a device."""

    def __init__(self, precision: str, device: torch.device, source: str = "config") -> None:
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError(f"{source}: train.precision: 'fp16' needs a GPU; use 'bf16'")
        self.dtype = _DTYPES.get(precision)
        self.device = device
        enabled = precision == "fp16"
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
