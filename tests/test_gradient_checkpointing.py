"""generator.gradient_checkpointing: the same losses and gradients as storing the
activations (per-passage and joint reading, tiny Llama with and without LoRA, tiny T5),
layers really recomputed in backward, the passage cache unaffected, a frozen generator
refused in one line, and a TOML config training with it on."""

from __future__ import annotations

import json
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.config import load_config, resolve
from latentrag.core.errors import ConfigError
from latentrag.core.pipeline import Pipeline
from latentrag.plugins.hf_generator import HFGeneratorConfig
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.plugins.hf_seq2seq import HFSeq2SeqConfig
from latentrag.plugins.hf_seq2seq.generator import HFSeq2SeqGenerator
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training.loop import Trainer

TOL = 1e-5


def build(kind: str, checkpointing: bool):
    """A generator in training mode (checkpointing applies only while training)."""
    if kind == "t5":
        config = HFSeq2SeqConfig(model="tiny-t5", gradient_checkpointing=checkpointing)
        generator = HFSeq2SeqGenerator(config)
    else:
        lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]} if kind == "llama-lora" else None
        config = HFGeneratorConfig(
            model="tiny-llama", lora=lora, gradient_checkpointing=checkpointing
        )
        generator = HFCausalLMGenerator(config)
    generator.model.train()
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


def test_an_untrained_checkpointed_generator_still_uses_the_passage_cache(one_thread):
    """An estimator that does not train the generator leaves it in eval mode without
    gradients: the passage cache runs and checkpointing changes nothing."""
    generator = build("llama", True)
    generator.model.eval()
    generator.model.requires_grad_(False)
    assert generator.cache_active
    queries, passages, targets = batch()
    log_mask = torch.tensor([[0.0, -1.0, -3.0]] * 3, requires_grad=True)
    cached = generator.loglik_joint(queries, passages, targets, log_mask)
    assert len(generator.passage_cache) == 9
    reference = build("llama", False)
    reference.model.eval()
    uncached = reference.loglik_joint(queries, passages, targets, log_mask)
    torch.testing.assert_close(cached, uncached, rtol=TOL, atol=TOL)
    per_passage = generator.loglik(queries, passages, targets)
    torch.testing.assert_close(per_passage, reference.loglik(queries, passages, targets))


@pytest.mark.parametrize("name", ["hf-causal-lm", "hf-seq2seq"])
def test_a_frozen_checkpointed_generator_is_one_line(name):
    model = "tiny-t5" if name == "hf-seq2seq" else "tiny-llama"
    data = {
        "data": {"source": "toy"},
        "retriever": {"name": "bow"},
        "generator": {"name": name, "model": model, "freeze": True, "gradient_checkpointing": True},
        "estimator": {"name": "topk", "k": 3},
    }
    with pytest.raises(ConfigError) as error:
        resolve(data, source="run.toml")
    message = str(error.value)
    assert "\n" not in message and message.startswith("run.toml: generator")
    assert "gradient_checkpointing = true with freeze = true" in message


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
