"""A cross-encoder checkpoint with a sequence-classification head is loaded whole: its
scores equal sentence_transformers.CrossEncoder.predict on the same model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertForSequenceClassification

from latentrag.core.errors import ConfigError
from latentrag.plugins.cross_encoder import CrossEncoderConfig
from latentrag.plugins.cross_encoder.reranker import CrossEncoderReranker
from latentrag.plugins.encoders import tiny_bert_config, tiny_random_bert

QUERIES = ["who wrote the book", "where is the river"]
PASSAGES = [["the city of paris", "a book by a writer", "the war"], ["a long river", "x", "y z"]]


def save_tiny_classifier(directory, labels: int = 1) -> None:
    """A tiny random BertForSequenceClassification and its tokenizer, saved to `directory`."""
    _, tokenizer = tiny_random_bert()
    config = tiny_bert_config(len(tokenizer))
    config.num_labels = labels
    config.initializer_range = 0.5  # scores that differ clearly between pairs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_a_classification_head_scores_like_cross_encoder_predict(tmp_path, one_thread):
    from sentence_transformers import CrossEncoder

    save_tiny_classifier(tmp_path)
    config = CrossEncoderConfig(model=str(tmp_path), precision="float32", max_length=64)
    reranker = CrossEncoderReranker(config)
    assert reranker.has_pretrained_head
    with torch.no_grad():
        got = reranker.score(QUERIES, PASSAGES)
    reference = CrossEncoder(str(tmp_path), max_length=64, device="cpu")
    pairs = [(q, p) for q, row in zip(QUERIES, PASSAGES) for p in row]
    logits = reference.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    print(f"max |ours - CrossEncoder.predict|: {(got - logits.view(2, 3)).abs().max():.2e}")
    torch.testing.assert_close(got, logits.view(2, 3).float(), atol=1e-5, rtol=0)
    probabilities = reference.predict(pairs, convert_to_tensor=True)  # its default: sigmoid
    torch.testing.assert_close(got.sigmoid(), probabilities.view(2, 3).float(), atol=1e-5, rtol=0)
    assert float(got.std()) > 0.1  # the scores do differ between passages


def test_the_pretrained_head_trains_and_freezing_leaves_only_it(tmp_path, one_thread):
    save_tiny_classifier(tmp_path)
    frozen = CrossEncoderReranker(
        CrossEncoderConfig(model=str(tmp_path), precision="float32", freeze_encoder=True)
    )
    assert list(frozen.trainable_modules()) == ["head"]
    frozen.score(QUERIES, PASSAGES).sum().backward()
    assert frozen.head.weight.grad is not None and frozen.head.weight.grad.abs().sum() > 0
    body = frozen.encoder.bert.embeddings.word_embeddings.weight
    assert body.grad is None


def test_a_head_with_several_labels_is_refused(tmp_path):
    save_tiny_classifier(tmp_path, labels=3)
    with pytest.raises(ConfigError, match="head has 3 labels; a reranker needs one score"):
        CrossEncoderReranker(CrossEncoderConfig(model=str(tmp_path), precision="float32"))
