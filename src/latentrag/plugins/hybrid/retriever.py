"""The `hybrid` retriever: reciprocal-rank or weighted-score fusion of inner retrievers.

Each inner retriever is built from its `RetrieverRef` by the `BuildContext`, indexes the
corpus itself and keeps its own index (its own `index_dir`). `retrieve(k)` takes each inner
retriever's top max(k, depth) and fuses them (see `HybridConfig`); ties go to the lower
corpus row. `score(rows)` gives the fused score of given rows, consistent with `retrieve`:
for rrf, a row's rank in each inner top max(K, depth) (absent: no contribution); for
weighted, Σ w_i s_i. On a closed candidate list (`retrieve_within`, used by the pipeline)
rrf fuses each retriever's ranking of the list itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from latentrag.core.config import BuildContext
from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import pad_ranked, pad_rows, retrieve_within
from latentrag.core.registry import default_registry
from latentrag.core.types import Candidates, Corpus
from latentrag.plugins.hybrid import HybridConfig


def build_hybrid(config: HybridConfig, context: BuildContext | None) -> HybridRetriever:
    """The factory: builds every inner retriever through the context (by default, one
    over the default registry)."""
    context = context or BuildContext(default_registry())
    return HybridRetriever(config, [context.build(ref) for ref in config.retrievers])


def _ranks(found: Candidates) -> list[dict[int, int]]:
    """Per query: corpus row -> rank (from 1) among the valid retrieved rows."""
    ranks = []
    for rows, oks in zip(found.indices.tolist(), found.valid().tolist()):
        valid = [r for r, ok in zip(rows, oks) if ok]
        ranks.append({row: rank for rank, row in enumerate(valid, start=1)})
    return ranks


class HybridRetriever(Retriever):
    """Fuses the rankings of its inner retrievers (not trainable with rrf)."""

    def __init__(self, config: HybridConfig, retrievers: Sequence[Retriever]) -> None:
        if len(retrievers) != len(config.retrievers):
            raise LatentragError("hybrid: one built retriever per configured one is needed")
        self.config = config
        self.retrievers = list(retrievers)
        self.weights = config.weight_list()
        self._size = 0

    # -- indexing ---------------------------------------------------------------------------

    def index(self, corpus: Corpus) -> None:
        for retriever in self.retrievers:
            retriever.index(corpus)
        self._size = len(corpus)

    def build(self, corpus: Corpus) -> None:
        for retriever in self.retrievers:
            retriever.build(corpus)
        self._size = len(corpus)

    def refresh(self) -> None:
        for retriever in self.retrievers:
            retriever.refresh()

    def save(self, directory: Path) -> None:
        """Each inner retriever's index in its own subfolder `<i>-<name>`."""
        for folder, retriever in zip(self._folders(directory), self.retrievers):
            folder.mkdir(parents=True, exist_ok=True)
            retriever.save(folder)

    def load(self, directory: Path, corpus: Corpus | None = None) -> None:
        """Load each inner retriever's saved index; one that saved nothing indexes `corpus`."""
        for folder, retriever in zip(self._folders(directory), self.retrievers):
            if folder.is_dir() and any(folder.iterdir()):
                retriever.load(folder, corpus)
            elif corpus is not None:
                retriever.index(corpus)
        if corpus is not None:
            self._size = len(corpus)

    def _folders(self, directory: Path) -> list[Path]:
        names = [ref.name for ref in self.config.retrievers]
        return [Path(directory) / f"{i}-{name}" for i, name in enumerate(names)]

    # -- weights (weighted fusion trains its inner retrievers) --------------------------------

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.config.fusion != "weighted":
            return {}
        return {
            f"{i}.{name}": module
            for i, retriever in enumerate(self.retrievers)
            for name, module in retriever.trainable_modules().items()
        }

    def state_dict(self) -> dict[str, Tensor]:
        if self.config.fusion != "weighted":
            return {}
        return {
            f"{i}.{key}": value
            for i, retriever in enumerate(self.retrievers)
            for key, value in retriever.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i, retriever in enumerate(self.retrievers):
            own = {k[len(f"{i}.") :]: v for k, v in state.items() if k.startswith(f"{i}.")}
            if own:
                retriever.load_state_dict(own)

    # -- searching --------------------------------------------------------------------------

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self._size:
            raise LatentragError(f"hybrid: k = {k} must be between 1 and the corpus size")

    def _depth(self, width: int) -> int:
        return min(self._size, max(width, self.config.depth))

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        self._check_k(k)
        queries = list(queries)
        found = [r.retrieve(queries, self._depth(k)) for r in self.retrievers]
        if self.config.fusion == "rrf":
            fused = self._rrf([_ranks(f) for f in found])
            return self._top(fused, k)
        union = [list(dict.fromkeys(row for ranks in per_query for row in ranks))
                 for per_query in zip(*[_ranks(f) for f in found])]  # fmt: skip
        rows = pad_rows(union)
        scores = self._weighted(queries, rows.indices).detach()
        fused = [
            {row: float(s) for row, s, ok in zip(r, sc, v) if ok}
            for r, sc, v in zip(rows.indices.tolist(), scores.tolist(), rows.valid().tolist())
        ]
        return self._top(fused, k)

    def score(self, queries: Sequence[str], passage_rows: Tensor) -> Tensor:
        """Fused scores [B,K] of the given rows (see the module docstring)."""
        queries = list(queries)
        if self.config.fusion == "weighted":
            return self._weighted(queries, passage_rows)
        depth = self._depth(passage_rows.shape[1])
        fused = self._rrf([_ranks(r.retrieve(queries, depth)) for r in self.retrievers])
        values = [
            [per_query.get(row, 0.0) for row in rows]
            for per_query, rows in zip(fused, passage_rows.tolist())
        ]
        return torch.tensor(values, dtype=torch.float)

    def retrieve_within(self, queries: Sequence[str], rows: Sequence[Sequence[int]], k: int):
        """The best k of each query's own candidate rows: rrf fuses each retriever's ranking
        of the list itself; weighted scores the list."""
        queries, lists = list(queries), [list(r) for r in rows]
        if self.config.fusion == "weighted":
            padded = pad_rows(lists)
            scores = self._weighted(queries, padded.indices).detach()
            valid = padded.valid().tolist()
            fused = [
                {row: float(s) for row, s, ok in zip(r, sc, v) if ok}
                for r, sc, v in zip(padded.indices.tolist(), scores.tolist(), valid)
            ]
            return self._top(fused, k)
        width = max(len(r) for r in lists)
        ranked = [
            _ranks(retrieve_within(r, queries, lists, width, self._size)) for r in self.retrievers
        ]
        return self._top(self._rrf(ranked), k)

    def _rrf(self, ranks: list[list[dict[int, int]]]) -> list[dict[int, float]]:
        """Per query: row -> Σ_i w_i / (rrf_k + rank_i(row)) over the rankings holding it."""
        fused: list[dict[int, float]] = [{} for _ in ranks[0]]
        for weight, per_retriever in zip(self.weights, ranks):
            for scores, ranking in zip(fused, per_retriever):
                for row, rank in ranking.items():
                    scores[row] = scores.get(row, 0.0) + weight / (self.config.rrf_k + rank)
        return fused

    def _weighted(self, queries: list[str], rows: Tensor) -> Tensor:
        total: Tensor | None = None
        for weight, retriever in zip(self.weights, self.retrievers):
            try:
                part = weight * retriever.score(queries, rows).float()
            except NotImplementedError:
                raise LatentragError(
                    f"hybrid: fusion = 'weighted' needs score() from every retriever; "
                    f"{type(retriever).__name__} has none (use fusion = 'rrf')"
                ) from None
            total = part if total is None else total + part.to(total.device)
        assert total is not None
        return total

    @staticmethod
    def _top(fused: list[dict[int, float]], k: int) -> Candidates:
        """The k best rows per query by fused score (ties: the lower row), padded."""
        rows, scores = [], []
        for per_query in fused:
            best = sorted(per_query.items(), key=lambda item: (-item[1], item[0]))[:k]
            rows.append([row for row, _ in best])
            scores.append([score for _, score in best])
        return pad_ranked(rows, scores)
