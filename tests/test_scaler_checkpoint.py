"""fp16's gradient scaler state (loss scale, growth tracker) is saved with the optimizer and
restored on resume. fp16 is refused on the CPU, so these tests lift that one check and run
the trainer's own path with a CPU GradScaler (torch.amp.GradScaler("cpu"))."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import safetensors.torch
import torch

from latentrag.core.config import resolve
from latentrag.core.pipeline import Pipeline
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training import device
from latentrag.training.checkpoint import read_checkpoint
from latentrag.training.loop import Trainer

TOY = {
    "data": {"source": "toy"},
    "retriever": {"name": "bow"},
    "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
    "estimator": {"name": "topk", "k": 3},
    "train": {"batch_size": 2, "lr": 1e-2, "device": "cpu", "checkpoint_every": 1},
}
#: a scaler state no fresh scaler has: it grows the scale after 3 finite steps
START = {
    "scale": 1024.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 3,
    "_growth_tracker": 0,
}


@pytest.fixture
def fp16_on_cpu(monkeypatch, one_thread):
    monkeypatch.setattr(device, "_check_supported", lambda *args: None)


def trainer(out, steps: int, precision: str = "fp16") -> Trainer:
    settings = {**TOY, "train": {**TOY["train"], "steps": steps, "precision": precision}}
    config = resolve(settings, source="toy.toml")
    pipeline = Pipeline.from_config(config, toy_corpus())
    return Trainer(pipeline, config, toy_examples(), out_dir=out, progress=False)


def weights(run) -> dict[str, torch.Tensor]:
    return safetensors.torch.load((run / "model.safetensors").read_bytes())


def test_the_scaler_state_is_checkpointed_and_resumed(tmp_path, fp16_on_cpu):
    whole = trainer(tmp_path / "whole", steps=3)
    assert isinstance(whole.precision.scaler, torch.amp.GradScaler)
    whole.precision.scaler.load_state_dict(START)
    whole.train()
    # two finite steps: the tracker counts them; the third grows the scale and restarts it
    saved = read_checkpoint(tmp_path / "whole" / "ckpt-2").state["grad_scaler"]
    assert saved == {**START, "_growth_tracker": 2}
    assert whole.precision.scaler.state_dict() == {**START, "scale": 2048.0}

    # stopped after step 2 and resumed by a fresh trainer (fresh scaler: 65536): it reads
    # the scaler back and ends where the uninterrupted run ended
    resumed = trainer(tmp_path / "resumed", steps=3)
    shutil.copytree(tmp_path / "whole" / "ckpt-2", tmp_path / "resumed" / "ckpt-2")
    assert resumed.precision.scaler.state_dict()["scale"] == 65536.0
    resumed.train(resume=True)
    assert resumed.precision.scaler.state_dict() == {**START, "scale": 2048.0}
    final = read_checkpoint(tmp_path / "resumed" / "ckpt-3").state["grad_scaler"]
    assert final == read_checkpoint(tmp_path / "whole" / "ckpt-3").state["grad_scaler"]
    expected, got = weights(tmp_path / "whole" / "ckpt-3"), weights(tmp_path / "resumed" / "ckpt-3")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_checkpoint_without_scaler_state_resumes_with_a_fresh_scaler(tmp_path, fp16_on_cpu):
    trainer(tmp_path, steps=1, precision="fp32").train()
    assert "grad_scaler" not in read_checkpoint(tmp_path / "ckpt-1").state
    resumed = trainer(tmp_path, steps=1)
    resumed.train(resume=True)  # finished: restores the checkpoint, trains nothing
    fresh = {**START, "scale": 65536.0, "growth_interval": 2000}
    assert resumed.precision.scaler.state_dict() == fresh


def test_fp32_and_bf16_checkpoints_hold_no_scaler(tmp_path, one_thread):
    trainer(tmp_path, steps=1, precision="bf16").train()
    assert "grad_scaler" not in read_checkpoint(tmp_path / "ckpt-1").state


def test_an_overflowing_loss_scale_skips_the_step_even_with_stop(tmp_path, fp16_on_cpu):
    run = trainer(tmp_path, steps=1)
    run.precision.scaler.load_state_dict({**START, "scale": 2.0**127})  # loss * scale: inf
    before = [p.detach().clone() for p in run.parameters.trained_parameters()]
    assert run.settings.on_nonfinite == "stop"
    assert run.train()["skipped_steps"] == 1
    assert run.precision.scaler.state_dict()["scale"] == 2.0**126  # backed off
    assert all(torch.equal(a, b) for a, b in zip(before, run.parameters.trained_parameters()))
