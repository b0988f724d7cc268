"""Run by tests/test_data_parallel.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): one
launch for every check that needs two processes, each rank writing what it saw as JSON.

    torchrun --nproc_per_node=2 --standalone tests/torchrun_checks.py OUT CONFIG...

Each CONFIG (a toy config) is trained into OUT/<its stem>; OUT/rank<r>.json holds the
sharded-encoding and gradient-averaging checks and each training's averaging mode.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from latentrag.cli import main
from latentrag.core.interfaces import EstimatorOutput
from latentrag.plugins.dpr.sharded_encoding import encode_sharded
from latentrag.training import distributed


def vectors(texts) -> torch.Tensor:
    """A deterministic [len(texts), 3] encoding of each text."""
    return torch.tensor([[len(t), ord(t[0]), sum(map(ord, t)) / 7.0] for t in texts])


def sharded_encoding() -> dict:
    """For 8, 7 and 1 texts: how many each rank encoded and whether the gathered matrix
    equals the single-process encoding."""
    out = {}
    for count in (8, 7, 1):
        texts = [f"passage {i} " + "x" * i for i in range(count)]
        seen: list[int] = []

        def encode(part, seen=seen):
            seen.append(len(part))
            return vectors(part)

        gathered = encode_sharded(encode, texts)
        out[str(count)] = {"encoded": sum(seen), "equal": torch.equal(gathered, vectors(texts))}
    return out


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(3, 2)  # used on every rank
        self.rank0 = nn.Parameter(torch.ones(2))  # used only on rank 0
        self.never = nn.Parameter(torch.ones(2))  # used nowhere


def gradient_averaging(rank: int, nan_on_rank1: bool = False) -> dict:
    """The gradients after two accumulated micro-batches, per mode (None: no gradient).
    nan_on_rank1: rank 1's second loss is NaN without a graph (the trainer skips its
    backward; DDP must still let rank 0's all-reduce finish)."""
    model = Toy()

    def loss(batch):
        x = torch.tensor(batch)
        if nan_on_rank1 and rank == 1 and x[0, 0] == 3.0:
            return EstimatorOutput(torch.tensor(float("nan")))
        value = model.used(x).pow(2).sum()
        if rank == 0:
            value = value + (model.rank0 * x[:, :2]).sum()
        return EstimatorOutput(value)

    grads = {}
    for mode in ("exact", "ddp"):
        model.zero_grad(set_to_none=True)
        sync = distributed.GradientSync(mode, [model], list(model.parameters()), loss)
        for index, last in enumerate((False, True)):
            with sync.micro_batch(last):
                out = sync.loss([[1.0 + rank + index, 2.0, -1.0]])
                if out.loss.requires_grad:  # as the trainer does
                    out.loss.backward()
        sync.finish()
        grads[mode] = {
            name: None if p.grad is None else p.grad.flatten().tolist()
            for name, p in model.named_parameters()
        }
    return grads


def dense_refresh() -> dict:
    """A tiny dpr retriever's refresh on the toy corpus: the passages this rank encoded
    and the refreshed vectors (every rank must hold all of them)."""
    from latentrag.plugins.dpr import DPRConfig
    from latentrag.plugins.dpr.retriever import DPRRetriever
    from latentrag.toy.corpus import toy_corpus

    retriever = DPRRetriever(DPRConfig(model="tiny-random", precision="float32"))
    retriever.index(toy_corpus())  # the build: every rank encodes the whole corpus
    encoded: list[int] = []
    encode = retriever.passage_encoder.encode
    retriever.passage_encoder.encode = lambda texts, *a: (
        encoded.append(len(texts)) or encode(texts, *a)
    )
    retriever.refresh()
    return {"encoded": sum(encoded), "vectors": retriever._vectors.tolist()}


def run() -> None:
    out, configs = Path(sys.argv[1]), sys.argv[2:]
    distributed.init_from_env()
    rank = distributed.rank()
    report = {"encoding": sharded_encoding(), "gradients": gradient_averaging(rank)}
    report["nan_gradients"] = gradient_averaging(rank, nan_on_rank1=True)
    report["dense_refresh"] = dense_refresh()
    report["trainers"] = trainers = []  # per training: the averaging its trainer set up
    setup = distributed.GradientSync.__init__

    def recording(sync, *args, **kwargs):
        setup(sync, *args, **kwargs)
        trainers.append({"mode": sync.mode, "ddp": sync.ddp is not None})

    distributed.GradientSync.__init__ = recording
    for config in configs:
        main(["train", config, "--out", str(out / Path(config).stem)], standalone_mode=False)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run()
