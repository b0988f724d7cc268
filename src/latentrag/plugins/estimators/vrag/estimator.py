"""Variational RAG: maximise the ELBO with a posterior retriever q(h|x,y)."""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.interfaces import EstimatorOutput, LatentModel
from latentrag.core.types import Batch, Candidates
from latentrag.plugins.estimators.common import (
    SeededEstimator,
    entropy,
    expectation,
    generator_forwards,
    kl_divergence,
    valid_mask,
)
from latentrag.plugins.estimators.vrag import VragConfig


class VragEstimator(SeededEstimator):
    """loss = -mean_b ELBO, ELBO = Σ_h q(h) log p(y|x,h) - beta Σ_h q(h) (log q(h) - log p(h)).

    p(h|x) and q(h|x,y) are softmax(score/temperature) normalised over the candidate set
    (temperature 0.1 by default, as the JSA-RAG released code). Exact mode (the released
    code): both sums run over the set, gradient to q through the sum. Sampled mode: the
    expectation is the mean over S draws h ~ q with a score-function gradient
    (f(h) - baseline) ∇log q(h), f = log p(y|x,h) detached, baseline an exponential moving
    average of f (initialised from the first batch's mean); the KL stays exact. Biased: the
    ELBO is a lower bound of the set's log-likelihood, tight only when q is the posterior,
    and passages outside the candidate set are ignored.
    """

    trains = ("retriever", "posterior", "generator")
    requires = VragConfig.requires

    def __init__(self, config: VragConfig) -> None:
        super().__init__(config.seed)
        self.config = config
        self.baseline: float | None = None

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        log_prior = model.prior_logprobs(batch, cand, cfg.temperature)
        log_q = model.posterior_logprobs(batch, cand, cfg.temperature)
        valid = valid_mask(log_q, cand.mask)
        kl = kl_divergence(log_q, log_prior, valid)
        if cfg.sampled:
            surrogate, expected_loglik = self._sampled_term(batch, model, cand, log_q)
        else:
            expected_loglik = expectation(log_q, model.loglik(batch, cand, cfg.loglik), valid)
            surrogate = expected_loglik
        elbo = expected_loglik.detach() - cfg.beta * kl.detach()
        forwards = generator_forwards(model) - start
        return EstimatorOutput(
            loss=-(surrogate - cfg.beta * kl).mean(),
            diagnostics={
                "elbo": float(elbo.mean()),
                "kl": float(kl.detach().mean()),
                "entropy": float(entropy(log_q.detach(), valid).mean()),
            },
            generator_forwards=forwards,
            generator_backwards=forwards if torch.is_grad_enabled() else 0,
        )

    def _sampled_term(
        self, batch: Batch, model: LatentModel, cand: Candidates, log_q: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(surrogate whose gradient is the REINFORCE estimate, sample mean of f) per example."""
        draws = torch.multinomial(
            log_q.detach().exp(), self.config.samples, replacement=True, generator=self.rng
        )
        loglik = model.rows_loglik(batch, cand.indices.gather(1, draws), self.config.loglik)
        f = loglik.detach()
        baseline = self.baseline if self.baseline is not None else float(f.mean())
        self.baseline = self.config.baseline_decay * baseline + (
            1 - self.config.baseline_decay
        ) * float(f.mean())
        score_function = (f - baseline) * log_q.gather(1, draws)
        return (loglik + score_function).mean(-1), f.mean(-1)

    def extra_state(self) -> dict:
        return {"baseline": self.baseline, "rng": self.rng_state()}

    def load_extra_state(self, state: dict) -> None:
        self.baseline = state.get("baseline")
        if "rng" in state:
            self.load_rng_state(state["rng"])
