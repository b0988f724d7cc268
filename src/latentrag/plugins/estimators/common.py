"""What the estimators share: the common config keys and mask-safe math over candidate sets.

Padded candidate slots hold log-probability -inf and log-likelihood 0. Every helper here
keeps them out of the arithmetic with `torch.where` on *sanitised* inputs, so that neither
the values nor the gradients ever see `0 * -inf` (NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.interfaces import Estimator, LatentModel
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig

__all__ = ["CandidateSource", "EstimatorConfig", "SeededEstimator"]


class SeededEstimator(Estimator):
    """An estimator that draws random numbers from its own generator (reproducible runs)."""

    def __init__(self, seed: int) -> None:
        self.rng = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random stream (gradcheck does this once per seed)."""
        self.rng.manual_seed(seed)

    def rng_state(self) -> list[int]:
        return self.rng.get_state().tolist()

    def load_rng_state(self, state: list[int]) -> None:
        self.rng.set_state(torch.tensor(state, dtype=torch.uint8))


def valid_mask(logprobs: Tensor, mask: Tensor | None) -> Tensor:
    """The candidate mask, all True when the set has no padding."""
    if mask is None:
        return torch.ones_like(logprobs, dtype=torch.bool)
    return mask


def sanitise(values: Tensor, valid: Tensor) -> Tensor:
    """Values with padded slots set to 0, so that products and differences stay finite."""
    return torch.where(valid, values, torch.zeros_like(values))


def expectation(logq: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """Σ_h q(h) values(h) over the valid slots: [B,K] -> [B]; differentiable in both."""
    q = torch.exp(logq)
    return torch.where(valid, q * sanitise(values, valid), torch.zeros_like(q)).sum(-1)


def kl_divergence(logq: Tensor, logp: Tensor, valid: Tensor) -> Tensor:
    """KL(q || p) = Σ_h q(h) (log q(h) - log p(h)) over the valid slots: [B]."""
    return expectation(logq, sanitise(logq, valid) - sanitise(logp, valid), valid)


def entropy(logq: Tensor, valid: Tensor) -> Tensor:
    """-Σ_h q(h) log q(h) over the valid slots: [B]."""
    return -expectation(logq, logq, valid)


def weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """Σ_h w_h values(h) where w_h > 0 (unvisited slots may hold -inf): [B,K] -> [B]."""
    visited = weights > 0
    return torch.where(visited, weights * sanitise(values, visited), 0.0).sum(-1)


def generator_forwards(model: LatentModel) -> int:
    """The pipeline's running count of generator forwards (0 for a model without one)."""
    return model.generator_forwards
