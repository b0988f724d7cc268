"""bfloat16 for the encoders (dpr, cross-encoder) and the generator: float32 outputs,
close to float32 results, gradients to the weights that train."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError
from latentrag.plugins.cross_encoder import CrossEncoderConfig
from latentrag.plugins.cross_encoder.reranker import CrossEncoderReranker
from latentrag.plugins.encoders import load_sentence_encoder, set_precision, tiny_random_bert
from latentrag.plugins.hf_generator import HFGeneratorConfig, LoraSettings
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.testing import toy_corpus, toy_examples

TEXTS = ["the capital of france is paris", "rivers flow to the sea in spring", "a"]
REDUCED = ["bfloat16", "bf16-mixed"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return load_sentence_encoder("tiny-random").encode(TEXTS)


@pytest.mark.parametrize("precision", REDUCED)
def test_encoder_vectors_are_float32_and_close_to_float32(precision, reference):
    encoder = load_sentence_encoder("tiny-random", precision=precision)
    vectors, embedded = encoder.encode(TEXTS), encoder.embed(TEXTS)
    assert vectors.dtype == embedded.dtype == torch.float32
    cosine = (vectors * reference).sum(-1)
    assert cosine.min() > 0.999
    assert not torch.equal(vectors, reference)  # really computed in bfloat16
    assert encoder.settings()["precision"] == precision  # index manifests tell them apart


def test_bfloat16_weights_and_mixed_float32_weights():
    half = load_sentence_encoder("tiny-random", precision="bfloat16")
    mixed = load_sentence_encoder("tiny-random", precision="bf16-mixed")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    mixed.embed(TEXTS).sum().backward()
    grads = [p.grad for p in mixed.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    assert not torch.is_autocast_enabled("cpu")  # the forward's autocast was left


def test_float32_settings_are_unchanged():
    assert "precision" not in load_sentence_encoder("tiny-random").settings()


def test_a_clone_keeps_the_precision_and_its_own_weights():
    encoder = load_sentence_encoder("tiny-random", precision="bf16-mixed")
    clone = encoder.clone()
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert clone.precision == "bf16-mixed"
    assert not torch.equal(next(clone.parameters()), next(encoder.parameters()))
    assert not torch.equal(clone.encode(TEXTS), encoder.encode(TEXTS))


def test_autocast_is_left_when_the_forward_fails():
    model, _ = tiny_random_bert()
    set_precision(model, "bf16-mixed")
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.tensor([[10_000]]))
    assert not torch.is_autocast_enabled("cpu")


def test_precision_is_set_once():
    model, _ = tiny_random_bert()
    set_precision(model, "bfloat16")
    with pytest.raises(ValueError, match="already"):
        set_precision(model, "bf16-mixed")


@pytest.mark.parametrize("precision", REDUCED)
def test_cross_encoder_scores_in_reduced_precision(precision):
    queries, passages = ["capital of france"], [["paris is the capital of france", "rivers"]]
    full = CrossEncoderReranker(CrossEncoderConfig(model="tiny-random"))
    reduced = CrossEncoderReranker(CrossEncoderConfig(model="tiny-random", precision=precision))
    want, got = full.score(queries, passages), reduced.score(queries, passages)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    got.sum().backward()
    assert reduced.head.weight.grad.dtype == torch.float32


def test_an_unknown_precision_names_the_key():
    data = {
        "data": {"source": "toy"},
        "retriever": {"name": "dpr", "model": "tiny-random", "precision": "fp8"},
    }
    with pytest.raises(ConfigError, match="retriever.precision"):
        resolve(data)


def test_bfloat16_generator_with_lora_trains_float32_adapters():
    corpus, examples = toy_corpus(), toy_examples()
    queries = [e.question for e in examples[:2]]
    targets = [e.target for e in examples[:2]]
    passages = [[corpus[0].text, corpus[1].text]] * 2
    options = {"model": "tiny-llama", "lora": LoraSettings()}
    full = HFCausalLMGenerator(HFGeneratorConfig(**options))
    half = HFCausalLMGenerator(HFGeneratorConfig(dtype="bfloat16", **options))
    trained = [p for p in half.model.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert {p.dtype for p in half.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    got = half.loglik(queries, passages, targets)
    torch.testing.assert_close(got, full.loglik(queries, passages, targets), atol=0.05, rtol=0)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


# -- the "auto" default ----------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_auto_encoder_precision_follows_the_hardware_but_spares_test_models(monkeypatch, native):
    from latentrag.plugins import encoders

    monkeypatch.setattr(encoders, "native_bf16", lambda: native)
    assert encoders.resolve_precision("auto", "minilm") == ("bf16-mixed" if native else "float32")
    assert encoders.resolve_precision("auto", "tiny-random") == "float32"
    assert encoders.resolve_precision("bfloat16", "tiny-random") == "bfloat16"
    assert CrossEncoderConfig().precision == "auto"


@pytest.mark.parametrize(
    ("options", "native", "expected"),
    [
        ({"model": "smollm2", "freeze": True}, True, "bfloat16"),
        ({"model": "smollm2", "lora": {"r": 4}}, True, "bfloat16"),
        ({"model": "smollm2"}, True, "float32"),  # full fine-tuning keeps float32 weights
        ({"model": "smollm2", "freeze": True}, False, "float32"),
        ({"model": "tiny-llama", "freeze": True}, True, "float32"),
        ({"model": "smollm2", "freeze": True, "dtype": "float32"}, True, "float32"),
    ],
)
def test_auto_generator_dtype(monkeypatch, options, native, expected):
    from latentrag.plugins.hf_generator import generator

    monkeypatch.setattr(generator, "native_bf16", lambda: native)
    assert generator.resolve_dtype(HFGeneratorConfig(**options)) == expected
