"""train.device and train.precision: a missing GPU is one line (exit 2), bf16 autocast on the
CPU trains to the fp32 loss within 5%, and everything lands on the configured device."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training.device import resolve_device
from latentrag.training.loglik_cache import LoglikCache
from latentrag.training.loop import Trainer

TOY = {
    "data": {"source": "toy"},
    "retriever": {"name": "bow"},
    "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
    "estimator": {"name": "topk", "k": 3},
    "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "seed": 0},
}


def config(**train: object):
    data = {**TOY, "train": {**TOY["train"], **train}}
    return resolve(data, source="toy.toml")


def trainer(tmp_path, **train: object) -> Trainer:
    resolved = config(**train)
    pipeline = Pipeline.from_config(resolved, toy_corpus())
    return Trainer(pipeline, resolved, toy_examples(), out_dir=tmp_path, progress=False)


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@no_gpu
def test_cuda_without_a_gpu_is_one_line_exit_2(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(
        '[data]\nsource = "toy"\n[retriever]\nname = "bow"\n'
        '[generator]\nname = "hf-causal-lm"\nmodel = "tiny-llama"\n'
        '[estimator]\nname = "topk"\nk = 3\n[train]\nsteps = 1\ndevice = "cuda"\n'
    )
    result = CliRunner().invoke(main, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {path}: train.device: 'cuda' but this machine has no GPU\n"


@no_gpu
def test_resolve_device():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"train.device: 'cuda:1' but this machine has no GPU"):
        resolve_device("cuda:1")


def test_a_misspelt_device_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device"):
        config(device="gpu")


def test_fp16_on_the_cpu_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.precision: 'fp16' needs a GPU"):
        trainer(tmp_path, device="cpu", precision="fp16")


def test_bf16_on_the_cpu_trains_to_the_fp32_loss(tmp_path):
    fp32 = trainer(tmp_path / "fp32", device="cpu").train()["loss"]
    bf16 = trainer(tmp_path / "bf16", device="cpu", precision="bf16").train()["loss"]
    print(f"loss after the same steps: fp32 {fp32:.4f}, bf16 {bf16:.4f}")
    assert math.isfinite(bf16) and bf16 > 0
    assert abs(bf16 - fp32) <= 0.05 * abs(fp32), (bf16, fp32)
    # autocast really ran: bf16 rounding makes the two runs differ
    assert bf16 != fp32


def test_everything_is_on_the_configured_device(tmp_path):
    frozen = {**TOY["generator"], "freeze": True}
    resolved = resolve({**TOY, "generator": frozen, "train": {**TOY["train"], "device": "cpu"}})
    cache = LoglikCache()
    pipeline = Pipeline.from_config(resolved, toy_corpus(), loglik_cache=cache)
    run = Trainer(pipeline, resolved, toy_examples(), out_dir=tmp_path, progress=False)
    device = run.device
    assert device == torch.device("cpu")
    params = run.parameters.trained_parameters()
    assert params and all(p.device == device for p in params)
    assert all(p.device == device for p in pipeline.generator.model.parameters())
    run.train()
    batch = Batch(toy_examples()[:2])
    found = pipeline.candidates(batch, "prior", 3)  # the index query
    assert found.indices.device == device and found.scores.device == device
    assert pipeline.prior_logprobs(batch, found).device == device
    pipeline.loglik(batch, found)
    hits = cache.hits
    cached = pipeline.loglik(batch, found)  # every pair now comes from the cache
    assert cache.hits == hits + 6 and cached.device == device and cache._device == device
