"""The config keys every builtin estimator understands (pydantic only: no torch import)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from latentrag.core.config import StrictModel

CandidateSource = Literal["prior", "posterior", "union", "corpus"]


class EstimatorConfig(StrictModel):
    """Keys every estimator understands.

    temperature: 0.1 by default, as in the JSA-RAG authors' released code (scores are
    divided by it before the softmax over the candidate set). loglik: "sum" is the sequence
    log-probability log p(y|x,h); "mean" is the released code's per-token mean.
    """

    k: int = Field(8, ge=1, description="candidates per retriever")
    candidates: CandidateSource = Field("prior", description="where the candidate set comes from")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of p(h|x), q(h|x,y)")
    loglik: Literal["sum", "mean"] = Field("sum", description="sequence log-prob or token mean")

    #: config sections the estimator needs (read at config time, before any import of torch)
    requires: ClassVar[tuple[str, ...]] = ("retriever", "generator")
