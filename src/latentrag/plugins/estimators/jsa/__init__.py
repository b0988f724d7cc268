"""The `jsa` estimator plugin: config model and hook (no torch: see `estimator.py`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from latentrag import hookimpl
from latentrag.plugins.estimators.config import CandidateSource, EstimatorConfig


class JsaConfig(EstimatorConfig):
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
