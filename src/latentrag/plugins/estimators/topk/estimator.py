"""Top-K marginal likelihood estimators: RAG-Sequence ("topk") and RAG-Token ("topk-token")."""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.interfaces import Estimator, EstimatorOutput, LatentModel
from latentrag.core.types import Batch
from latentrag.plugins.estimators.common import generator_forwards, valid_mask
from latentrag.plugins.estimators.topk import TopKConfig


class TopKEstimator(Estimator):
    """RAG-Sequence: loss = -mean_b log Σ_{h∈cand} p(h|x) p(y|x,h).

    p(h|x) is softmax(score/temperature) normalised over the candidate set (temperature 0.1
    by default, as the JSA-RAG released code). Biased: passages outside the candidate set
    are ignored and the prior is renormalised over the set; with candidates = "corpus" it is
    the exact marginal likelihood and its exact gradient.
    """

    trains = ("retriever", "generator")

    def __init__(self, config: TopKConfig) -> None:
        self.config = config

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        log_prior = model.prior_logprobs(batch, cand, cfg.temperature)
        loglik = model.loglik(batch, cand, reduce=cfg.loglik)
        # padded slots: -inf + 0 = -inf, which logsumexp ignores (value and gradient)
        log_marginal = torch.logsumexp(log_prior + loglik, dim=-1)
        forwards = generator_forwards(model) - start
        return EstimatorOutput(
            loss=-log_marginal.mean(),
            diagnostics={"log_marginal": float(log_marginal.detach().mean())},
            generator_forwards=forwards,
            generator_backwards=forwards if torch.is_grad_enabled() else 0,
        )


class TopKTokenEstimator(TopKEstimator):
    """RAG-Token: loss = -mean_b Σ_t log Σ_{h∈cand} p(h|x) p(y_t|x,h,y_<t).

    The passage is marginalised separately at every answer token. Same candidate-set bias
    as RAG-Sequence; with loglik = "mean" the token sum is divided by the answer length.
    """

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        log_prior = model.prior_logprobs(batch, cand, cfg.temperature)
        token_logprobs, target_mask = model.token_logprobs(batch, cand)
        target_mask = target_mask.bool()
        per_token = token_marginals(log_prior, token_logprobs, valid_mask(log_prior, cand.mask))
        per_example = torch.where(target_mask, per_token, 0.0).sum(-1)
        if cfg.loglik == "mean":
            per_example = per_example / target_mask.sum(-1).clamp(min=1)
        forwards = generator_forwards(model) - start
        return EstimatorOutput(
            loss=-per_example.mean(),
            diagnostics={"log_marginal": float(per_example.detach().mean())},
            generator_forwards=forwards,
            generator_backwards=forwards if torch.is_grad_enabled() else 0,
        )


def token_marginals(log_prior: Tensor, token_logprobs: Tensor, valid: Tensor) -> Tensor:
    """log Σ_h p(h|x) p(y_t|x,h,y_<t) per token: [B,K] and [B,K,T] -> [B,T].

    Padded candidates are excluded explicitly (their token log-probs are arbitrary numbers).
    """
    joint = log_prior.unsqueeze(-1) + token_logprobs
    joint = torch.where(valid.unsqueeze(-1), joint, float("-inf"))
    return torch.logsumexp(joint, dim=1)
