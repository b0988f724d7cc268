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
from latentrag.plugins.bm25 import BM25Config, kernels
from latentrag.plugins.bm25 import index as bm25_index
from latentrag.plugins.bm25 import retriever as bm25
from latentrag.plugins.bm25.index import BM25Index
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


#: the pruned kernels compiled when numba is installed, else the same code as plain Python
PRUNED = "numba" if kernels.NUMBA_AVAILABLE else "python"
BACKENDS = [PRUNED, "numpy"]


# -- the formula ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dense_share", [0.3, 2.0], ids=["mixed", "sparse"])
@pytest.mark.parametrize(
    "params", [{}, {"k1": 1.2, "b": 0.5, "epsilon": 0.1}, {"k1": 0.5, "b": 1.0}]
)
def test_scores_equal_rank_bm25(monkeypatch, backend, dense_share, params):
    monkeypatch.setattr(bm25_index, "DENSE_SHARE", dense_share)
    monkeypatch.setattr(bm25_index, "ENTRY_BLOCK", 7)  # several blocks even on a small corpus
    retriever = indexed(TEXTS, **params)
    tokens = retriever.tokenizer
    reference = rank_bm25.BM25Okapi(tokens.batch(TEXTS), **params)
    assert reference.idf["the"] == pytest.approx(reference.epsilon * reference.average_idf)
    n_dense = len(retriever.built.dense)
    assert (0 < n_dense < len(retriever.vocab)) if dense_share < 1 else n_dense == 0
    for query in QUERIES:
        expected = reference.get_scores(tokens(query))
        found = retriever.built.search(*retriever.query_terms([query]), len(TEXTS), backend)
        got = np.zeros(len(TEXTS))
        got[found[0][0]] = found[1][0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        order = np.lexsort((np.arange(len(TEXTS)), -expected))  # rank-bm25's ranking
        assert found[0][0].tolist() == order.tolist()
        rows = torch.arange(len(TEXTS)).flip(0)[None, :]
        scored = retriever.score([query], rows)[0].numpy()
        np.testing.assert_allclose(scored, expected[rows[0].numpy()], atol=1e-5)
        # score() adds the terms in the same order as the search: the very same floats
        assert scored[::-1].tolist() == got.astype(np.float32).tolist()


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


# -- pruned search ------------------------------------------------------------------------------


def zipf_corpus(n_docs: int, vocab: int, mean_length: int, seed: int = 0):
    """Concatenated term ids and lengths drawn from a Zipfian vocabulary."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    lengths = rng.poisson(mean_length, n_docs)
    return rng.choice(vocab, int(lengths.sum()), p=weights / weights.sum()), lengths, rng


def search_both(index: BM25Index, queries: list[list[int]], k: int):
    ids = np.array([t for q in queries for t in q], dtype=np.int64)
    lengths = np.array([len(q) for q in queries], dtype=np.int64)
    return index.search(ids, lengths, k, PRUNED), index.search(ids, lengths, k, "numpy")


@settings(max_examples=80, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 11), max_size=14), min_size=1, max_size=40),
    queries=st.lists(st.lists(st.integers(0, 13), max_size=7), min_size=1, max_size=6),
    dense_share=st.sampled_from([0.0, 0.1, 0.3, 2.0]),
    k1=st.sampled_from([0.0, 1.2, 1.5]),
    b=st.sampled_from([0.0, 0.75, 1.0]),
    epsilon=st.sampled_from([0.25, 0.0, -1.0]),  # -1: a negative idf floor
    data=st.data(),
)
def test_pruned_search_equals_exhaustive_on_random_corpora(
    docs, queries, dense_share, k1, b, epsilon, data
):
    ids = np.array([t for doc in docs for t in doc], dtype=np.int64)
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    index = BM25Index.build(ids, lengths, 12, k1, b, epsilon, dense_share=dense_share)
    k = data.draw(st.integers(1, len(docs)), label="k")
    (rows, scores), (exact_rows, exact_scores) = search_both(index, queries, k)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_array_equal(scores, exact_scores)


@pytest.mark.parametrize("k", [1, 10, 200])
def test_pruned_search_equals_exhaustive_across_blocks(k):
    # several blocks, dense and sparse terms, and queries that take every path: seeded,
    # swept, looked up, dense only, sparse only, repeated terms, no known term
    ids, lengths, rng = zipf_corpus(2 * kernels.BLOCK + 333, 3000, 25)
    index = BM25Index.build(ids, lengths, 3000)
    assert 0 < len(index.dense) < 100 and len(index.sparse_docs) > 0
    n_queries = 120 if kernels.NUMBA_AVAILABLE else 12
    queries = [list(rng.choice(ids, rng.integers(1, 9))) for _ in range(n_queries)]
    dense_terms = np.flatnonzero(index.slot >= 0)
    queries += [list(dense_terms[:3]), [int(dense_terms[0])] * 2, [2999, 2998], [], [4000]]
    (rows, scores), (exact_rows, exact_scores) = search_both(index, queries, k)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_array_equal(scores, exact_scores)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ties_across_blocks_keep_the_lowest_rows():
    # identical passages in every block: the k best are the first rows holding the term
    n_docs = 2 * kernels.BLOCK + 5
    docs = [[1, 2, 2] if row % 7 == 3 else [3, 4] for row in range(n_docs)]
    ids = np.array([t for doc in docs for t in doc])
    index = BM25Index.build(ids, np.array([len(doc) for doc in docs]), 5)
    for query in ([1], [2], [1, 2], [1, 3]):
        (rows, scores), exact = search_both(index, [query], 4)
        assert rows[0].tolist() == [3, 10, 17, 24]
        assert len(set(scores[0].tolist())) == 1
        np.testing.assert_array_equal(rows, exact[0])


def test_index_is_smaller_than_a_float32_weight_matrix():
    # bm25s keeps a float32 weight and an int32 row per (term, passage) pair
    ids, lengths, _ = zipf_corpus(20_000, 5000, 40)
    index = BM25Index.build(ids, lengths, 5000)
    pairs = len(index.sparse_docs) + np.count_nonzero(index.dense)
    assert pairs > 400_000
    assert index.nbytes < 8 * pairs


def test_backends(monkeypatch):
    index = BM25Index.build(np.array([0, 1, 1, 2, 0]), np.array([2, 3]), 3)
    query = (np.array([1, 0]), np.array([2]))
    with pytest.raises(LatentragError, match="backend must be one of"):
        index.search(*query, 1, backend="gpu")
    with pytest.raises(LatentragError, match=r"k=3 must be between 1 and the corpus size \(2\)"):
        index.search(*query, 3)
    exhaustive = index.search(*query, 2, backend="numpy")
    monkeypatch.setattr(kernels, "NUMBA_AVAILABLE", False)
    with pytest.raises(LatentragError, match="needs numba"):
        index.search(*query, 1, backend="numba")
    auto = index.search(*query, 2)  # falls back to numpy
    np.testing.assert_array_equal(auto[0], exhaustive[0])
    np.testing.assert_array_equal(auto[1], exhaustive[1])


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
        "index.npz",
        "manifest.json",
        "vocab.json",
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


def test_an_index_in_the_old_format_is_stale(tmp_path):
    corpus = make_corpus(TEXTS)
    retriever = BM25Retriever()
    retriever.index(corpus)
    retriever.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(StaleIndexError, match="format version 1, this code reads 2"):
        BM25Retriever().load(tmp_path, corpus)


def test_load_from_a_directory_without_index(tmp_path):
    with pytest.raises(LatentragError, match="manifest.json: no such file"):
        BM25Retriever().load(tmp_path)


def test_a_damaged_index_is_stale(tmp_path):
    corpus = make_corpus(TEXTS)
    retriever = BM25Retriever()
    retriever.index(corpus)
    retriever.save(tmp_path)
    (tmp_path / "index.npz").write_bytes(b"not a zip file")
    with pytest.raises(StaleIndexError, match="index.npz: unreadable"):
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

    monkeypatch.setattr(bm25.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        retriever.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.npz", "vocab.json"]
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
