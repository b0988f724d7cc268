"""The `topk` and `topk-token` estimator plugin: config model and hook (no torch: see
`estimator.py`)."""

from __future__ import annotations

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig


class TopKConfig(EstimatorConfig):
    candidates: CandidateSource = "prior"


@hookimpl
def register_components(register) -> None:
    register(
        "estimator",
        "topk",
        "latentrag.plugins.estimators.topk.estimator:TopKEstimator",
        TopKConfig,
        "RAG-Sequence: marginal likelihood over the prior's top-K",
    )
    register(
        "estimator",
        "topk-token",
        "latentrag.plugins.estimators.topk.estimator:TopKTokenEstimator",
        TopKConfig,
        "RAG-Token: per-token marginal over the prior's top-K",
    )
