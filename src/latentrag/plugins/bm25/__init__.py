"""The `bm25` retriever plugin: its config model and hook (no torch: see `retriever.py`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.plugins.bm25.tokenize import Tokenizer


class BM25Config(StrictModel):
    """Options of the `bm25` retriever (defaults are rank-bm25's BM25Okapi)."""

    k1: float = Field(1.5, ge=0)
    b: float = Field(0.75, ge=0, le=1)
    epsilon: float = 0.25
    lowercase: bool = True
    pattern: str = r"\w+"
    stem: bool = False
    stopwords: bool = False
    index_dir: str | None = Field(None, description="load the index from here, or build and save")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.lowercase, self.pattern, self.stem, self.stopwords)

    def index_settings(self) -> dict[str, object]:
        """Everything the stored weights depend on besides the corpus."""
        return {
            "k1": self.k1,
            "b": self.b,
            "epsilon": self.epsilon,
            "tokenizer": self.tokenizer().signature(),
        }


@hookimpl
def register_components(register) -> None:
    register(
        "retriever",
        "bm25",
        "latentrag.plugins.bm25.retriever:BM25Retriever",
        BM25Config,
        "BM25Okapi (rank-bm25 formula), exact top-k with dynamic pruning",
    )
