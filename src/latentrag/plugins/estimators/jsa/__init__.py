"""The `jsa` estimator plugin: config model and hook (no torch: see `estimator.py`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig


class JsaConfig(EstimatorConfig):
    """JSA's candidate set is a pool: the prior's and the posterior's top `k`, the prior and
    q renormalised over their union. Its bias falls toward 0 as the pool grows (measured by
    `latentrag gradcheck`, docs/estimators.md: relative retriever-block bias² 0.72 at k = 4,
    0.30 at 8, 0.08 at 16, 0.013 at 32, 0.003 at 64) while the generator passes per example
    barely move (4.9 -> 6.6), because only the proposals are scored. Hence the default
    k = 32, clipped to the corpus size; `candidates = "corpus"` is the unbiased limit."""

    k: int = Field(32, ge=1, description="pool: top-k of the prior and of the posterior")
    candidates: CandidateSource = "union"
    samples: int = Field(4, ge=1, description="proposals h' ~ q per example and step")
    chain: Literal["persistent", "fresh"] = Field(
        "persistent", description="persistent: classical JSA; fresh: the released code"
    )
    seed: int = 0

    requires: ClassVar[tuple[str, ...]] = ("retriever", "posterior", "generator")


@hookimpl
def register_components(register) -> None:
    register(
        "estimator",
        "jsa",
        "latentrag.plugins.estimators.jsa.estimator:JsaEstimator",
        JsaConfig,
        "Joint stochastic approximation: Metropolis independence sampler + M-step",
    )
