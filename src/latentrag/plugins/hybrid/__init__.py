"""The `hybrid` retriever plugin: fuses the rankings of any registered retrievers.

Its config model and hook only (no torch: see `retriever.py`)::

    [retriever]
    name = "hybrid"
    fusion = "rrf"            # or "weighted"
    [[retriever.retrievers]]
    name = "bm25"
    [[retriever.retrievers]]
    name = "dpr"
    model = "minilm"
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from latentrag import hookimpl
from latentrag.core.config import RetrieverRef, StrictModel


class HybridConfig(StrictModel):
    """Options of the `hybrid` retriever.

    fusion "rrf" (reciprocal rank fusion): score(p) = Σ_i w_i / (rrf_k + rank_i(p)) over the
    retrievers whose top `depth` holds p. fusion "weighted": score(p) = Σ_i w_i s_i(q, p),
    the retrievers' own scores (every one must implement score()), for the passages in the
    union of their top `depth`; differentiable, so trainable retrievers inside can train.
    """

    retrievers: list[RetrieverRef] = Field(
        default_factory=lambda: [RetrieverRef(name="bm25"), RetrieverRef(name="dpr")],
        min_length=1,
        description="the retrievers fused (default: bm25 and dpr)",
    )
    fusion: Literal["rrf", "weighted"] = "rrf"
    rrf_k: int = Field(60, ge=0, description="rank offset of reciprocal rank fusion")
    weights: list[float] | None = Field(None, description="one per retriever (default 1 each)")
    depth: int = Field(100, ge=1, description="passages taken from each retriever's ranking")

    @model_validator(mode="after")
    def _one_weight_each(self) -> HybridConfig:
        if self.weights is not None and len(self.weights) != len(self.retrievers):
            raise ValueError(
                f"weights has {len(self.weights)} values for {len(self.retrievers)} retrievers"
            )
        return self

    def weight_list(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.retrievers)


@hookimpl
def register_components(register) -> None:
    register(
        "retriever",
        "hybrid",
        "latentrag.plugins.hybrid.retriever:build_hybrid",
        HybridConfig,
        "Fusion of any retrievers' rankings: reciprocal rank (rrf) or weighted scores",
    )
