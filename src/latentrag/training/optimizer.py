"""The trained parameters by role and their optimizer: AdamW with one group per trained
role (its own learning rate from ``train.lrs``) and weight decay on matrices only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from latentrag.core.config import TrainConfig
from latentrag.core.pipeline import Pipeline
from latentrag.training.errors import TrainingError

Named = list[tuple[str, nn.Parameter]]


class RoleParameters:
    """The pipeline's trainable parameters, by role.

    `trained`: the roles the estimator trains plus the estimator's own modules (e.g. a
    baseline), when the pipeline has them. A parameter shared by two roles (retriever =
    posterior) belongs to the first, trained roles coming first; parameters a component
    keeps frozen itself (LoRA's base) are left out.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        assert pipeline.estimator is not None
        self._roles = pipeline.roles()
        self.declared = pipeline.estimator.trained_roles()
        wanted = [*self.declared, "estimator"]
        self.trained = [r for r in dict.fromkeys(wanted) if r in self._roles]
        order = self.trained + [r for r in self._roles if r not in self.trained]
        seen: set[int] = set()
        self.by_role: dict[str, Named] = {role: self._collect(role, seen) for role in order}

    def _collect(self, role: str, seen: set[int]) -> Named:
        named = []
        for prefix, module in self._roles[role].trainable_modules().items():
            for name, param in module.named_parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    named.append((f"{prefix}.{name}", param))
        return named

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for role in self.trained for _, p in self.by_role[role]]

    def freeze_untrained(self) -> None:
        for role, named in self.by_role.items():
            if role not in self.trained:
                for _, param in named:
                    param.requires_grad_(False)

    def trained_components(self) -> dict[str, Any]:
        """Trained role -> component, each component once (retriever and posterior may be
        one object)."""
        unique: dict[int, str] = {}
        for role in self.trained:
            unique.setdefault(id(self._roles[role]), role)
        return {role: self._roles[role] for role in unique.values()}

    def set_mode(self, training: bool) -> None:
        """Trained modules train (dropout on); frozen ones always evaluate."""
        for role, component in self._roles.items():
            for module in component.trainable_modules().values():
                module.train(training and role in self.trained)


def build_optimizer(parameters: RoleParameters, settings: TrainConfig) -> torch.optim.AdamW:
    """AdamW, one parameter group per trained role with its learning rate; as in nanoGPT,
    weight decay applies to matrices and embeddings (dim >= 2), not to biases and norms."""
    groups = []
    for role in parameters.trained:
        params = [p for _, p in parameters.by_role[role]]
        lr = settings.lrs.get(role, settings.lr)
        for decay in (True, False):
            chosen = [p for p in params if (p.dim() >= 2) == decay]
            if chosen:
                wd = settings.weight_decay if decay else 0.0
                groups.append({"params": chosen, "lr": lr, "weight_decay": wd, "role": role})
    if not groups:
        raise TrainingError(
            f"nothing to train: the estimator trains {', '.join(parameters.declared)}, "
            "which have no trainable parameters in this pipeline"
        )
    try:  # the fused kernel is about 10x faster on CPU; not every device or dtype has it
        return torch.optim.AdamW(groups, lr=settings.lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=settings.lr)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Role -> learning rate, as the run log records it."""
    return {group["role"]: group["lr"] for group in optimizer.param_groups}
