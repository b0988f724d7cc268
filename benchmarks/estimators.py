"""Seconds per training step of each estimator at K=8, and the framework's overhead.

    .venv/bin/python benchmarks/estimators.py [--steps N] [--real] [--retriever bow|bm25]

Tiny part: bow prior and posterior, the tiny random llama generator, the toy corpus (12
passages), 4 questions. `--real`: the packaged SmolLM2-135M generator on the SQuAD slice.

A step is `estimator.loss(batch, pipeline)` plus `loss.backward()` (no optimizer). While it
runs, every call the step makes to the generator (loglik, token_logprobs) and to the
retrievers (retrieve, score) is recorded; "bare" replays exactly those calls directly on the
components (same arguments, same grad mode) plus one backward through the outputs that
needed grad: the model work a step cannot avoid. The ratio step / bare is the framework
overhead (candidate sets, sampling, softmaxes, bookkeeping); the target is <= 1.25x.
Times are medians of process CPU seconds, single thread (the machine is shared: wall time
would also measure the neighbours). Counts are per example:
generator forwards without and with grad, and generator backwards.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from latentrag.core.pipeline import Pipeline  # noqa: E402
from latentrag.core.registry import default_registry  # noqa: E402
from latentrag.core.types import Batch  # noqa: E402

K = 8
ESTIMATORS = {
    "topk": {"k": K},
    "topk-token": {"k": K},
    "vrag": {"k": K},
    "vrag-sampled": {"k": K, "sampled": True, "samples": 4},
    "jsa": {"k": K, "samples": 4},
    "jsa-fresh": {"k": K, "samples": 4, "chain": "fresh"},
}


def build(kind: str, name: str, **options):
    spec = default_registry().get(kind, name)
    return spec.build(spec.config_model.model_validate(options))


@dataclass
class Recorder:
    """Wraps the components' model calls and records each one with its grad mode."""

    pipeline: Pipeline
    calls: list = field(default_factory=list)
    forwards_grad: int = 0
    forwards_nograd: int = 0
    depth: int = 0  # loglik may call token_logprobs: record the outermost call only

    def __post_init__(self) -> None:
        generator = self.pipeline.generator
        for method in ("loglik", "token_logprobs"):
            setattr(generator, method, self._wrap(getattr(generator, method), counts=True))
        retrievers = {id(r): r for r in (self.pipeline.retriever, self.pipeline.posterior) if r}
        for retriever in retrievers.values():
            for method in ("retrieve", "score"):
                setattr(retriever, method, self._wrap(getattr(retriever, method), counts=False))

    def _wrap(self, method, counts: bool):
        def recorded(*args, **kwargs):
            if self.depth == 0:
                grad = torch.is_grad_enabled()
                if counts:
                    pairs = sum(len(row) for row in args[1])
                    if grad:
                        self.forwards_grad += pairs
                    else:
                        self.forwards_nograd += pairs
                self.calls.append((method, args, kwargs, grad))
            self.depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.depth -= 1

        return recorded


def replay(calls) -> None:
    """The recorded model calls, run directly, then one backward through them."""
    outputs = []
    for method, args, kwargs, grad in calls:
        with torch.set_grad_enabled(grad):
            out = method(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if grad and isinstance(out, torch.Tensor) and out.requires_grad:
            outputs.append(out.sum())
    if outputs:
        torch.stack(outputs).sum().backward()


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench(pipeline: Pipeline, batch: Batch, name: str, options: dict, steps: int) -> dict:
    estimator = build("estimator", name.removesuffix("-sampled").removesuffix("-fresh"), **options)
    recorder = Recorder(pipeline)

    def step() -> None:
        recorder.calls.clear()
        estimator.loss(batch, pipeline).loss.backward()

    step()  # warm-up (and the first visit of a persistent chain)
    forwards_grad, forwards_nograd = recorder.forwards_grad, recorder.forwards_nograd
    step_times, bare_times = [], []
    for _ in range(steps):
        step_times.append(cpu_seconds(step))
        calls = list(recorder.calls)
        recorder.depth += 1  # the replay's own nested calls are not the estimator's
        bare_times.append(cpu_seconds(lambda calls=calls: replay(calls)))
        recorder.depth -= 1
    per_example = len(batch) * steps
    step_s, bare_s = statistics.median(step_times), statistics.median(bare_times)
    return {
        "estimator": name,
        "step_s": step_s,
        "bare_s": bare_s,
        "ratio": step_s / bare_s,
        "fwd_nograd": (recorder.forwards_nograd - forwards_nograd) / per_example,
        "fwd_grad": (recorder.forwards_grad - forwards_grad) / per_example,
    }


def tiny_setup() -> tuple[Pipeline, Batch]:
    from latentrag.testing import toy_corpus, toy_examples

    pipeline = Pipeline(
        toy_corpus(),
        build("retriever", "bow", seed=0),
        build("generator", "hf-causal-lm", model="tiny-llama"),
        build("retriever", "bow", seed=1),
    )
    pipeline.index()
    return pipeline, Batch(toy_examples()[:4])


def real_setup(retriever: str, questions: int) -> tuple[Pipeline, Batch]:
    from latentrag.core.config import DataConfig
    from latentrag.data.dataset import load_dataset

    data = load_dataset(DataConfig(source="squad-slice"))
    prior = build("retriever", retriever, **({"seed": 0} if retriever == "bow" else {}))
    posterior = build("retriever", retriever, **({"seed": 1} if retriever == "bow" else {}))
    pipeline = Pipeline(data.corpus, prior, build("generator", "hf-causal-lm"), posterior)
    pipeline.index()
    return pipeline, Batch(data.split("train", questions))


def table(rows: list[dict]) -> str:
    lines = [
        "| estimator    | step s | bare s | step/bare | fwd no-grad/ex | fwd grad/ex = bwd/ex |",
        "|--------------|--------|--------|-----------|----------------|----------------------|",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']:<12} | {r['step_s']:6.3f} | {r['bare_s']:6.3f} "
            f"| {r['ratio']:8.2f}x | {r['fwd_nograd']:14.2f} | {r['fwd_grad']:20.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="also SmolLM2-135M on SQuAD")
    parser.add_argument("--retriever", choices=["bow", "bm25"], default="bow")
    parser.add_argument("--questions", type=int, default=2, help="batch size with --real")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in args.estimators.split(",") if n]
    setups = [("tiny-llama, toy corpus (12 passages), 4 questions", tiny_setup, ())]
    if args.real:
        label = f"SmolLM2-135M, SQuAD slice, {args.questions} questions, {args.retriever}"
        setups.append((label, real_setup, (args.retriever, args.questions)))
    for label, setup, setup_args in setups:
        pipeline, batch = setup(*setup_args)
        print(f"\n## {label}, K={K}, {args.steps} steps, single thread\n")
        print(table([bench(pipeline, batch, n, ESTIMATORS[n], args.steps) for n in names]))


if __name__ == "__main__":
    main()
