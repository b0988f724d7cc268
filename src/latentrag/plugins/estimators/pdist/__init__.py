"""PDist: Atlas's perplexity distillation (REPLUG's LM-supervised retrieval), light spec.

Only pydantic here: the estimator itself (torch) is in `estimator.py`, imported when built.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig

GeneratorLoss = Literal["none", "marginal", "per-passage"]


class PdistConfig(EstimatorConfig):
    """`temperature` is γ of the retriever's softmax(s/γ) over the top-K; `beta` that of the
    target softmax(log p(y|x,h)/β). train_generator: "none" (Atlas, REPLUG: only the
    retriever learns), "marginal" adds -log Σ_k p̄_k p(y|x,h_k), "per-passage" adds
    -Σ_k p̄_k log p(y|x,h_k), p̄ the retriever's distribution with its gradient stopped."""

    candidates: CandidateSource = "prior"
    beta: float = Field(1.0, gt=0, description="temperature of the target softmax(log p(y|x,h)/β)")
    train_generator: GeneratorLoss = Field("none", description="the generator's own loss, if any")

    requires: ClassVar[tuple[str, ...]] = ("retriever", "generator")


@hookimpl
def register_components(register):
    register(
        "estimator",
        "pdist",
        "latentrag.plugins.estimators.pdist.estimator:PdistEstimator",
        PdistConfig,
        "Perplexity distillation (Atlas PDist / REPLUG-LSR): KL to softmax(log p(y|x,h)/β)",
    )
