"""A step's gradients: their norm per role, what is not finite, and clipping."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentrag.training.optimizer import RoleParameters


def grad_norms(parameters: RoleParameters) -> dict[str, Tensor]:
    """The gradient norm of each trained role that has gradients."""
    norms = {}
    for role in parameters.trained:
        grads = [p.grad for _, p in parameters.by_role[role] if p.grad is not None]
        if grads:
            norms[role] = torch.nn.utils.get_total_norm(grads)
    return norms


def nonfinite(loss: float, norms: dict[str, Tensor], parameters: RoleParameters) -> str | None:
    """What is not finite (the loss, or the gradient of which component), or None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    for role, norm in norms.items():
        if not torch.isfinite(norm):
            bad = next(
                (
                    name
                    for name, p in parameters.by_role[role]
                    if p.grad is not None and not torch.isfinite(p.grad).all()
                ),
                "its norm overflows",
            )
            return f"non-finite gradient in the {role} ({bad})"
    return None


def clip(norms: dict[str, Tensor], parameters: RoleParameters, max_norm: float | None) -> float:
    """Scale the gradients to a total norm of at most max_norm (0 or None: leave them);
    return the total norm before clipping."""
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
    if max_norm:
        params = [p for role in norms for _, p in parameters.by_role[role]]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()
