"""generator.gradient_checkpointing: the same losses and gradients as storing the
activations (per-passage and joint reading, tiny Llama with and without LoRA, tiny T5),
layers really recomputed in backward (also in a frozen reader, for G-Rerank's mask), the
passage cache's cached forwards left alone, and a TOML config training with it on."""

from __future__ import annotations

import json
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.config import load_config
from latentrag.core.pipeline import Pipeline
from latentrag.plugins.hf_generator import HFGeneratorConfig
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.plugins.hf_seq2seq import HFSeq2SeqConfig
from latentrag.plugins.hf_seq2seq.generator import HFSeq2SeqGenerator
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training.loop import Trainer

TOL = 1e-5


def build(kind: str, checkpointing: bool, frozen: bool = False, **options):
    """A generator in training mode, or frozen (eval mode, no parameter trained)."""
    options = {"gradient_checkpointing": checkpointing, "freeze": frozen, **options}
    if kind == "t5":
        generator = HFSeq2SeqGenerator(HFSeq2SeqConfig(model="tiny-t5", **options))
    else:
        lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]} if kind == "llama-lora" else None
        config = HFGeneratorConfig(model="tiny-llama", lora=lora, **options)
        generator = HFCausalLMGenerator(config)
    generator.model.train(not frozen)
    return generator


def batch():
    """3 questions x 3 passages of different lengths."""
    corpus, examples = toy_corpus(), [toy_examples()[i] for i in (0, 6, 9)]
    passages = [[corpus[i].text, corpus[i + 3].text, corpus[i + 6].text] for i in range(3)]
    return [e.question for e in examples], passages, [e.target for e in examples]


def losses_and_gradients(generator, joint: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """-(sum of log-likelihoods) and the gradient of every trainable parameter (and of
    the document mask, for a joint reading)."""
    queries, passages, targets = batch()
    grads: dict[str, torch.Tensor] = {}
    if joint:
        log_mask = torch.tensor([[0.0, -1.0, -3.0], [-0.5, 0.0, -2.0], [-4.0, -0.2, 0.0]])
        log_mask.requires_grad_(True)
        loss = -generator.loglik_joint(queries, passages, targets, log_mask).sum()
    else:
        loss = -generator.loglik(queries, passages, targets).sum()
    loss.backward()
    if joint:
        grads["doc_log_mask"] = log_mask.grad
    for name, param in generator.model.named_parameters():
        if param.requires_grad:
            grads[name] = param.grad.clone()
    return loss.item(), grads


def count_calls(generator) -> list[int]:
    """A counter of the calls of the first transformer block's feed-forward `forward`
    (a module hook would miss the recomputation: it runs `forward` alone)."""
    model = generator.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    block = model.decoder.block[0] if hasattr(model, "decoder") else model.model.layers[0]
    module = block.layer[-1] if hasattr(block, "layer") else block.mlp
    calls, forward = [0], module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


@pytest.mark.parametrize("joint", [False, True], ids=["per-passage", "joint"])
@pytest.mark.parametrize("kind", ["llama", "llama-lora", "t5"])
def test_checkpointing_gives_the_same_loss_and_gradients(kind, joint, one_thread):
    plain, checkpointed = build(kind, False), build(kind, True)
    calls, calls_ckpt = count_calls(plain), count_calls(checkpointed)
    loss, grads = losses_and_gradients(plain, joint)
    loss_ckpt, grads_ckpt = losses_and_gradients(checkpointed, joint)
    assert math.isfinite(loss) and abs(loss - loss_ckpt) <= TOL * max(1.0, abs(loss))
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 1
    for name, grad in grads.items():
        if "lora_A" not in name:  # (LoRA's B starts at 0, so A's first gradient is 0)
            assert grad.abs().sum() > 0, name  # the gradient reaches it (LoRA, the mask)
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=TOL, atol=TOL, msg=name)
    # the checkpointed block ran again in backward; the plain one only in forward
    assert calls_ckpt[0] == 2 * calls[0] > 0


