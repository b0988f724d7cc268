"""Every estimator, a few training steps with real small models in bf16 on a device, next to
the same run in fp32 on the CPU: seconds per step and peak memory.

    .venv/bin/python benchmarks/gpu.py --device cuda [--steps 5] [--estimators topk,jsa]
    .venv/bin/python benchmarks/gpu.py --device cpu --steps 2   # runs anywhere
    .venv/bin/python benchmarks/gpu.py --device cuda --gradient-checkpointing

Models: the packaged MiniLM as the `dpr` retriever (and posterior, for vrag / jsa; the
`gumbel` reranker's inner cross-encoder for G-Rerank) and SmolLM2-135M with LoRA as the
generator, on the toy corpus (12 passages, so indexing is instant), batches of 2, k = 4.
`train.device` and `train.precision` set the run (weights stay float32; bf16 is autocast).
--gradient-checkpointing sets the generator's `gradient_checkpointing` (activations
recomputed in backward: less memory, more time) in every run, G-Rerank's frozen reader
included (its mask's gradient passes through it); the CPU reference runs get it too, so
the rows compare.

Each run is its own process, so that its peak memory is its own: on cuda the peak allocated
GPU memory (torch.cuda.max_memory_allocated), on the CPU the peak resident set size
(ru_maxrss, models and Python included). Seconds per step: the mean over steps 2..N of the
trainer's wall clock (step 1 warms up kernels and caches); with --steps 1, step 1 itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ESTIMATORS = ("topk", "topk-token", "vrag", "jsa", "pdist", "loop", "emdr2", "gumbel")
ENCODER = {"model": "minilm", "precision": "float32", "max_length": 64}


def run_config(
    estimator: str, device: str, precision: str, steps: int, checkpointing: bool = False
) -> dict[str, Any]:
    """The run's config: real small models on the toy corpus."""
    data: dict[str, Any] = {
        "data": {"source": "toy"},
        "retriever": {"name": "dpr", **ENCODER},
        "generator": {
            "name": "hf-causal-lm",
            "model": "smollm2",
            "dtype": "float32",
            "lora": {"r": 8},
            "max_passage_tokens": 64,
        },
        "estimator": {"name": estimator, "k": 4},
        "train": {
            "steps": steps,
            "batch_size": 2,
            "lr": 1e-4,
            "device": device,
            "precision": precision,
        },
    }
    if estimator in ("vrag", "jsa"):
        data["posterior"] = {"name": "dpr", **ENCODER}
    if estimator == "gumbel":
        inner = {"name": "cross-encoder", **ENCODER}
        data["reranker"] = {"name": "gumbel", "inner": inner, "k": 2}
        data["estimator"] = {"name": "gumbel", "k": 4, "k_keep": 2}
        data["generator"]["freeze"] = True
        del data["generator"]["lora"]
    if checkpointing:
        data["generator"]["gradient_checkpointing"] = True
    return data


def one_run(
    estimator: str, device: str, precision: str, steps: int, checkpointing: bool = False
) -> dict[str, Any]:
    """Train one configuration in this process; its seconds per step and peak memory."""
    import resource

    import torch

    from latentrag.core.config import resolve
    from latentrag.core.pipeline import Pipeline
    from latentrag.toy.corpus import toy_corpus, toy_examples
    from latentrag.training.loop import Trainer

    data = run_config(estimator, device, precision, steps, checkpointing)
    resolved = resolve(data, source="gpu.py")
    with tempfile.TemporaryDirectory() as out:
        pipeline = Pipeline.from_config(resolved, toy_corpus())
        trainer = Trainer(pipeline, resolved, toy_examples(), out_dir=out, progress=False)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        result = trainer.train()
        records = (Path(out) / "metrics.jsonl").read_text().splitlines()
    walls = [w for w in (json.loads(line).get("wall_s") for line in records) if w is not None]
    per_step = (walls[-1] - walls[0]) / (len(walls) - 1) if len(walls) > 1 else walls[0]
    if trainer.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        memory = "GPU allocated"
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = "RSS"
    return {
        "estimator": estimator,
        "device": str(trainer.device),
        "precision": precision,
        "s_per_step": per_step,
        "peak_mib": peak_mib,
        "memory": memory,
        "loss": result["loss"],
    }


def in_subprocess(
    estimator: str, device: str, precision: str, steps: int, checkpointing: bool = False
) -> dict[str, Any]:
    args = [sys.executable, __file__, "--one", estimator, device, precision, str(steps)]
    args += ["--gradient-checkpointing"] if checkpointing else []
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"estimator": estimator, "device": device, "precision": precision, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(result: dict[str, Any]) -> str:
    name = f"{result['estimator']:<11} {result['device']:<7} {result['precision']:<5}"
    if "error" in result:
        return f"{name} error: {result['error']}"
    return (
        f"{name} {result['s_per_step']:>8.3f} {result['peak_mib']:>9.0f} MiB "
        f"({result['memory']})  loss {result['loss']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, mps or cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--no-cpu-reference", action="store_true", help="skip the fp32 CPU runs")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="generator.gradient_checkpointing = true",
    )
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        estimator, device, precision, steps = args.one
        run = one_run(estimator, device, precision, int(steps), args.gradient_checkpointing)
        print(json.dumps(run))
        return
    print(f"{'estimator':<11} {'device':<7} {'prec':<5} {'s/step':>8} {'peak':>13}")
    checkpointing = args.gradient_checkpointing
    for estimator in args.estimators.split(","):
        gpu = in_subprocess(estimator, args.device, "bf16", args.steps, checkpointing)
        print(row(gpu), flush=True)
        if not args.no_cpu_reference:
            cpu = in_subprocess(estimator, "cpu", "fp32", args.steps, checkpointing)
            print(row(cpu), flush=True)


if __name__ == "__main__":
    main()
