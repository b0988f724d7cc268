"""The DPR retriever: persistent faiss index, stale-index refusal, differentiable scoring."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.types import Corpus, Passage
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.faiss_index import (
    INDEX_FILE,
    MANIFEST_FILE,
    StaleIndexError,
)
from latentrag.plugins.dpr.retriever import DPRRetriever
from latentrag.plugins.encoders import load_sentence_encoder
from latentrag.testing import toy_corpus, toy_examples

WORDS = (
    "river city war capital state year king music film church school team game island "
    "empire water energy music language party army law company science art bridge"
)


def tiny(**options) -> DPRRetriever:
    return DPRRetriever(DPRConfig(model="tiny-random", **options))


def random_corpus(size: int = 300, seed: int = 0) -> Corpus:
    rng, words = np.random.default_rng(seed), WORDS.split()
    texts = (" ".join(rng.choice(words, size=int(rng.integers(5, 15)))) for _ in range(size))
    return Corpus(Passage(id=f"p{i}", text=text) for i, text in enumerate(texts))


QUESTIONS = [e.question for e in toy_examples()]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return toy_corpus()


def test_save_then_load_gives_identical_results(tmp_path, corpus, monkeypatch):
    built = tiny(index_dir=str(tmp_path))
    built.index(corpus)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["num_vectors"] == 12 and manifest["dims"] == 32
    assert manifest["index_type"] == "flat" and manifest["format_version"] == 2
    assert manifest["corpus_fingerprint"] == corpus.fingerprint()
    assert manifest["index_params"] == {"factory": "Flat"}
    # the flat index file holds the vectors themselves; ids.txt the passage id of each row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", INDEX_FILE, MANIFEST_FILE]
    assert (tmp_path / "ids.txt").read_text().splitlines() == corpus.ids

    loaded = tiny(index_dir=str(tmp_path))
    monkeypatch.setattr(loaded.passage_encoder, "encode", pytest.fail)  # must not re-encode
    loaded.index(corpus)
    first, second = built.retrieve(QUESTIONS, 5), loaded.retrieve(QUESTIONS, 5)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.scores, second.scores)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_saved_approximate_index_reloads(tmp_path, kind):
    corpus = random_corpus(100)
    built = tiny(index=kind, index_dir=str(tmp_path))
    built.index(corpus)
    loaded = tiny(index=kind, index_dir=str(tmp_path))
    loaded.index(corpus)
    assert torch.equal(built.retrieve(QUESTIONS, 5).indices, loaded.retrieve(QUESTIONS, 5).indices)
    assert torch.equal(loaded._vectors, built._vectors)  # what score() reads, in corpus order


def test_index_for_another_corpus_is_refused(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    other = Corpus(list(corpus)[:-1])
    with pytest.raises(StaleIndexError, match=r"different corpus .*latentrag index build CONFIG"):
        tiny(index_dir=str(tmp_path)).index(other)


def test_index_for_other_weights_is_refused(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    with pytest.raises(StaleIndexError, match="different passage encoder weights") as error:
        tiny(index_dir=str(tmp_path), seed=1).index(corpus)
    assert "\n" not in str(error.value) and isinstance(error.value, LatentragError)


def test_index_for_other_index_type_is_refused(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    with pytest.raises(StaleIndexError, match="different index type"):
        tiny(index_dir=str(tmp_path), index="hnsw").index(corpus)


def test_build_overwrites_a_stale_index(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    fresh = tiny(index_dir=str(tmp_path), seed=1)
    fresh.build(corpus)
    tiny(index_dir=str(tmp_path), seed=1).index(corpus)  # now matches: no error


def test_interrupted_save_without_manifest_is_rebuilt(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    (tmp_path / MANIFEST_FILE).unlink()
    (tmp_path / INDEX_FILE).write_bytes(b"garbage")
    retriever = tiny(index_dir=str(tmp_path))
    retriever.index(corpus)
    assert retriever.retrieve(QUESTIONS[:1], 3).indices.shape == (1, 3)
    assert (tmp_path / MANIFEST_FILE).is_file()


def test_retrieve_scores_equal_score(corpus):
    retriever = tiny()
    retriever.index(corpus)
    candidates = retriever.retrieve(QUESTIONS, 4)
    assert candidates.indices.shape == (12, 4) and candidates.mask is None
    assert torch.all(candidates.scores[:, :-1] >= candidates.scores[:, 1:])
    with torch.no_grad():
        scores = retriever.score(QUESTIONS, candidates.indices)
    torch.testing.assert_close(scores, candidates.scores, atol=1e-5, rtol=0)


def test_score_gradient_reaches_query_encoder_only(corpus):
    retriever = tiny()
    retriever.index(corpus)
    rows = retriever.retrieve(QUESTIONS[:3], 4).indices
    retriever.score(QUESTIONS[:3], rows).logsumexp(-1).sum().backward()
    query_grads = [p.grad for p in retriever.query_encoder.parameters() if p.grad is not None]
    assert query_grads and sum(g.abs().sum() for g in query_grads) > 0
    assert all(p.grad is None for p in retriever.passage_encoder.parameters())
    assert set(retriever.trainable_modules()) == {"query_encoder"}


def test_trained_passage_encoder_gets_gradient(corpus):
    retriever = tiny(train_passage_encoder=True)
    retriever.index(corpus)
    rows = torch.tensor([[0, 3, 3], [5, 0, 11]])
    scores = retriever.score(QUESTIONS[:2], rows)
    torch.testing.assert_close(scores[0, 1], scores[0, 2])  # a repeated row scores alike
    scores.sum().backward()
    grads = [p.grad for p in retriever.passage_encoder.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert set(retriever.trainable_modules()) == {"query_encoder", "passage_encoder"}
    assert retriever.query_encoder is not retriever.passage_encoder


def test_shared_encoders_are_one_module(corpus):
    retriever = tiny(shared_encoders=True)
    assert retriever.query_encoder is retriever.passage_encoder
    assert set(retriever.trainable_modules()) == {"query_encoder"}
    separate = tiny()
    assert separate.query_encoder is not separate.passage_encoder
    for a, b in zip(separate.query_encoder.parameters(), separate.passage_encoder.parameters()):
        assert torch.equal(a, b)  # both start from the same weights


@pytest.fixture(scope="module")
def random_search() -> tuple[Corpus, list[str], list[list[int]]]:
    """A 300-passage random corpus, 20 queries and their exact (flat index) top 5."""
    corpus = random_corpus(300)
    queries = [" ".join(corpus[i].text.split()[:4]) for i in range(0, 300, 15)]
    flat = tiny()
    flat.index(corpus)
    return corpus, queries, flat.retrieve(queries, 5).indices.tolist()


@pytest.mark.parametrize(
    ("kind", "options", "expected_type"),
    [
        ("ivf", {"nlist": 7, "nprobe": 4}, faiss.IndexIVFFlat),
        ("hnsw", {"hnsw_m": 16, "ef_search": 64}, faiss.IndexHNSWFlat),
    ],
)
def test_approximate_indexes_agree_with_flat(random_search, kind, options, expected_type):
    corpus, queries, exact = random_search
    approximate = tiny(index=kind, **options)
    approximate.index(corpus)
    assert isinstance(approximate._index, expected_type)
    found = approximate.retrieve(queries, 5).indices.tolist()
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, found)])
    assert overlap >= 0.8


def test_ivf_with_few_probes_may_return_padding(random_search):
    retriever = tiny(index="ivf", nlist=7, nprobe=1)
    retriever.index(random_search[0])
    candidates = retriever.retrieve(QUESTIONS, 300)
    valid = candidates.valid()
    assert not valid.all()  # one list of seven cannot hold every passage
    assert (candidates.indices[~valid] == 0).all()


def test_k_larger_than_corpus_is_an_error(corpus):
    retriever = tiny()
    retriever.index(corpus)
    with pytest.raises(LatentragError, match="k = 13 but the corpus has 12 passages"):
        retriever.retrieve(QUESTIONS, 13)


def test_search_before_index_is_an_error():
    with pytest.raises(LatentragError, match=r"index\(corpus\)"):
        tiny().retrieve(QUESTIONS, 1)


def test_refresh_after_changing_weights_changes_index(corpus):
    retriever = tiny()
    retriever.index(corpus)
    before = retriever.retrieve(QUESTIONS, 12)
    with torch.no_grad():
        for p in retriever.passage_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stale = retriever.retrieve(QUESTIONS, 12)
    assert torch.equal(stale.scores, before.scores)  # nothing re-encoded yet
    retriever.refresh()
    after = retriever.retrieve(QUESTIONS, 12)
    assert not torch.allclose(after.scores, before.scores)
    fresh = retriever.passage_encoder.encode(corpus.texts())
    torch.testing.assert_close(retriever._vectors, fresh)


def test_loading_trained_shared_weights_refreshes_index(corpus):
    trained = tiny(shared_encoders=True, seed=1)
    retriever = tiny(shared_encoders=True)
    retriever.index(corpus)
    retriever.load_state_dict(trained.state_dict())
    expected = trained.passage_encoder.encode(corpus.texts())
    torch.testing.assert_close(retriever._vectors, expected)


def test_encode_matches_embed_in_any_order():
    encoder = load_sentence_encoder("tiny-random", max_length=16).eval()
    texts = ["a", "the capital of france is paris", "two words", "x " * 40]
    encoded = encoder.encode(texts, batch_size=3)
    with torch.no_grad():
        embedded = encoder.embed(texts)
    torch.testing.assert_close(encoded, embedded, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoded.norm(dim=-1), torch.ones(4))
    assert encoder.training is False


def test_built_from_a_config_section(latentrag_registry):
    resolved = resolve(
        {"retriever": {"name": "dpr", "model": "tiny-random", "index": "hnsw"}},
        registry=latentrag_registry,
    )
    spec, config = resolved.component("retriever")
    retriever = spec.build(config)
    assert isinstance(retriever, DPRRetriever) and retriever.config.index == "hnsw"
    with pytest.raises(ConfigError, match="retriever.index"):
        resolve({"retriever": {"name": "dpr", "index": "lsh"}}, registry=latentrag_registry)


def test_unknown_model_names_the_value():
    with pytest.raises(ValueError, match="'no/such/dir'"):  # checked with the config now
        DPRConfig(model="no/such/dir")


@pytest.mark.integration
def test_minilm_retrieves_gold_passages(corpus):
    examples = toy_examples()
    retriever = DPRRetriever(DPRConfig())
    retriever.index(corpus)
    gold = torch.tensor([corpus.index_of(e.gold_ids[0]) for e in examples])
    top = retriever.retrieve([e.question for e in examples], 1).indices[:, 0]
    assert int((top == gold).sum()) >= 10
    # as a posterior q(h|x,y) it reads "question answer"
    posterior = retriever.retrieve([f"{e.question} {e.target}" for e in examples], 1)
    assert int((posterior.indices[:, 0] == gold).sum()) >= 10


@pytest.mark.integration
def test_minilm_vectors_match_sentence_transformers(corpus):
    from sentence_transformers import SentenceTransformer

    from latentrag.plugins.encoders import packaged_minilm_dir

    model = SentenceTransformer(str(packaged_minilm_dir()))
    model.max_seq_length = 128
    expected = model.encode(corpus.texts(), batch_size=4, convert_to_tensor=True)
    encoder = load_sentence_encoder("minilm", max_length=128)
    torch.testing.assert_close(encoder.encode(corpus.texts(), 4), expected, atol=1e-5, rtol=0)