@pytest.mark.parametrize("kind", ["llama", "llama-lora", "t5"])
def test_the_model_reports_checkpointing(kind):
    for checkpointing in (False, True):
        generator = build(kind, checkpointing)
        model = generator.model
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.x
            assert model.is_gradient_checkpointing is checkpointing
        assert generator.gradient_checkpointing is checkpointing


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_a_frozen_reader_is_checkpointed_for_the_mask_gradient(kind, one_thread):
    """G-Rerank with a frozen reader: eval mode (no dropout), only the document mask gets a
    gradient; the reader's layers are recomputed for it all the same."""
    options = {"passage_cache_mb": 0} if kind == "llama" else {}
    plain = build(kind, False, frozen=True, **options)
    checkpointed = build(kind, True, frozen=True, **options)
    calls, calls_ckpt = count_calls(plain), count_calls(checkpointed)
    loss, grads = losses_and_gradients(plain, joint=True)
    loss_ckpt, grads_ckpt = losses_and_gradients(checkpointed, joint=True)
    assert list(grads) == ["doc_log_mask"] and not checkpointed.model.training
    assert abs(loss - loss_ckpt) <= TOL * max(1.0, abs(loss))
    assert grads["doc_log_mask"].abs().sum() > 0
    torch.testing.assert_close(
        grads_ckpt["doc_log_mask"], grads["doc_log_mask"], rtol=TOL, atol=TOL
    )
    assert calls_ckpt[0] == 2 * calls[0] > 0
    with torch.no_grad():  # nothing to recompute without gradients
        checkpointed.loglik_joint(*batch(), torch.zeros(3, 3))
    assert calls_ckpt[0] == 2 * calls[0] + 1


def test_the_passage_cache_reads_without_checkpointing_and_scores_the_same(one_thread):
    """A frozen causal reader with its passage cache: the question-and-answer tail runs over
    cached keys/values, which a recomputation would extend twice, so it is not checkpointed."""
    checkpointed = build("llama", True, frozen=True)
    assert checkpointed.cache_active
    calls = count_calls(checkpointed)
    loss, grads = losses_and_gradients(checkpointed, joint=True)
    assert len(checkpointed.passage_cache) == 9
    assert calls[0] == 2  # the passages' states once, the tail once: no recomputation
    reference = build("llama", False, frozen=True, passage_cache_mb=0)
    loss_ref, grads_ref = losses_and_gradients(reference, joint=True)
    assert abs(loss - loss_ref) <= TOL * max(1.0, abs(loss))
    torch.testing.assert_close(grads["doc_log_mask"], grads_ref["doc_log_mask"], rtol=TOL, atol=TOL)


TOML = """\
[data]
source = "toy"
[retriever]
name = "bow"
[generator]
name = "{name}"
model = "{model}"
gradient_checkpointing = {checkpointing}
[train]
steps = 2
batch_size = 2
lr = 0.01
seed = 0
"""
TOPK = '[estimator]\nname = "topk"\nk = 3\n'
GUMBEL = (
    '[reranker]\nname = "gumbel"\nk = 1\n'
    '[reranker.inner]\nname = "cross-encoder"\nmodel = "tiny-random"\nmax_length = 48\n'
    '[estimator]\nname = "gumbel"\nk = 3\nk_keep = 1\ntrain_generator = true\n'
)


def train(tmp_path, name: str, model: str, extra: str, checkpointing: bool):
    """Train 2 steps from a TOML file: (losses, runs of the first block's feed-forward)."""
    flag = "true" if checkpointing else "false"
    path = tmp_path / f"{model}-{flag}.toml"
    text = TOML.format(name=name, model=model, checkpointing=flag)
    path.write_text(text.replace("[train]", extra + "[train]"))
    resolved = load_config(path)
    pipeline = Pipeline.from_config(resolved, toy_corpus())
    calls = count_calls(pipeline.generator)
    out = tmp_path / f"run-{model}-{flag}"
    Trainer(pipeline, resolved, toy_examples(), out_dir=out, progress=False).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row], calls[0]


@pytest.mark.parametrize(
    ("name", "model", "extra"),
    [("hf-causal-lm", "tiny-llama", TOPK), ("hf-seq2seq", "tiny-t5", GUMBEL)],
    ids=["llama-topk", "t5-gumbel"],
)
def test_training_from_a_toml_config_with_checkpointing(tmp_path, name, model, extra, one_thread):
    checkpointed, runs_ckpt = train(tmp_path, name, model, extra, True)
    plain, runs = train(tmp_path, name, model, extra, False)
    assert len(checkpointed) == 2 and all(math.isfinite(v) for v in checkpointed)
    # same data, same seed: the same training, step 2 included (after an update)
    assert checkpointed == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert runs_ckpt > runs > 0  # recomputed in backward during training
