"""PDist: the retriever's distribution over its top-K is fitted to the generator's.

Atlas (Izacard et al. 2022, "perplexity distillation") and REPLUG's LM-supervised
retrieval: KL(target || retriever) with target = softmax(log p(y|x,h)/β) computed under
stop-gradient, retriever = softmax(s/γ) over the same candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.interfaces import Estimator, EstimatorOutput, LatentModel
from latentrag.core.types import Batch
from latentrag.plugins.estimators.common import (
    entropy,
    expectation,
    generator_forwards,
    kl_divergence,
    valid_mask,
)
from latentrag.plugins.estimators.pdist import PdistConfig


def target_logprobs(logits: Tensor, valid: Tensor) -> Tensor:
    """log softmax of detached target logits [B,K] over the valid slots (-inf at padding)."""
    logits = torch.where(valid, logits.detach(), torch.full_like(logits, float("-inf")))
    return torch.log_softmax(logits, dim=-1)


def distillation(log_retriever: Tensor, log_target: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """KL(target || retriever) per example [B] (differentiable in the retriever only) and the
    target's entropy [B]. The KL's gradient w.r.t. the scores s is (softmax(s/γ) - target)/γ."""
    return {
        "kl": kl_divergence(log_target, log_retriever, valid),
        "target_entropy": entropy(log_target, valid),
    }


def generator_loss(kind: str, log_retriever: Tensor, loglik: Tensor, valid: Tensor) -> Tensor:
    """The generator's own loss [B], weighted by the retriever with its gradient stopped."""
    weights = log_retriever.detach()
    if kind == "marginal":
        return -torch.logsumexp(weights + loglik, dim=-1)  # padding: -inf + 0 drops out
    return -expectation(weights, loglik, valid)


class PdistEstimator(Estimator):
    """loss = mean_b KL(softmax(log p(y|x,h)/β) || softmax(s/γ)) over the top-K candidates.

    Only the retriever learns unless train_generator names the generator's loss, added to
    the KL. Biased by design: the target is the posterior under a uniform prior over the
    top-K (Atlas), not the marginal-likelihood gradient, and passages outside the top-K are
    never seen. One generator forward per candidate, no backward unless the generator trains.
    """

    exact = False
    requires = ("retriever", "generator")

    def __init__(self, config: PdistConfig) -> None:
        self.config = config
        trains_generator = config.train_generator != "none"
        self.trains = ("retriever", "generator") if trains_generator else ("retriever",)

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        trains_generator = cfg.train_generator != "none"
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        log_retriever = model.prior_logprobs(batch, cand, cfg.temperature)
        valid = valid_mask(log_retriever, cand.mask)
        loglik = model.loglik(batch, cand, cfg.loglik, grad=trains_generator)
        log_target = target_logprobs(loglik / cfg.beta, valid)
        parts = distillation(log_retriever, log_target, valid)
        loss = parts["kl"]
        diagnostics = {key: float(value.detach().mean()) for key, value in parts.items()}
        if trains_generator:
            own = generator_loss(cfg.train_generator, log_retriever, loglik, valid)
            loss = loss + own
            diagnostics["generator_loss"] = float(own.detach().mean())
        forwards = generator_forwards(model) - start
        backwards = forwards if trains_generator and torch.is_grad_enabled() else 0
        return EstimatorOutput(
            loss=loss.mean(),
            diagnostics=diagnostics,
            generator_forwards=forwards,
            generator_backwards=backwards,
        )
