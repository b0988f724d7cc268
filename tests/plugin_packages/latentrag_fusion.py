"""A third-party wrapper retriever: reciprocal-rank fusion of two registered retrievers.

Written as a plugin author would, against latentrag's public contracts only. The config
names the two inner retrievers with `RetrieverRef` fields, so ``[retriever.first]`` and
``[retriever.second]`` are checked by those retrievers' own config models (an error names
its full path, e.g. ``retriever.second.modle: unknown key``), against whichever registry
resolves the config. The factory takes a second parameter, the `BuildContext`, and builds
the inner retrievers through it. Only pydantic is imported here; torch when retrieving.
"""

from __future__ import annotations

from pydantic import Field

from latentrag import hookimpl
from latentrag.core.config import BuildContext, RetrieverRef, StrictModel
from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Retriever


class FusionConfig(StrictModel):
    first: RetrieverRef
    second: RetrieverRef
    depth: int = Field(20, ge=1, description="passages each inner retriever ranks")
    constant: float = Field(60.0, gt=0, description="c in the fused score sum 1 / (c + rank)")


class FusionRetriever(Retriever):
    """Scores a passage by Σ 1 / (c + its rank) over the two inner rankings (RRF).

    Ranks are not differentiable, so the fusion itself is frozen (no trainable modules)."""

    def __init__(self, config: FusionConfig, first: Retriever, second: Retriever) -> None:
        self.config = config
        self.inner = (first, second)
        self.size = 0

    def index(self, corpus) -> None:
        self.size = len(corpus)
        for retriever in self.inner:
            retriever.index(corpus)

    def build(self, corpus) -> None:
        self.size = len(corpus)
        for retriever in self.inner:
            retriever.build(corpus)

    def refresh(self) -> None:
        for retriever in self.inner:
            retriever.refresh()

    def retrieve(self, queries, k):
        import torch

        from latentrag.core.types import Candidates

        if k > self.size:
            raise LatentragError(f"k={k} is larger than the corpus ({self.size} passages)")
        depth = min(self.size, max(k, self.config.depth))
        fused = torch.zeros(len(queries), self.size, dtype=torch.float64)
        ranks = torch.arange(1, depth + 1, dtype=torch.float64).expand(len(queries), -1)
        for retriever in self.inner:
            found = retriever.retrieve(queries, depth)
            fused.scatter_add_(1, found.indices, 1.0 / (self.config.constant + ranks))
        top = torch.topk(fused.float(), k, dim=1, sorted=True)
        return Candidates(top.indices, top.values)


def build_fusion(config: FusionConfig, context: BuildContext) -> FusionRetriever:
    """The factory: the inner retrievers come from the registry that resolved the config."""
    return FusionRetriever(config, context.build(config.first), context.build(config.second))


@hookimpl
def register_components(register):
    register(
        "retriever",
        "fusion",
        build_fusion,
        FusionConfig,
        "Reciprocal-rank fusion of two retrievers",
    )
