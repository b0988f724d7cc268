"""A third-party plugin as a user would publish it: a retriever counting shared words."""

from __future__ import annotations

import re

from latentrag import hookimpl
from latentrag.core.config import StrictModel
from latentrag.core.interfaces import Retriever


class KeywordConfig(StrictModel):
    min_length: int = 3


class KeywordRetriever(Retriever):
    def __init__(self, config: KeywordConfig):
        self.config = config
        self._docs: list[set[str]] = []

    def _words(self, text: str) -> set[str]:
        return {w for w in re.findall(r"\w+", text.lower()) if len(w) >= self.config.min_length}

    def index(self, corpus) -> None:
        self._docs = [self._words(p.text) for p in corpus]

    def retrieve(self, queries, k):
        import torch

        from latentrag.core.types import Candidates

        scores = torch.tensor(
            [[float(len(self._words(q) & d)) for d in self._docs] for q in queries]
        )
        top = torch.topk(scores, k, dim=1, sorted=True)
        return Candidates(top.indices, top.values)


@hookimpl
def register_components(register):
    register("retriever", "keyword", KeywordRetriever, KeywordConfig, "Counts shared words")
