"""The cross-encoder reranker: shapes, gradients, freezing, determinism, registration."""

from __future__ import annotations

import pytest
import torch

from latentrag.core.config import resolve
from latentrag.plugins.cross_encoder import CrossEncoderConfig
from latentrag.plugins.cross_encoder.reranker import CrossEncoderReranker
from latentrag.testing import toy_corpus, toy_examples

QUERIES = [e.question for e in toy_examples()[:3]]
TEXTS = toy_corpus().texts()
PASSAGES = [TEXTS[0:4], TEXTS[4:8], TEXTS[8:12]]


def tiny(**options) -> CrossEncoderReranker:
    return CrossEncoderReranker(CrossEncoderConfig(model="tiny-random", **options))


def grad_total(module: torch.nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


def test_scores_have_shape_b_by_k_and_follow_the_passages():
    reranker = tiny()
    scores = reranker.score(QUERIES, PASSAGES)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    swapped = reranker.score(QUERIES[:1], [[PASSAGES[0][1], PASSAGES[0][0]]])
    torch.testing.assert_close(swapped[0], scores[0, [1, 0]], atol=1e-5, rtol=0)


def test_chunked_batches_give_the_same_scores():
    whole = tiny(batch_size=64).score(QUERIES, PASSAGES)
    chunked = tiny(batch_size=5).score(QUERIES, PASSAGES)
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)


def test_gradient_reaches_head_and_encoder():
    reranker = tiny()
    reranker.train()
    reranker.score(QUERIES, PASSAGES).log_softmax(-1)[:, 0].sum().backward()
    assert grad_total(reranker.head) > 0
    assert grad_total(reranker.encoder) > 0
    assert set(reranker.trainable_modules()) == {"encoder", "head"}


def test_frozen_encoder_trains_only_the_head():
    reranker = tiny(freeze_encoder=True)
    reranker.train()
    assert reranker.head.training and not reranker.encoder.training
    reranker.score(QUERIES, PASSAGES).sum().backward()
    assert grad_total(reranker.head) > 0
    assert all(p.grad is None and not p.requires_grad for p in reranker.encoder.parameters())
    assert set(reranker.trainable_modules()) == {"head"}


def test_deterministic_under_seed():
    first = tiny(seed=3).score(QUERIES, PASSAGES)
    again = tiny(seed=3).score(QUERIES, PASSAGES)
    other = tiny(seed=4).score(QUERIES, PASSAGES)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_head_seed_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    tiny(seed=5)
    assert torch.equal(torch.rand(1), expected)


def test_ragged_passage_lists_are_refused():
    with pytest.raises(ValueError, match="same number of passages"):
        tiny().score(QUERIES[:2], [TEXTS[:2], TEXTS[:3]])


def test_built_from_a_config_section(latentrag_registry):
    resolved = resolve(
        {
            "retriever": {"name": "dpr", "model": "tiny-random"},
            "reranker": {"name": "cross-encoder", "model": "tiny-random", "pooling": "mean"},
        },
        registry=latentrag_registry,
    )
    spec, config = resolved.component("reranker")
    reranker = spec.build(config)
    assert isinstance(reranker, CrossEncoderReranker) and reranker.config.pooling == "mean"


@pytest.mark.integration
def test_minilm_cross_encoder_scores():
    reranker = CrossEncoderReranker(CrossEncoderConfig(freeze_encoder=True))
    assert reranker.encoder.config.hidden_size == 384
    scores = reranker.score(QUERIES, PASSAGES)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
