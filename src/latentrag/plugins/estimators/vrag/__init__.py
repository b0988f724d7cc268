"""The `vrag` estimator plugin: config model and hook (no torch: see `estimator.py`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig


class VragConfig(EstimatorConfig):
    candidates: CandidateSource = "posterior"
    beta: float = Field(1.0, ge=0, description="weight of KL(q || p)")
    sampled: bool = Field(False, description="estimate E_q[log p(y|x,h)] from samples of q")
    samples: int = Field(4, ge=1, description="samples of q per example when sampled")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the baseline")
    seed: int = 0

    requires: ClassVar[tuple[str, ...]] = ("retriever", "posterior", "generator")


@hookimpl
def register_components(register) -> None:
    register(
        "estimator",
        "vrag",
        "latentrag.plugins.estimators.vrag.estimator:VragEstimator",
        VragConfig,
        "Variational RAG: ELBO with posterior q(h|x,y), exact over top-K or sampled",
    )
