"""The `bow` retriever plugin: its config model and hook (no torch: see `retriever.py`)."""

from __future__ import annotations

from pydantic import Field

from latentrag import hookimpl
from latentrag.core.config import StrictModel


class BowConfig(StrictModel):
    buckets: int = Field(2048, ge=1, description="hash buckets of the vocabulary")
    dim: int = Field(32, ge=1, description="embedding size")
    shared: bool = Field(False, description="one encoder for queries and passages")
    seed: int = 0


@hookimpl
def register_components(register) -> None:
    register(
        "retriever",
        "bow",
        "latentrag.plugins.bow.retriever:BowRetriever",
        BowConfig,
        "Tiny trainable bag-of-embeddings dual encoder (tests, gradcheck)",
    )
