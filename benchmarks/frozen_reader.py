"""Training steps with the frozen SmolLM2 reader, with and without its passage cache.

    .venv/bin/python benchmarks/frozen_reader.py [--steps 3] [--batch-size 2] [--k 4]
        [--keep 2] [--max-passage-tokens 128] [--cache-mb 256] [--rss-budget-mb 4096]
        [--dtype float32] [--precision float32]

Two estimators on the shipped SQuAD slice, each over the same `--steps` batches of
training questions, in one process:

- G-Rerank (examples/grerank.toml): BM25 proposes k candidates, the MiniLM cross-encoder
  scores them, the frozen SmolLM2-135M reads all k at once under the relaxed top-`keep`
  mask; the loss backpropagates through the reader into the cross-encoder.
- top-K (RAG-Sequence): the MiniLM bi-encoder's top k passages, each read on its own by
  the same frozen SmolLM2 (passage first in the prompt); the loss reaches the query encoder.

Each runs three times: with an empty cache (the first epoch: every passage is computed
once, then kept), again with the cache warm (a later epoch, or a passage another question
already brought), and without the cache (last, so that the peak RSS of the cached passes
is measured before the uncached ones' activations). The Gumbel noise and dropout are reseeded per
step, so the three runs must give the same losses and gradients (to float tolerance);
the script prints the largest differences, seconds per step, the speed-up, the seconds
per step spent in the reader's scoring calls (forward only) and each pass's peak RSS.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from latentrag.core.config import load_config, resolve  # noqa: E402
from latentrag.core.pipeline import Pipeline  # noqa: E402
from latentrag.core.types import Batch, Example  # noqa: E402
from latentrag.data import load_squad_slice  # noqa: E402
from latentrag.plugins.hf_generator.passage_cache import PassageCache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRERANK = ROOT / "examples" / "grerank.toml"


@dataclass
class Run:
    losses: list[float]
    grads: list[torch.Tensor]
    seconds: list[float]
    reader_seconds: float = 0.0
    peak_mb: float = 0.0

    @property
    def per_step(self) -> float:
        return sum(self.seconds) / len(self.seconds)


def memory_mb() -> tuple[float, float]:
    """(current, peak since the last `reset_peak`) resident set size in MB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: "5" > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class ReaderClock:
    """Seconds spent in the generator's scoring calls (forward only: G-Rerank's backward
    through the reader is not included)."""

    def __init__(self, generator) -> None:
        self.seconds = 0.0
        self._depth = 0  # loglik calls token_logprobs: time the outer call only
        for name in ("loglik", "token_logprobs", "loglik_joint"):
            setattr(generator, name, self._timed(getattr(generator, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            self._depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - started

        return timed


def trained_parameters(pipeline: Pipeline) -> list[torch.nn.Parameter]:
    roles = pipeline.roles()
    return [
        p
        for role in pipeline.estimator.trained_roles()
        for module in getattr(roles.get(role), "trainable_modules", dict)().values()
        for p in module.parameters()
        if p.requires_grad
    ]


def run_steps(pipeline: Pipeline, batches: list[Batch], seed: int, rng: list | None) -> Run:
    """One loss + backward per batch (no optimizer step: every run sees the same weights);
    `rng`: the estimator's random state to start every step from (G-Rerank's noise)."""
    params = trained_parameters(pipeline)
    estimator = pipeline.estimator
    clock: ReaderClock = pipeline.generator.clock
    reader_before = clock.seconds
    reset_peak()
    run = Run([], [], [])
    for step, batch in enumerate(batches):
        torch.manual_seed(seed + step)  # the same dropout in every run
        if rng is not None:
            estimator.load_rng_state(rng)  # the same Gumbel noise in every run
        for p in params:
            p.grad = None
        started = time.perf_counter()
        out = estimator.loss(batch, pipeline)
        out.loss.backward()
        run.seconds.append(time.perf_counter() - started)
        run.losses.append(out.loss.item())
        run.grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    run.reader_seconds = (clock.seconds - reader_before) / len(batches)
    run.peak_mb = memory_mb()[1]
    return run


def largest_differences(run: Run, reference: Run) -> tuple[float, float]:
    loss = max(abs(a - b) for a, b in zip(run.losses, reference.losses))
    grad = max((a - b).abs().max().item() for a, b in zip(run.grads, reference.grads))
    return loss, grad


def grerank_pipeline(args, corpus) -> Pipeline:
    overrides = [
        f"estimator.k={args.k}",
        f"estimator.k_keep={args.keep}",
        f"reranker.k={args.keep}",
        f"generator.max_passage_tokens={args.max_passage_tokens}",
        f"generator.passage_cache_mb={args.cache_mb}",
        f"generator.dtype={args.dtype}",
        f"reranker.inner.precision={args.precision}",
    ]
    return Pipeline.from_config(load_config(GRERANK, overrides), corpus)


def topk_pipeline(args, corpus, generator) -> Pipeline:
    """Bi-encoder top-K reading with the G-Rerank pipeline's generator (loaded once)."""
    data = {
        "data": {"source": "squad-slice"},
        "retriever": {"name": "dpr", "model": "minilm", "precision": args.precision},
        "generator": {
            "name": "hf-causal-lm",
            "model": "smollm2",
            "freeze": True,
            "dtype": args.dtype,
        },
        "estimator": {"name": "topk", "k": args.k},
    }
    resolved = resolve(data, "<frozen_reader top-K>")
    context = resolved.build_context()
    built = {
        role: spec.build(cfg, context)
        for role, (spec, cfg) in resolved.components.items()
        if role != "generator"
    }
    pipeline = Pipeline(corpus, generator=generator, **built)
    pipeline.index()
    return pipeline


@dataclass
class Comparison:
    name: str
    pipeline: Pipeline
    rng: list | None
    runs: dict[str, Run]
    cache: PassageCache | None = None
    cold_stats: dict[str, int] | None = None


def cached_runs(name: str, pipeline: Pipeline, batches: list[Batch], args) -> Comparison:
    """The cold then the warm pass, with a fresh cache of `--cache-mb`."""
    estimator = pipeline.estimator
    rng = estimator.rng_state() if hasattr(estimator, "rng_state") else None
    cache = PassageCache(int(args.cache_mb * 2**20))
    pipeline.generator.passage_cache = cache
    cold = run_steps(pipeline, batches, args.seed, rng)
    stats = cache.stats()
    warm = run_steps(pipeline, batches, args.seed, rng)
    return Comparison(name, pipeline, rng, {"cache, cold": cold, "cache, warm": warm}, cache, stats)


def uncached_run(comparison: Comparison, batches: list[Batch], args) -> None:
    comparison.pipeline.generator.passage_cache = None
    plain = run_steps(comparison.pipeline, batches, args.seed, comparison.rng)
    comparison.runs = {"no cache": plain, **comparison.runs}


def table_rows(comparison: Comparison, args) -> list[dict]:
    plain = comparison.runs["no cache"]
    rows = []
    for mode, run in comparison.runs.items():
        loss_diff, grad_diff = largest_differences(run, plain)
        rows.append(
            {
                "estimator": comparison.name,
                "mode": mode,
                "s/step": run.per_step,
                "speed-up": plain.per_step / run.per_step,
                "reader fwd": run.reader_seconds,
                "peak MB": run.peak_mb,
                "loss": sum(run.losses) / len(run.losses),
                "max |dloss|": loss_diff,
                "max |dgrad|": grad_diff,
            }
        )
    cache, cold = comparison.cache, comparison.cold_stats
    largest = max(g.abs().max().item() for g in plain.grads)
    print(
        f"{comparison.name}: cold pass {cold['misses']} passage reads computed, "
        f"{cold['hits']} from the cache; warm pass {cache.hits - cold['hits']} "
        f"from the cache; {len(cache)} entries, {cache.bytes / 2**20:.1f} MB of "
        f"{args.cache_mb:g} MB; largest |grad| {largest:.3g}"
    )
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'estimator':<9} {'mode':<12} {'s/step':>7} {'speed-up':>8} {'reader fwd':>10}"
    print(header + f" {'peak MB':>7} {'loss':>9} {'max |dloss|':>11} {'max |dgrad|':>11}")
    for r in rows:
        print(
            f"{r['estimator']:<9} {r['mode']:<12} {r['s/step']:7.2f} {r['speed-up']:7.1f}x "
            f"{r['reader fwd']:10.2f} {r['peak MB']:7.0f} {r['loss']:9.4f} "
            f"{r['max |dloss|']:11.2e} {r['max |dgrad|']:11.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="passages read per question")
    parser.add_argument("--keep", type=int, default=2, help="k of G-Rerank's relaxed mask")
    parser.add_argument("--max-passage-tokens", type=int, default=128)
    parser.add_argument("--cache-mb", type=float, default=256.0)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "auto"],
        help="the reader's weights (float32: the 1e-4 check is about float32 tolerance)",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "bf16-mixed", "auto"],
        help="the trained encoders' precision (in bfloat16, the reader's float32 rounding "
        "differences reach the gradients at bfloat16's resolution, ~1e-2 here)",
    )
    parser.add_argument("--rss-budget-mb", type=float, default=4096.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="1: small ops do not wait on a busy core"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus, train = load_squad_slice("train")
    order: list[Example] = list(train)
    random.Random(args.seed).shuffle(order)
    size = args.batch_size
    batches = [Batch(order[i * size : (i + 1) * size]) for i in range(args.steps)]
    started = time.perf_counter()
    grerank = grerank_pipeline(args, corpus)
    topk = topk_pipeline(args, corpus, grerank.generator)
    grerank.generator.clock = ReaderClock(grerank.generator)
    print(
        f"pipelines built in {time.perf_counter() - started:.0f}s ({memory_mb()[0]:.0f} MB "
        f"RSS); {args.steps} steps x {size} questions, k={args.k}, passages <= "
        f"{args.max_passage_tokens} tokens, {torch.get_num_threads()} threads"
    )
    # the cached passes first, so that the peak RSS they reach is measured on its own
    comparisons = [
        cached_runs("G-Rerank", grerank, batches, args),
        cached_runs("top-K", topk, batches, args),
    ]
    for comparison in comparisons:
        uncached_run(comparison, batches, args)
    rows = [row for comparison in comparisons for row in table_rows(comparison, args)]
    print()
    print_table(rows)
    cached_peak = max(r["peak MB"] for r in rows if r["mode"] != "no cache")
    verdict = "within" if cached_peak <= args.rss_budget_mb else "OVER"
    print(
        f"\npeak RSS of the cached passes {cached_peak:.0f} MB: {verdict} the "
        f"{args.rss_budget_mb:g} MB budget (the cache itself holds <= {args.cache_mb:g} MB)"
    )
    ok = all(r["max |dloss|"] <= 1e-4 and r["max |dgrad|"] <= 1e-4 for r in rows)
    warm = next(r for r in rows if r["estimator"] == "G-Rerank" and r["mode"] == "cache, warm")
    print(f"losses and gradients equal within 1e-4: {'yes' if ok else 'NO'}")
    print(f"G-Rerank warm speed-up {warm['speed-up']:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
