import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from latentrag.core.errors import LatentragError
from latentrag.core.types import Candidates, Corpus, Example, Passage
from latentrag.evaluation.measure import evaluate_qa, evaluate_retrieval
from latentrag.evaluation.metrics import (
    bleu,
    exact_match,
    f1,
    hit_at_k,
    mrr_at_k,
    normalize_answer,
    recall_at_k,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("an apple, a pear", "apple pear"),
        ("  Theory   of\tthe  atom ", "theory of atom"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("the", ""),
    ],
)
def test_normalize_answer_follows_squad(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert exact_match("Carolina", ["Denver", "carolina panthers", "Carolina!"]) == 1.0
    assert exact_match("Paris", "paris") == 1.0


def test_f1_token_overlap_hand_computed():
    # prediction 3 tokens, gold 2 tokens, 2 in common: P=2/3, R=1, F1=0.8
    assert f1("the Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # repeated tokens: common = min(2,1) + min(1,2) = 2 of 3 each way
    assert f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert f1("cats", ["dogs"]) == 0.0


def test_f1_is_max_over_references():
    assert f1("Denver", ["Denver Broncos", "Denver"]) == 1.0
    assert f1("Denver", ["Denver Broncos", "Carolina"]) == pytest.approx(2 / 3)


def test_f1_empty_after_normalisation_follows_squad_v1_1():
    # the official v1.1 script: no common token -> F1 0, even when both are empty (EM 1)
    assert f1("The", ["the"]) == 0.0
    assert exact_match("The", ["the"]) == 1.0
    assert f1("the", ["Paris"]) == 0.0


def test_metrics_need_a_reference():
    with pytest.raises(ValueError, match="reference"):
        f1("x", [])


def test_bleu_identical_is_one():
    assert bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_bleu_hand_computed_with_add_one_smoothing():
    # unigrams 5/5; bigrams 3/4 -> 4/5; trigrams 2/3 -> 3/4; 4-grams 1/2 -> 2/3;
    # brevity penalty exp(1 - 6/5)
    expected = math.exp(-0.2) * (1.0 * 0.8 * 0.75 * (2 / 3)) ** 0.25
    assert bleu("the cat sat on mat", ["the cat sat on the mat"]) == pytest.approx(expected)


def test_bleu_clips_counts_and_uses_closest_reference_length():
    # "the the the" vs "the cat": unigram matches clipped to 1 of 3
    # bigrams 0/2 -> 1/3; closest reference length 2 < 3: no brevity penalty
    expected = ((1 / 3) * (1 / 3)) ** 0.5
    assert bleu("the the the", ["the cat"], max_n=2) == pytest.approx(expected)
    # two references: the closest length (3) gives no penalty
    assert bleu("a b c", ["a b c d e f", "a b c"]) == pytest.approx(1.0)


def test_bleu_no_shared_word_is_zero():
    assert bleu("hello there", ["goodbye now"]) == 0.0
    assert bleu("", ["goodbye now"]) == 0.0


def test_hit_recall_and_mrr_at_k():
    ranked = ["a", "b", "c", "d"]
    assert hit_at_k(ranked, ["c"], 2) == recall_at_k(ranked, ["c"], 2) == 0.0
    assert hit_at_k(ranked, ["c"], 3) == recall_at_k(ranked, ["c"], 3) == 1.0
    assert hit_at_k(ranked, ["z", "b"], 2) == 1.0
    assert recall_at_k(ranked, ["z", "b"], 2) == 0.5  # one of the two gold passages
    assert mrr_at_k(ranked, ["c", "d"], 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, ["d"], 3) == 0.0
    assert mrr_at_k(ranked, ["a"], 1) == 1.0


words = st.lists(st.sampled_from(["paris", "the", "capital", "France", "a", "x!"]), max_size=6)


@given(words, words)
def test_f1_bounds_and_consistency_with_exact_match(prediction, answer):
    prediction, answer = " ".join(prediction), " ".join(answer)
    score = f1(prediction, [answer])
    assert 0.0 <= score <= 1.0
    if exact_match(prediction, [answer]):  # F1 1, except both empty (0 in SQuAD v1.1)
        assert score == (1.0 if normalize_answer(answer) else 0.0)


# -- evaluation -----------------------------------------------------------------------------

CORPUS = Corpus(Passage(f"p{i}", f"text {i}") for i in range(4))


class FixedRetriever:
    """Ranks the corpus rows in a fixed order per question."""

    def __init__(self, rankings):
        self.rankings = rankings
        self.asked_k = []

    def retrieve(self, queries, k):
        self.asked_k.append(k)
        rows = torch.tensor([self.rankings[q][:k] for q in queries])
        return Candidates(rows, -torch.arange(k, dtype=torch.float).expand(len(queries), -1))


def test_evaluate_retrieval_hand_computed():
    retriever = FixedRetriever({"a": [0, 1, 2, 3], "b": [3, 2, 1, 0], "c": [1, 0, 3, 2]})
    examples = [
        Example("1", "a", ("x",), ("p0",)),  # rank 1
        Example("2", "b", ("x",), ("p1",)),  # rank 3
        Example("3", "c", ("x",), ("p2", "p3")),  # rank 3 (p3)
        Example("4", "a", ("x",), ()),  # no gold ids: not counted
    ]
    metrics = evaluate_retrieval(retriever, CORPUS, examples, ks=(1, 2, 20), batch_size=2)
    hits = {"hit@1": 1 / 3, "hit@2": 1 / 3, "hit@20": 1.0}
    recalls = {"recall@1": 1 / 3, "recall@2": 1 / 3, "recall@20": 1.0}  # both p2 and p3 by 20
    assert metrics == pytest.approx({**hits, **recalls, "mrr@10": (1 + 1 / 3 + 1 / 3) / 3})
    assert set(retriever.asked_k) == {4}  # k=20 clipped to the corpus size


def test_evaluate_retrieval_needs_gold_ids():
    retriever = FixedRetriever({"a": [0, 1, 2, 3]})
    with pytest.raises(LatentragError, match="gold_ids"):
        evaluate_retrieval(retriever, CORPUS, [Example("1", "a", ("x",))])


class EchoPipeline:
    """Answers with the text of its top passage."""

    corpus = CORPUS

    def __init__(self):
        self.retriever = FixedRetriever({"a": [1, 0, 2, 3], "b": [2, 0, 1, 3]})

    def retrieve(self, queries, k):
        return self.retriever.retrieve(queries, k)

    def predict(self, batch, passages=1, max_new_tokens=16):
        top = self.retrieve(batch.questions, passages).indices[:, 0].tolist()
        return [CORPUS[row].text for row in top]


def test_evaluate_qa_em_f1_without_retrieval_metrics():
    examples = [
        Example("1", "a", ("Text 1!",), ("p1",)),  # exact after normalisation
        Example("2", "b", ("text 9", "other"), ("p0",)),  # F1 1/2, gold at rank 2
    ]
    pipeline = EchoPipeline()
    metrics = evaluate_qa(pipeline, examples, batch_size=1, progress=False)
    assert metrics == {"em": 0.5, "f1": pytest.approx(0.75), "sub_em": 0.5}
    assert pipeline.retriever.asked_k == [1, 1]  # predict's own top passage; no recall pass
