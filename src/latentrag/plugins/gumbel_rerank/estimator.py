"""The `gumbel` estimator: the reranker learns from the generator's LM loss through the mask."""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.interfaces import EstimatorOutput, LatentModel
from latentrag.core.types import Batch
from latentrag.plugins.estimators.common import SeededEstimator, generator_forwards
from latentrag.plugins.gumbel_rerank import GumbelEstimatorConfig
from latentrag.plugins.gumbel_rerank.masks import relaxed_log_mask


class GumbelEstimator(SeededEstimator):
    """G-Rerank: loss = -mean_b log p(y_b | x_b, candidates_b, log M_b) with
    M = relaxed top-k mask of the reranker's scores; only the reranker learns by default.

    `temperature` (of the shared estimator keys) is unused: the reranker's scores enter
    the mask through kappa and tau. The Gumbel noise comes from the estimator's own
    seeded stream, checkpointed with it.
    """

    requires = GumbelEstimatorConfig.requires

    def __init__(self, config: GumbelEstimatorConfig) -> None:
        super().__init__(config.seed)
        self.config = config
        self.trains = ("reranker", "generator") if config.train_generator else ("reranker",)

    def extra_state(self) -> dict:
        return {"rng": self.rng_state()}

    def load_extra_state(self, state: dict) -> None:
        if "rng" in state:
            self.load_rng_state(state["rng"])

    def log_mask(self, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        cfg = self.config
        return relaxed_log_mask(
            cfg.relaxation, scores, cfg.k_keep, cfg.tau, cfg.kappa, self.rng, valid
        )

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        start = generator_forwards(model)
        cand = model.candidates(batch, self.config.candidates, self.config.k)
        scores = model.rerank_scores(batch, cand)
        log_mask = self.log_mask(scores, cand.mask)
        loglik = model.joint_loglik(batch, cand, log_mask)
        forwards = generator_forwards(model) - start
        diagnostics = mask_diagnostics(log_mask.detach(), cand.mask)
        diagnostics["joint_loglik"] = float(loglik.detach().mean())
        return EstimatorOutput(
            loss=-loglik.mean(),
            diagnostics=diagnostics,
            generator_forwards=forwards,
            generator_backwards=forwards if torch.is_grad_enabled() else 0,
        )


def mask_diagnostics(log_mask: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Mean entropy of the normalised mask M / sum M (nats) and mean of max_i M_i."""
    mask = log_mask.exp()
    if valid is not None:
        mask = mask * valid
    share = mask / mask.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)
    return {"mask_entropy": float(entropy.mean()), "mask_max": float(mask.max(-1).values.mean())}
