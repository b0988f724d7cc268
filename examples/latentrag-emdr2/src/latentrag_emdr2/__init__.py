"""EMDR²: expectation-maximisation with the reader's likelihood as the retriever's target.

Retriever loss: -log Σ_k p(h_k|x) SG[p(y|x,h_k)] over the prior's top-K (SG = stop-gradient:
the reader's likelihoods weight the passages but receive no gradient from this term).
Reader loss: -log p(y|x, h_1..h_K) reading all K passages at once (``reader = "joint"``, for
generators with ``loglik_joint``), or the mean of -log p(y|x,h_k) over the top-K
(``reader = "per-passage"``, any generator).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.core.interfaces import Estimator, EstimatorOutput, LatentModel
from latentrag.core.types import Batch

__version__ = "0.1.0"


class Emdr2Config(StrictModel):
    k: int = Field(8, ge=1, description="passages retrieved by the prior")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of p(h|x)")
    reader: Literal["per-passage", "joint"] = "per-passage"
    reader_weight: float = Field(1.0, ge=0)


class Emdr2Estimator(Estimator):
    trains = ("retriever", "generator")
    exact = False  # the retriever is fit to stop-gradient likelihoods: biased by design

    def __init__(self, config: Emdr2Config) -> None:
        self.config = config

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        import torch  # here, not at the top: `latentrag components` imports plugins

        cfg = self.config
        cand = model.candidates(batch, "prior", cfg.k)
        log_prior = model.prior_logprobs(batch, cand, cfg.temperature)
        loglik = model.loglik(batch, cand)
        retriever_loss = -torch.logsumexp(log_prior + loglik.detach(), dim=-1).mean()
        if cfg.reader == "joint":
            no_bias = torch.zeros(cand.indices.shape)
            reader_loss = -model.joint_loglik(batch, cand, no_bias).mean()
        else:
            valid = cand.valid()
            per_passage = torch.where(valid, loglik, 0.0).sum(-1) / valid.sum(-1)
            reader_loss = -per_passage.mean()
        return EstimatorOutput(
            loss=retriever_loss + cfg.reader_weight * reader_loss,
            diagnostics={
                "retriever_loss": float(retriever_loss.detach()),
                "reader_loss": float(reader_loss.detach()),
            },
        )


@hookimpl
def register_components(register):
    register(
        "estimator",
        "emdr2",
        Emdr2Estimator,
        Emdr2Config,
        "EMDR2: retriever fit to the reader's stop-gradient likelihoods (example plugin)",
    )
