"""The builtin `hybrid` retriever: reciprocal-rank and weighted-score fusion of retrievers
built through the nested-component contract; the conformance kit; hand-computed fusion."""

from __future__ import annotations

import pytest
import torch

from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import retrieve_within
from latentrag.core.types import Candidates, Corpus, Passage
from latentrag.plugins.hybrid import HybridConfig
from latentrag.plugins.hybrid.retriever import HybridRetriever
from latentrag.testing.checks import check_config_round_trip, check_retriever

CORPUS = Corpus(Passage(p, f"text {p}") for p in "ABCD")


class Fixed(Retriever):
    """Ranks the corpus in a fixed order (rows), scores 10, 9, 8..."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def index(self, corpus: Corpus) -> None:
        pass

    def retrieve(self, queries, k):
        rows = torch.tensor([self.order[:k]] * len(queries))
        scores = torch.tensor([[10.0 - i for i in range(k)]] * len(queries))
        return Candidates(rows, scores)

    def score(self, queries, passage_rows):
        rank = {row: i for i, row in enumerate(self.order)}
        return torch.tensor([[10.0 - rank[r] for r in row] for row in passage_rows.tolist()])


def hybrid(orders, **options) -> HybridRetriever:
    config = HybridConfig(retrievers=[{"name": f"r{i}"} for i in range(len(orders))], **options)
    retriever = HybridRetriever(config, [Fixed(order) for order in orders])
    retriever.index(CORPUS)
    return retriever


def test_reciprocal_rank_fusion_by_hand():
    # r0 ranks A B C D, r1 ranks C A B D: A = 1/61 + 1/62, C = 1/63 + 1/61, B = 1/62 + 1/63
    fused = hybrid([[0, 1, 2, 3], [2, 0, 1, 3]]).retrieve(["q"], 3)
    assert fused.indices.tolist() == [[0, 2, 1]]
    expected = [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62 + 1 / 63]
    assert fused.scores[0].tolist() == pytest.approx(expected)
    weighted = hybrid([[0, 1, 2, 3], [2, 0, 1, 3]], weights=[1.0, 3.0], rrf_k=0)
    # A = 1 + 3/2, C = 1/3 + 3, B = 1/2 + 3/3
    assert weighted.retrieve(["q"], 3).indices.tolist() == [[2, 0, 1]]


def test_depth_limits_what_each_ranking_contributes():
    fused = hybrid([[0, 1, 2, 3], [3, 2, 1, 0]], depth=1)
    # depth max(k, 1) = 2: r0 gives A, B; r1 gives D, C
    found = fused.retrieve(["q"], 2)
    assert found.indices.tolist() == [[0, 3]]  # ties (1/61 each) go to the lower row
    assert fused.score(["q"], found.indices).tolist() == found.scores.tolist()


def test_weighted_fusion_sums_the_weighted_scores():
    fused = hybrid([[0, 1, 2, 3], [3, 2, 1, 0]], fusion="weighted", weights=[2.0, 1.0])
    # A = 2*10 + 7, B = 2*9 + 8, C = 2*8 + 9, D = 2*7 + 10
    found = fused.retrieve(["q"], 4)
    assert found.indices.tolist() == [[0, 1, 2, 3]]
    assert found.scores[0].tolist() == [27.0, 26.0, 25.0, 24.0]


def test_within_a_candidate_list_rrf_ranks_the_list():
    fused = hybrid([[0, 1, 2, 3], [3, 2, 1, 0]])
    # among B and D: r0 ranks B 1st, D 2nd; r1 ranks D 1st, B 2nd: a tie, the lower row first
    found = retrieve_within(fused, ["q"], [[3, 1]], 2, len(CORPUS))
    assert found.indices.tolist() == [[1, 3]]
    assert found.scores[0].tolist() == pytest.approx([1 / 61 + 1 / 62] * 2)


def test_weights_must_match_the_retrievers():
    with pytest.raises(ValueError, match="weights has 1 values for 2 retrievers"):
        HybridConfig(retrievers=[{"name": "bm25"}, {"name": "dpr"}], weights=[1.0])


def config_of(fusion: str) -> dict:
    return {
        "retriever": {
            "name": "hybrid",
            "fusion": fusion,
            "retrievers": [{"name": "bm25"}, {"name": "dpr", "model": "tiny-random"}],
        }
    }


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_conformance_over_bm25_and_dpr(fusion):
    resolved = resolve(config_of(fusion))
    spec, config = resolved.components["retriever"]
    check_config_round_trip(config)
    check_retriever(lambda: spec.build(config, resolved.build_context()))
    built = spec.build(config, resolved.build_context())
    assert [type(r).__name__ for r in built.retrievers] == ["BM25Retriever", "DPRRetriever"]
    trains = {"rrf": set(), "weighted": {"1.query_encoder"}}[fusion]
    assert set(built.trainable_modules()) == trains


def test_nested_errors_name_their_path():
    data = config_of("rrf")
    data["retriever"]["retrievers"][1]["modle"] = "x"
    with pytest.raises(ConfigError, match=r"retriever\.retrievers\.1\.modle: unknown key"):
        resolve(data)
