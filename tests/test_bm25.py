"""Tests for the bm25 retriever plugin and the shared word tokenizer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rank_bm25
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError, LatentragError, StaleIndexError
from latentrag.core.registry import Registry
from latentrag.core.types import Corpus, Passage
from latentrag.plugins.bm25 import BM25Config
from latentrag.plugins.bm25 import retriever as bm25
from latentrag.plugins.bm25.retriever import BM25Retriever
from latentrag.plugins.bm25.tokenize import STOPWORDS, Tokenizer, stem
from latentrag.testing.checks import check_retriever
from latentrag.toy.corpus import toy_corpus, toy_examples

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# "the" is in 7 of 8 passages: its idf is negative and gets rank-bm25's epsilon floor.
TEXTS = [
    "The cat sat on the mat.",
    "The dog chased the cat around the garden.",
    "A bird sang in the tree near the garden.",
    "The quick brown fox jumps over the lazy dog.",
    "The mat was red and the cat liked it.",
    "Rain fell on the garden all day long.",
    "The tree lost its leaves in autumn.",
    "Bright stars over quiet hills.",
]
QUERIES = [
    "cat cat mat",  # a repeated term counts twice
    "the garden",  # "the": negative idf, floored
    "zebra dog",  # "zebra" is in no passage
    "zebra",  # nothing known: every passage scores 0
    "The quick brown fox jumps over the lazy dog",
]


def make_corpus(texts: list[str]) -> Corpus:
    return Corpus(Passage(id=f"p{i}", text=text) for i, text in enumerate(texts))


def all_scores(retriever: BM25Retriever, query: str, n_docs: int) -> np.ndarray:
    found = retriever.retrieve([query], n_docs)
    scores = np.zeros(n_docs)
    scores[found.indices[0].numpy()] = found.scores[0].numpy()
    return scores


def indexed(texts: list[str], **options) -> BM25Retriever:
    retriever = BM25Retriever(BM25Config(**options))
    retriever.index(make_corpus(texts))
    return retriever


# -- the formula ----------------------------------------------------------------------------


@pytest.mark.parametrize("dense_share", [bm25.DENSE_ROW_SHARE, 2.0], ids=["mixed", "sparse"])
@pytest.mark.parametrize(
    "params", [{}, {"k1": 1.2, "b": 0.5, "epsilon": 0.1}, {"k1": 0.5, "b": 1.0}]
)
def test_scores_equal_rank_bm25(monkeypatch, dense_share, params):
    monkeypatch.setattr(bm25, "DENSE_ROW_SHARE", dense_share)
    monkeypatch.setattr(bm25, "WEIGHT_BLOCK", 7)  # several blocks even on a small corpus
    retriever = indexed(TEXTS, **params)
    tokens = retriever.tokenizer
    reference = rank_bm25.BM25Okapi(tokens.batch(TEXTS), **params)
    assert reference.idf["the"] == pytest.approx(reference.epsilon * reference.average_idf)
    n_dense = len(retriever.built.dense_rows)
    assert (0 < n_dense < len(retriever.built.vocab)) if dense_share < 1 else n_dense == 0
    for query in QUERIES:
        expected = reference.get_scores(tokens(query))
        np.testing.assert_allclose(all_scores(retriever, query, len(TEXTS)), expected, atol=1e-5)
        rows = torch.arange(len(TEXTS)).flip(0)[None, :]
        scored = retriever.score([query], rows)[0].numpy()
        np.testing.assert_allclose(scored, expected[rows[0].numpy()], atol=1e-5)


def test_repeated_query_term_counts_twice():
    retriever = indexed(TEXTS)
    once, twice = all_scores(retriever, "mat", 8), all_scores(retriever, "mat mat", 8)
    assert once.max() > 0
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)


words = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"])


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.lists(words, min_size=1, max_size=12), min_size=1, max_size=12),
    query=st.lists(st.sampled_from(["a", "b", "c", "zz"]), max_size=6),
)
def test_scores_equal_rank_bm25_on_random_corpora(docs, query):
    texts = [" ".join(doc) for doc in docs]
    retriever = indexed(texts)
    expected = rank_bm25.BM25Okapi(docs).get_scores(query)
    got = all_scores(retriever, " ".join(query), len(texts))
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -- retrieval --------------------------------------------------------------------------------


def test_batched_retrieve_equals_one_by_one():
    retriever = BM25Retriever()
    retriever.index(toy_corpus())
    questions = [e.question for e in toy_examples()] + ["", "zebra"]
    assert retriever.retrieve([], 5).indices.shape == (0, 5)
    batched = retriever.retrieve(questions, 5)
    assert batched.indices.dtype == torch.int64 and batched.scores.dtype == torch.float32
    assert batched.indices.shape == (len(questions), 5)
    for row, question in enumerate(questions):
        single = retriever.retrieve([question], 5)
        assert torch.equal(single.indices[0], batched.indices[row])
        assert torch.equal(single.scores[0], batched.scores[row])


def test_retrieve_finds_the_gold_passage_first():
    corpus, examples = toy_corpus(), toy_examples()
    retriever = BM25Retriever()
    retriever.index(corpus)
    found = retriever.retrieve([e.question for e in examples], 1)
    assert [corpus[row].id for row in found.indices[:, 0]] == [e.gold_ids[0] for e in examples]


def test_ties_keep_the_lower_corpus_row_first():
    # rows 0, 2, 3 are identical: the k=2 boundary cuts through the tie
    retriever = indexed(["apple pie", "banana split", "apple pie", "apple pie", "cherry"])
    found = retriever.retrieve(["apple"], 2)
    assert found.indices.tolist() == [[0, 2]]
    assert found.scores[0, 0] == found.scores[0, 1] > 0
    # nothing known: all passages tie at 0, so the first rows come back in order
    assert retriever.retrieve(["zebra"], 3).indices.tolist() == [[0, 1, 2]]
    assert retriever.retrieve(["zebra"], 3).scores.abs().sum() == 0


def test_k_larger_than_the_corpus_is_an_error():
    retriever = indexed(TEXTS)
    with pytest.raises(LatentragError, match=r"k=9 .*corpus size \(8\)"):
        retriever.retrieve(["cat"], 9)
    with pytest.raises(LatentragError, match="k=0"):
        retriever.retrieve(["cat"], 0)
    assert retriever.retrieve(["cat"], 8).indices.shape == (1, 8)


def test_use_before_index_and_empty_corpus_are_errors():
    with pytest.raises(LatentragError, match="no index yet"):
        BM25Retriever().retrieve(["cat"], 1)
    with pytest.raises(LatentragError, match="empty corpus"):
        BM25Retriever().index(Corpus([]))


def test_score_checks_its_rows():
    retriever = indexed(TEXTS)
    with pytest.raises(LatentragError, match=r"\[0, 8\)"):
        retriever.score(["cat"], torch.tensor([[0, 8]]))
    with pytest.raises(LatentragError, match="B=2"):
        retriever.score(["cat", "dog"], torch.tensor([[0, 1]]))


def test_passes_the_retriever_conformance_checks():
    check_retriever(lambda: BM25Retriever(BM25Config()))


def test_progress_bar_only_for_large_corpora(monkeypatch):
    seen = []

    def fake_tqdm(items, disable, **kwargs):
        seen.append(disable)
        return items

    monkeypatch.setattr(bm25, "tqdm", fake_tqdm)
    monkeypatch.setattr(bm25, "PROGRESS_ABOVE", 5)
    indexed(TEXTS[:5])
    indexed(TEXTS[:6])
    assert seen == [True, False]


# -- persistence ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    corpus = make_corpus(TEXTS)
    retriever = BM25Retriever()
    retriever.index(corpus)
    retriever.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "vocab.json",
        "weights.npz",
    ]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["corpus_fingerprint"] == corpus.fingerprint()
    assert manifest["n_docs"] == 8 and manifest["config"]["k1"] == 1.5

    loaded = BM25Retriever()
    loaded.load(tmp_path, corpus)
    before, after = retriever.retrieve(QUERIES, 4), loaded.retrieve(QUERIES, 4)
    assert torch.equal(before.indices, after.indices)
    assert torch.equal(before.scores, after.scores)
    rows = before.indices
    assert torch.equal(retriever.score(QUERIES, rows), loaded.score(QUERIES, rows))


def test_stale_index_for_another_corpus_is_refused(tmp_path):
    old, new = make_corpus(TEXTS), make_corpus(TEXTS[:-1] + ["Something else entirely."])
    retriever = BM25Retriever()
    retriever.index(old)
    retriever.save(tmp_path)
    message = (
        rf"stale index {tmp_path}: built for corpus {old.fingerprint()[:12]}, "
        rf"this corpus is {new.fingerprint()[:12]}; rebuild with `latentrag index build`"
    )
    with pytest.raises(StaleIndexError, match=message):
        BM25Retriever().load(tmp_path, new)
    with pytest.raises(
        StaleIndexError, match=r"built with tokenizer\.stem=False, .* has tokenizer\.stem=True"
    ):
        BM25Retriever(BM25Config(stem=True)).load(tmp_path, old)
    with pytest.raises(StaleIndexError, match=r"built with k1=1\.5, this config has k1=2\.0"):
        BM25Retriever(BM25Config(k1=2.0)).load(tmp_path, old)


def test_index_dir_loads_a_matching_index_refuses_a_stale_one_and_build_replaces_it(
    tmp_path, monkeypatch
):
    config = BM25Config(index_dir=str(tmp_path / "bm25"))
    first = BM25Retriever(config)
    first.index(make_corpus(TEXTS))
    assert (tmp_path / "bm25" / "manifest.json").exists()

    def no_build(self, corpus, fingerprint=None):
        raise AssertionError("rebuilt an index that matches")

    with monkeypatch.context() as patch:
        patch.setattr(BM25Retriever, "_build", no_build)
        second = BM25Retriever(config)
        second.index(make_corpus(TEXTS))
    assert torch.equal(second.retrieve(QUERIES, 3).indices, first.retrieve(QUERIES, 3).indices)

    changed = make_corpus(TEXTS[:4])
    with pytest.raises(StaleIndexError, match="rebuild with `latentrag index build`"):
        BM25Retriever(config).index(changed)
    third = BM25Retriever(config)
    third.build(changed)
    assert third.retrieve(["cat"], 4).indices.shape == (1, 4)
    manifest = json.loads((tmp_path / "bm25" / "manifest.json").read_text())
    assert manifest["corpus_fingerprint"] == changed.fingerprint()
    assert not [p for p in (tmp_path / "bm25").iterdir() if p.name.startswith(".")]


def test_load_from_a_directory_without_index(tmp_path):
    with pytest.raises(LatentragError, match="manifest.json: no such file"):
        BM25Retriever().load(tmp_path)


def test_a_damaged_index_is_stale(tmp_path):
    corpus = make_corpus(TEXTS)
    retriever = BM25Retriever()
    retriever.index(corpus)
    retriever.save(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"not a zip file")
    with pytest.raises(StaleIndexError, match="weights.npz: unreadable"):
        BM25Retriever().load(tmp_path, corpus)
    retriever.save(tmp_path)  # saving again repairs it
    BM25Retriever().load(tmp_path, corpus)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(StaleIndexError, match="vocab.json: unreadable"):
        BM25Retriever().load(tmp_path, corpus)


def test_a_failed_save_leaves_no_half_written_index(tmp_path, monkeypatch):
    retriever = indexed(TEXTS)
    retriever.save(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(bm25.sp, "save_npz", disk_full)
    with pytest.raises(OSError, match="No space"):
        retriever.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json", "weights.npz"]
    with pytest.raises(LatentragError, match="manifest.json: no such file"):
        BM25Retriever().load(tmp_path)


# -- registry and config ----------------------------------------------------------------------


def test_registered_and_built_from_a_config_section():
    spec = Registry().load(entry_points=False).get("retriever", "bm25")
    assert spec.config_model is BM25Config
    assert isinstance(spec.build(), BM25Retriever)

    resolved = resolve({"retriever": {"name": "bm25", "k1": 1.2}})
    spec, config = resolved.component("retriever")
    assert config == BM25Config(k1=1.2)
    retriever = spec.build(config)
    assert isinstance(retriever, BM25Retriever) and retriever.config.k1 == 1.2


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match=r"retriever\.pattern: .*regular expression"):
        resolve({"retriever": {"name": "bm25", "pattern": "(["}})
    with pytest.raises(ConfigError, match=r"retriever\.b: "):
        resolve({"retriever": {"name": "bm25", "b": 1.5}})
    with pytest.raises(ConfigError, match=r"retriever\.k3: unknown key"):
        resolve({"retriever": {"name": "bm25", "k3": 1}})


# -- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_options():
    text = "The Cats were RUNNING, happily; e-mail x_y 42"
    assert Tokenizer()(text) == [
        "the",
        "cats",
        "were",
        "running",
        "happily",
        "e",
        "mail",
        "x_y",
        "42",
    ]
    assert Tokenizer(lowercase=False)("The Cat") == ["The", "Cat"]
    assert Tokenizer(pattern=r"[a-z]+")("x_y 42 ab") == ["x", "y", "ab"]
    assert Tokenizer(stopwords=True)(text) == [
        "cats",
        "running",
        "happily",
        "e",
        "mail",
        "x_y",
        "42",
    ]
    assert Tokenizer(stem=True, stopwords=True)("The cats were running") == ["cat", "run"]
    assert "the" in STOPWORDS and "paris" not in STOPWORDS
    assert Tokenizer(stem=True).signature()["stemmer_version"] == 1
    assert "stemmer_version" not in Tokenizer().signature()


@pytest.mark.parametrize(
    "word, expected",
    [
        ("running", "run"),
        ("cities", "city"),
        ("played", "play"),
        ("cats", "cat"),
        ("glass", "glass"),
        ("relational", "relate"),
        ("happiness", "happy"),
        ("is", "is"),
        ("classes", "class"),
        ("x42s", "x42s"),
    ],
)
def test_stem(word, expected):
    assert stem(word) == expected


def test_stemming_lets_word_forms_match():
    retriever = indexed(
        ["The cities were crowded.", "A quiet village.", "Open fields.", "Tall trees."], stem=True
    )
    found = retriever.retrieve(["city"], 2)
    assert found.indices[0, 0] == 0 and found.scores[0, 0] > found.scores[0, 1]
