"""LOOP: Atlas's leave-one-out perplexity distillation, light spec.

Only pydantic here: the estimator itself (torch) is in `estimator.py`, imported when built.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig


class LoopConfig(EstimatorConfig):
    """`temperature` is γ of the retriever's softmax(s/γ) over the top-K; `beta` that of the
    target softmax(-log p(y|x, top-K without h_k)/β).

    reader: "mixture" scores each passage alone and reads a set S as the mixture
    p(y|x,S) = Σ_{j∈S} w_j p(y|x,h_j) / Σ_{j∈S} w_j, with w uniform (as Atlas's reader, which
    does not see the retriever's scores) or the retriever's distribution (gradient stopped);
    "joint" reads the K-1 passages at once (Atlas's Fusion-in-Decoder reading), which needs
    a generator with `loglik_joint` and scores whole sequences (loglik = "sum").
    """

    k: int = Field(8, ge=2, description="candidates per retriever (leaving one out needs 2)")
    candidates: CandidateSource = "prior"
    beta: float = Field(1.0, gt=0, description="temperature of the leave-one-out target")
    reader: Literal["mixture", "joint"] = Field("mixture", description="how a passage set is read")
    weights: Literal["uniform", "prior"] = Field("uniform", description="mixture reader's weights")

    requires: ClassVar[tuple[str, ...]] = ("retriever", "generator")

    @model_validator(mode="after")
    def _joint_reads_sequences(self) -> LoopConfig:
        if self.reader == "joint" and self.loglik != "sum":
            raise ValueError("reader = 'joint' scores whole sequences: set loglik = 'sum'")
        if self.reader == "joint" and self.weights != "uniform":
            raise ValueError("reader = 'joint' reads the passages uniformly: weights = 'uniform'")
        return self


@hookimpl
def register_components(register):
    register(
        "estimator",
        "loop",
        "latentrag.plugins.estimators.loop.estimator:LoopEstimator",
        LoopConfig,
        "Leave-one-out perplexity distillation (Atlas LOOP): KL to the loss rise without h_k",
    )
