"""train.data_parallel and the GPU-per-process device, in one process (the two-process
comparisons of ddp and exact are in test_distributed.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError
from latentrag.core.pipeline import Pipeline
from latentrag.plugins.dpr.sharded_encoding import encode_sharded, share
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training import device as device_module
from latentrag.training.distributed import choose_mode
from latentrag.training.loop import Trainer

TOY = {
    "data": {"source": "toy"},
    "retriever": {"name": "bow"},
    "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
    "estimator": {"name": "topk", "k": 3},
    "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "device": "cpu"},
}
CPU, GPU = torch.device("cpu"), torch.device("cuda:0")


def test_auto_is_ddp_on_gpus_under_torchrun_and_exact_otherwise():
    assert choose_mode("auto", GPU, 2) == "ddp"
    assert choose_mode("auto", CPU, 2) == "exact"
    assert choose_mode("ddp", CPU, 2) == "ddp"
    assert choose_mode("exact", GPU, 4) == "exact"
    assert [choose_mode(s, GPU, 1) for s in ("auto", "exact", "ddp")] == [None] * 3


def test_ddp_in_one_process_trains_without_a_wrapper(tmp_path, one_thread):
    settings = {**TOY, "train": {**TOY["train"], "data_parallel": "ddp"}}
    config = resolve(settings, source="toy.toml")
    pipeline = Pipeline.from_config(config, toy_corpus())
    trainer = Trainer(pipeline, config, toy_examples(), out_dir=tmp_path, progress=False)
    assert trainer.sync.mode is None and trainer.sync.ddp is None
    before = [p.detach().clone() for p in trainer.parameters.trained_parameters()]
    result = trainer.train()
    assert result["step"] == 2
    after = trainer.parameters.trained_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_an_unknown_data_parallel_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nsource = "toy"\n[retriever]\nname = "bow"\n[train]\n')
    path.write_text(path.read_text() + 'data_parallel = "fsdp"\n')
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: {path}: train.data_parallel: Input should be 'auto', 'exact' or 'ddp' "
        "(got 'fsdp')\n"
    )
    with pytest.raises(ConfigError, match="train.data_parallel"):
        resolve({**TOY, "train": {"data_parallel": "DDP"}}, source="c.toml")


def test_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    resolve_device = device_module.resolve_device
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")  # one process: the current GPU
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")  # as written
    assert resolve_device("cpu", local_rank=1) == CPU
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda", "c.toml", local_rank=2)
    assert str(caught.value) == (
        "c.toml: train.device: 'cuda' (LOCAL_RANK 2: cuda:2) but this machine has 2 GPU(s)"
    )


def test_sharded_encoding_alone_is_the_encoder_and_shares_tile_the_rows():
    texts = ["a", "bb", "ccc"]
    calls = []

    def encode(part):
        calls.append(list(part))
        return torch.tensor([[float(len(t))] for t in part])

    assert torch.equal(encode_sharded(encode, texts), torch.tensor([[1.0], [2.0], [3.0]]))
    assert calls == [texts]
    for count, world in ((7, 2), (8, 2), (10, 3), (3, 4)):
        shares = [share(count, rank, world) for rank in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in order
        sizes = [end - start for start, end in shares]
        assert max(sizes) - min(sizes) <= 1
    assert [share(7, rank, 2) for rank in (0, 1)] == [(0, 4), (4, 7)]
