"""Latent retrieval learned from the language-modelling signal alone, every estimator alike.

The controlled benchmark (run by `benchmarks/latent_retrieval.py`) and the controlled part of
`latentrag demo` share this module:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_retrieval.py [--quick] [--seeds 5]
        [--ks 2,8] [--estimators topk,jsa-corpus-persistent,...] [--jobs 1] [--out DIR]

The task (`latentrag.toy.vault`): 200 passages "<fillers> <key> <fillers> code <s1> <s2>";
questions name a passage's key (each key word paraphrased by a synonym with probability
0.3, two distractor words mixed in) and are answered by its two-syllable code. 150 passages
have three differently worded training questions each (450), the 50 others one held-out
question each. No gold passage is ever used in training: the retriever learns only from
log p(answer | question, passage).

For a seed, every estimator starts from the same initialisation (same task, same retriever,
posterior and reader weights) and trains for the same number of steps on the same examples
in the same order, through the real trainer: a `Trainer` is constructed per segment and
resumed from its checkpoint (the documented way to extend a run), the configs go through
`resolve()` with the installed estimator plugins.

- retriever p(h|x) and posterior q(h|x,y): the builtin `bow` dual encoder (shared
  embeddings, so lexical overlap counts from the start: held-out recall@1 starts near 0.1).
  The posterior reads "question answer", so the code points at the gold passage;
- generator: `latentrag.toy.slot_reader.SlotReader`, which learns which passage slot to copy
  into which answer position (it starts copying any code syllable of the passage, weakly);
- G-Rerank needs a reranker: a bow text reranker initialised exactly as the retriever (same
  seed). It reranks the frozen retriever's top-K, in training and at evaluation, so its
  recall@1 and marginal likelihood are measured over that top-K with the reranker's scores
  (bounded by the frozen retriever's recall@K).

Measured at fixed steps: on the held-out questions, the exact marginal log-likelihood
log Σ_{h ∈ corpus} softmax(s(x,h)/T) p(y|x,h) (a sum over all passages) and gold recall@1;
gold recall@1 on the training questions; the compute spent so far in generator passes
(forward + backward, as the estimators report them in EstimatorOutput; EMDR2 reports none,
so the pipeline's count of scored pairs is used, each with a backward). For JSA also its
chain: the acceptance rate of the steps before each point, and, on 64 training questions
over its candidate set, the importance-sampling effective sample size of q for the exact
posterior π (1 / Σ π²/q, as a fraction of the draws; mean) and max π/q (median over
questions). Results (benchmarks/results/latent_retrieval/): table.md (mean and 95%
t-interval over seeds), runs.json and runs.csv (every run, every point), and one two-panel
PNG per K.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from latentrag import hookimpl
from latentrag.core.config import BuildContext, resolve
from latentrag.core.interfaces import Reranker
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import Registry, default_registry
from latentrag.core.types import Batch, Example
from latentrag.toy.slot_reader import SlotReader, SlotReaderConfig
from latentrag.toy.vault import VaultTask, build_vault_task
from latentrag.training.loop import Trainer

OUT = Path("benchmarks") / "results" / "latent_retrieval"


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides the estimator, K and the seed."""

    passages: int = 200
    questions_per_passage: int = 3  # differently worded training questions per passage
    synonym_rate: float = 0.3  # chance that a key word is paraphrased in a question
    distractors: int = 2  # filler words mixed into each question
    steps: int = 300
    batch_size: int = 8
    checkpoints: int = 10  # evaluation points after step 0, evenly spaced
    k: int = 8  # candidates: top-K (and EMDR2, PDist, LOOP, G-Rerank), VRAG's posterior top-K
    samples: int = 4  # proposals / samples per example (JSA, sampled VRAG)
    temperature: float = 1.0  # of p(h|x) and q(h|x,y), also in the exact marginal
    dim: int = 128  # bow embedding size
    lr: float = 0.05  # AdamW, every trained role
    copy_init: float = 2.0  # the reader's initial copy weight
    chain_questions: int = 64  # training questions for the JSA chain diagnostics


FULL = Settings()
QUICK = Settings(passages=100, steps=120, checkpoints=6)

#: label -> estimator section; k, temperature, samples and seeds are filled in per run
ESTIMATORS: dict[str, dict] = {
    "topk": {"name": "topk"},
    "topk-token": {"name": "topk-token"},
    "vrag": {"name": "vrag"},
    "vrag-sampled": {"name": "vrag", "sampled": True},
    "jsa-union-persistent": {"name": "jsa", "candidates": "union", "chain": "persistent"},
    "jsa-union-fresh": {"name": "jsa", "candidates": "union", "chain": "fresh"},
    "jsa-corpus-persistent": {"name": "jsa", "candidates": "corpus", "chain": "persistent"},
    "jsa-corpus-fresh": {"name": "jsa", "candidates": "corpus", "chain": "fresh"},
    "emdr2": {"name": "emdr2"},
    "gumbel": {"name": "gumbel", "k_keep": 1, "train_generator": True},
    # builtin pdist and loop: run when the registry has them (see `available`)
    "pdist": {"name": "pdist", "train_generator": "marginal"},
    "loop": {"name": "loop"},
}


# -- the components the benchmark adds (an in-process plugin) --------------------------------


class BowTextReranker(nn.Module, Reranker):
    """A reranker with the `bow` retriever's encoders (same config, same initial weights),
    scoring passage texts: score = enc_q(query) · enc_p(passage)."""

    def __init__(self, config, context: BuildContext) -> None:
        super().__init__()
        self.config = config
        self.bow = context.registry.get("retriever", "bow").build(config)

    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        query_encoder, passage_encoder = self.bow.encoders()
        flat = [p for row in passages for p in row]
        distinct = list(dict.fromkeys(flat))  # each distinct text encoded once
        slot = {text: i for i, text in enumerate(distinct)}
        vectors = passage_encoder.encode(distinct)[torch.tensor([slot[p] for p in flat])]
        vectors = vectors.view(len(queries), len(passages[0]), -1)
        return torch.einsum("bd,bkd->bk", query_encoder.encode(queries), vectors)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.bow.trainable_modules()


class BenchmarkPlugin:
    """Registers the slot reader and the bow text reranker."""

    @hookimpl
    def register_components(self, register) -> None:
        bow_config = default_registry().get("retriever", "bow").config_model
        register("generator", "slot-reader", SlotReader, SlotReaderConfig, "copying toy reader")
        register("reranker", "bow-text", BowTextReranker, bow_config, "bow encoders as reranker")


def benchmark_registry() -> Registry:
    """The installed plugins plus this benchmark's components."""
    registry = Registry().load()
    registry.register(BenchmarkPlugin(), "latent-retrieval-benchmark")
    return registry


def available(registry: Registry, labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """(labels whose estimator is registered, labels skipped because it is not)."""
    names = {spec.name for spec in registry.components("estimator")}
    kept = [label for label in labels if ESTIMATORS[label]["name"] in names]
    return kept, [label for label in labels if label not in kept]


# -- task and configs ------------------------------------------------------------------------


def depends_on_k(label: str) -> bool:
    """JSA keeps its own candidate pool (its default: the prior's and the posterior's top
    32, or the whole corpus): its runs are the same for every K."""
    return ESTIMATORS[label]["name"] != "jsa"


def make_task(settings: Settings, seed: int) -> VaultTask:
    return build_vault_task(
        settings.passages,
        synonym_rate=settings.synonym_rate,
        distractors=settings.distractors,
        questions_per_passage=settings.questions_per_passage,
        seed=seed,
    )


def pipeline_config(label: str, task: VaultTask, settings: Settings, seed: int, steps: int) -> dict:
    """The config dict of one run (resolved by `resolve`, like a TOML file)."""
    bow = {"name": "bow", "shared": True, "dim": settings.dim}
    estimator = dict(ESTIMATORS[label])
    estimator["temperature"] = settings.temperature
    if depends_on_k(label):
        estimator["k"] = settings.k
    if estimator["name"] in ("jsa", "vrag"):
        estimator.update(samples=settings.samples, seed=seed)
    if estimator["name"] == "gumbel":
        estimator["seed"] = seed
    data = {
        "retriever": {**bow, "seed": seed},
        "posterior": {**bow, "seed": 1000 + seed},
        "generator": {
            "name": "slot-reader",
            "outputs": list(task.syllables),
            "copy_init": settings.copy_init,
        },
        "estimator": estimator,
        "train": {
            "steps": steps,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "seed": seed,
            "keep_last": 1,
        },
    }
    if estimator["name"] == "gumbel":
        inner = {**bow, "name": "bow-text", "seed": seed}  # initialised as the retriever
        data["reranker"] = {"name": "gumbel", "inner": inner, "k": 1, "seed": seed}
        data["eval"] = {"rerank_pool": settings.k}
    return data


# -- measurements ----------------------------------------------------------------------------


@torch.no_grad()
def corpus_metrics(pipeline: Pipeline, examples: list[Example], temperature: float, k: int) -> dict:
    """Exact marginal log-likelihood (mean over questions) and gold recall@1 over the whole
    corpus with the retriever's scores; with a reranker (G-Rerank), over what it reranks:
    the frozen retriever's top k, as the pipeline retrieves (eval.rerank_pool = k)."""
    corpus = pipeline.corpus
    questions = [e.question for e in examples]
    if pipeline.reranker is not None:
        rows = pipeline.retriever.retrieve(questions, k).indices
        scores = pipeline.reranker.score(questions, pipeline.passages(rows))
    else:
        rows = torch.arange(len(corpus)).expand(len(examples), -1)
        scores = pipeline.retriever.score(questions, rows)
    log_prior = torch.log_softmax(scores / temperature, dim=-1)
    targets = [e.target for e in examples]
    loglik = pipeline.generator.loglik(questions, pipeline.passages(rows), targets)
    marginal = torch.logsumexp(log_prior + loglik, dim=-1)
    gold = torch.tensor([corpus.index_of(e.gold_ids[0]) for e in examples])
    top = rows.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
    return {
        "marginal_loglik": float(marginal.mean()),
        "recall@1": float((top == gold).float().mean()),
    }


@torch.no_grad()
def chain_diagnostics(pipeline: Pipeline, examples: list[Example], config) -> dict:
    """How well JSA's proposal q fits the exact posterior π over its candidate set:
    importance-sampling ESS fraction 1/Σ π²/q (mean over questions) and max π/q (median)."""
    batch = Batch(examples)
    cand = pipeline.candidates(batch, config.candidates, config.k)
    log_prior = pipeline.prior_logprobs(batch, cand, config.temperature)
    log_q = pipeline.posterior_logprobs(batch, cand, config.temperature)
    passages = pipeline.passages(cand.indices)
    loglik = pipeline.generator.loglik(batch.questions, passages, batch.targets, config.loglik)
    valid = cand.valid()
    log_pi = torch.log_softmax(torch.where(valid, log_prior + loglik, -math.inf), dim=-1)
    log_ratio = torch.where(valid, log_pi - log_q, -math.inf)
    second_moment = torch.logsumexp(torch.where(valid, 2 * log_pi - log_q, -math.inf), -1)
    return {
        "ess_fraction": float(torch.exp(-second_moment).mean()),
        "max_pi_over_q": float(log_ratio.max(-1).values.exp().median()),
    }


def metric_lines(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# -- one run ---------------------------------------------------------------------------------


def checkpoint_steps(settings: Settings) -> list[int]:
    count = settings.checkpoints
    return sorted({round(settings.steps * i / count) for i in range(1, count + 1)})


@dataclass
class Run:
    """One estimator trained from one seed's initialisation, measured along the way."""

    label: str
    seed: int
    settings: Settings
    task: VaultTask
    pipeline: Pipeline
    registry: Registry
    points: list[dict]
    forwards: int = 0
    backwards: int = 0
    counted_by_pipeline: bool = False

    def measure(self, step: int, acceptance: list[float]) -> None:
        """Held-out (and training) metrics at `step`, the passes so far, JSA's chain."""
        temperature = self.settings.temperature
        point = {
            "step": step,
            "generator_forwards": self.forwards,
            "generator_backwards": self.backwards,
            "generator_passes": self.forwards + self.backwards,
            **corpus_metrics(self.pipeline, self.task.heldout, temperature, self.settings.k),
            "train_recall@1": corpus_metrics(
                self.pipeline, self.task.train, temperature, self.settings.k
            )["recall@1"],
        }
        config = self.pipeline.estimator.config
        if ESTIMATORS[self.label]["name"] == "jsa":
            sample = self.task.train[: self.settings.chain_questions]
            point.update(chain_diagnostics(self.pipeline, sample, config))
            point["acceptance_rate"] = statistics.fmean(acceptance) if acceptance else None
        self.points.append(point)

    def train_to(self, step: int, previous: int, out_dir: Path) -> list[float]:
        """Extend training from `previous` to `step` (a new Trainer resuming from its
        checkpoint); count the passes; return the steps' JSA acceptance rates."""
        data = pipeline_config(self.label, self.task, self.settings, self.seed, step)
        resolved = resolve(data, f"<{self.label}>", self.registry)
        before = self.pipeline.generator_forwards
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the trainer's notes on inexact resumes
            trainer = Trainer(
                self.pipeline, resolved, self.task.train, None, out_dir, progress=False
            )
            trainer.train(resume=previous > 0)
        lines = [line for line in metric_lines(out_dir) if previous < line["step"] <= step]
        reported = sum(line.get("generator_forwards", 0) for line in lines)
        if reported == 0:  # EMDR2 reports no counts: every scored pair, with its backward
            self.counted_by_pipeline = True
            reported = self.pipeline.generator_forwards - before
            self.backwards += reported
        else:
            self.backwards += sum(line.get("generator_backwards", 0) for line in lines)
        self.forwards += reported
        return [line["acceptance_rate"] for line in lines if "acceptance_rate" in line]


def run_one(label: str, seed: int, settings: Settings, registry: Registry) -> dict:
    """Train `label` from seed `seed`'s initialisation; measure at every checkpoint."""
    started = time.perf_counter()
    task = make_task(settings, seed)
    resolved = resolve(pipeline_config(label, task, settings, seed, 0), f"<{label}>", registry)
    run = Run(
        label, seed, settings, task, Pipeline.from_config(resolved, task.corpus), registry, []
    )
    run.measure(0, [])
    with tempfile.TemporaryDirectory() as tmp:
        previous = 0
        for step in checkpoint_steps(settings):
            acceptance = run.train_to(step, previous, Path(tmp) / "run")
            run.measure(step, acceptance)
            previous = step
    seen = settings.steps * settings.batch_size
    return {
        "estimator": label,
        "k": settings.k,
        "seed": seed,
        "trains": list(run.pipeline.estimator.trained_roles()),
        "estimator_config": run.pipeline.estimator.config.model_dump(mode="json"),
        "forwards_per_example": run.forwards / seen,
        "backwards_per_example": run.backwards / seen,
        "passes_per_example": (run.forwards + run.backwards) / seen,
        "passes_counted_by_pipeline": run.counted_by_pipeline,
        "wall_s": round(time.perf_counter() - started, 2),
        "points": run.points,
    }


# -- many runs -------------------------------------------------------------------------------

_WORKER_REGISTRY: Registry | None = None


def _worker(job: tuple[str, int, Settings]) -> dict:
    global _WORKER_REGISTRY
    torch.set_num_threads(1)
    if _WORKER_REGISTRY is None:
        _WORKER_REGISTRY = benchmark_registry()
    label, seed, settings = job
    return run_one(label, seed, settings, _WORKER_REGISTRY)


def run_all(
    labels: Sequence[str],
    ks: Sequence[int],
    seeds: int,
    settings: Settings,
    jobs: int = 1,
    log=print,
) -> list[dict]:
    """Every (K, estimator, seed) run, listed in that order, on `jobs` worker processes; a
    run that does not depend on K is made once and listed under every K (marked
    `same_run_as_k`)."""
    work = [
        (label, seed, replace(settings, k=k))
        for k in ks
        for label in labels
        if depends_on_k(label) or k == ks[0]
        for seed in range(seeds)
    ]
    pool = None
    if jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(jobs)
    done = {}
    try:
        for run in pool.imap(_worker, work) if pool else map(_worker, work):
            done[(run["k"], run["estimator"], run["seed"])] = run
            final = run["points"][-1]
            log(
                f"[{len(done)}/{len(work)}] K={run['k']} {run['estimator']:<22} seed "
                f"{run['seed']}: held-out recall@1 {final['recall@1']:.2f}, marginal "
                f"{final['marginal_loglik']:.2f}, {run['wall_s']:.1f}s"
            )
    finally:
        if pool is not None:
            pool.close()
    runs = []
    for k in ks:
        for label in labels:
            for seed in range(seeds):
                run = done.get((k, label, seed))
                if run is None:  # independent of K: the run made for the first K
                    run = {**done[(ks[0], label, seed)], "k": k, "same_run_as_k": ks[0]}
                runs.append(run)
    return runs


# -- summaries -------------------------------------------------------------------------------


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (the bounds equal the mean for one value)."""
    from scipy.stats import t

    values = [v for v in values if v is not None]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _ci(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> str:
    """ "mean [low, high]", the interval clipped to the metric's range (recall: [0, 1])."""
    mean, low, high = interval(values)
    low, high = max(low, bounds[0]), min(high, bounds[1])
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


UNIT = (0.0, 1.0)


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per (K, estimator): final held-out numbers with 95% intervals, cost, JSA."""
    rows = []
    for k, label in dict.fromkeys((run["k"], run["estimator"]) for run in runs):
        group = [run for run in runs if (run["k"], run["estimator"]) == (k, label)]
        finals = [run["points"][-1] for run in group]
        row = {
            "K": k,
            "estimator": label,
            "seeds": len(group),
            "candidates": candidate_set(group[0]["estimator_config"]),
            "held-out recall@1": _ci([p["recall@1"] for p in finals], UNIT),
            "held-out marginal log-lik": _ci([p["marginal_loglik"] for p in finals]),
            "train recall@1": _ci([p["train_recall@1"] for p in finals], UNIT),
            "passes/example (fwd+bwd)": "{:.1f} ({:.1f}+{:.1f})".format(
                statistics.fmean(r["passes_per_example"] for r in group),
                statistics.fmean(r["forwards_per_example"] for r in group),
                statistics.fmean(r["backwards_per_example"] for r in group),
            ),
            "trains": "+".join(group[0]["trains"]),
        }
        if "ess_fraction" in finals[0]:
            row["JSA acceptance / ESS / max π/q"] = "{:.2f} / {:.2f} / {:.1f}".format(
                statistics.fmean(p["acceptance_rate"] for p in finals),
                statistics.fmean(p["ess_fraction"] for p in finals),
                statistics.median(p["max_pi_over_q"] for p in finals),
            )
        rows.append(row)
    return rows


def candidate_set(config: dict) -> str:
    """Where an estimator's candidates come from, e.g. "prior top-2", "corpus"."""
    source = config.get("candidates", "prior")
    return source if source == "corpus" else f"{source} top-{config['k']}"


def start_row(runs: list[dict]) -> str:
    """The shared starting point (step 0 is the same for every estimator of a seed)."""
    first = {}
    for run in runs:
        first.setdefault(run["seed"], run["points"][0])
    points = list(first.values())
    return (
        f"At step 0 (every estimator, {len(points)} seeds): held-out recall@1 "
        f"{_ci([p['recall@1'] for p in points], UNIT)}, held-out marginal log-lik "
        f"{_ci([p['marginal_loglik'] for p in points])}, train recall@1 "
        f"{_ci([p['train_recall@1'] for p in points], UNIT)}."
    )


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


CSV_FIELDS = (
    "k",
    "estimator",
    "seed",
    "step",
    "generator_forwards",
    "generator_backwards",
    "generator_passes",
    "marginal_loglik",
    "recall@1",
    "train_recall@1",
    "acceptance_rate",
    "ess_fraction",
    "max_pi_over_q",
)


def write_csv(runs: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            for point in run["points"]:
                writer.writerow(
                    {"k": run["k"], "estimator": run["estimator"], "seed": run["seed"], **point}
                )


# -- the plot --------------------------------------------------------------------------------

STYLE = {  # label -> (colour, line style)
    "topk": ("#1f77b4", "-"),
    "topk-token": ("#1f77b4", "--"),
    "vrag": ("#ff7f0e", "-"),
    "vrag-sampled": ("#ff7f0e", "--"),
    "jsa-union-persistent": ("#2ca02c", "-"),
    "jsa-union-fresh": ("#2ca02c", "--"),
    "jsa-corpus-persistent": ("#17becf", "-"),
    "jsa-corpus-fresh": ("#17becf", "--"),
    "emdr2": ("#9467bd", "-"),
    "gumbel": ("#8c564b", "-"),
    "pdist": ("#e377c2", "-"),
    "loop": ("#7f7f7f", "-"),
}


GROUPS = (  # rows of the figure; top-K is repeated in the second row as the reference
    (
        "top-K and LM-supervised retrieval",
        ("topk", "topk-token", "emdr2", "pdist", "loop", "gumbel"),
    ),
    (
        "posterior-guided",
        (
            "topk",
            "vrag",
            "vrag-sampled",
            "jsa-union-persistent",
            "jsa-union-fresh",
            "jsa-corpus-persistent",
            "jsa-corpus-fresh",
        ),
    ),
)
PANELS = (
    ("marginal_loglik", "held-out exact marginal log-likelihood (nats)", None),
    ("recall@1", "held-out gold recall@1", UNIT),
)


def _curve(group: list[dict], metric: str, bounds) -> tuple[list, list, list, list]:
    """x (mean passes over seeds), mean, low, high at every point after step 0."""
    xs, means, lows, highs = [], [], [], []
    for i in range(1, len(group[0]["points"])):
        points = [run["points"][i] for run in group]
        xs.append(statistics.fmean(p["generator_passes"] for p in points))
        mean, low, high = interval([p[metric] for p in points])
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        means.append(mean), lows.append(low), highs.append(high)
    return xs, means, lows, highs


def plot(runs: list[dict], k: int, path: Path) -> None:
    """Columns: held-out marginal log-likelihood and recall@1 against generator passes (log
    scale), mean over seeds with 95% bands; rows: two groups of estimators (top-K in both);
    the dotted line is step 0, shared by every estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    runs = [run for run in runs if run["k"] == k]
    present = list(dict.fromkeys(run["estimator"] for run in runs))
    fig, axes = plt.subplots(
        2, 2, figsize=(13, 9), sharey="col", sharex=True, constrained_layout=True
    )
    for row, (group_title, labels) in enumerate(GROUPS):
        for col, (metric, title, bounds) in enumerate(PANELS):
            ax = axes[row, col]
            for label in (label for label in labels if label in present):
                group = [run for run in runs if run["estimator"] == label]
                xs, means, lows, highs = _curve(group, metric, bounds)
                colour, style = STYLE.get(label, ("black", ":"))
                ax.plot(xs, means, style, color=colour, label=label, marker=".", lw=1.8)
                ax.fill_between(xs, lows, highs, color=colour, alpha=0.13, lw=0)
            start = statistics.fmean(run["points"][0][metric] for run in runs)
            ax.axhline(start, color="black", ls=":", lw=1, label="step 0 (all)")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_title(f"{title}: {group_title}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if row == 1:
                ax.set_xlabel("generator passes so far (forward + backward), log scale")
        axes[row, 1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    seeds = len({run["seed"] for run in runs})
    fig.suptitle(
        f"Latent retrieval from the LM signal alone, K = {k}: mean and 95% t-interval over "
        f"{seeds} seeds, same initialisation and steps for every estimator"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small task, short runs, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per estimator (5)")
    parser.add_argument("--ks", default="2,8", help="candidate-set sizes K, comma-separated")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="labels to run")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--from", dest="source", type=Path, help="rewrite table and plots from a runs.json"
    )
    return parser.parse_args(argv)


def write_outputs(payload: dict, out: Path) -> str:
    """runs.json, runs.csv, table.md and one PNG per K under `out`; returns the table text."""
    runs = payload["runs"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(payload, indent=1) + "\n", "utf-8")
    write_csv(runs, out / "runs.csv")
    made = len([run for run in runs if "same_run_as_k" not in run])
    text = [
        f"# Latent retrieval benchmark ({payload['mode']})",
        "",
        f"{made} runs ({len(runs)} rows: JSA's listed under every K), wall time "
        f"{payload['wall_s']:.0f} s with {payload['jobs']} process(es). " + start_row(runs),
        "",
        markdown_table(summary_rows(runs)),
        "",
        "JSA keeps its own candidate pool (its default: the prior's and the posterior's top "
        "32, or the corpus), so its rows are the same runs under every K. Intervals are "
        "t-intervals over seeds, clipped to [0, 1] for recall. max π/q: median over seeds of "
        "the median over questions.\n",
    ]
    if payload["skipped"]:
        text.append(f"Not registered, skipped: {', '.join(payload['skipped'])}.\n")
    (out / "table.md").write_text("\n".join(text), "utf-8")
    for k in payload["ks"]:
        plot(runs, k, out / f"curves_k{k}.png")
    return "\n".join(text)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.source is not None:
        try:
            payload = json.loads(args.source.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            return _error(f"--from {args.source}: cannot read runs ({exc})")
        print(write_outputs(payload, args.out))
        return 0
    labels = [label.strip() for label in args.estimators.split(",") if label.strip()]
    unknown = [label for label in labels if label not in ESTIMATORS]
    if unknown:
        return _error(
            f"--estimators: unknown {', '.join(unknown)}; choose from {', '.join(ESTIMATORS)}"
        )
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        return _error(f"--ks: expected integers such as 2,8, got {args.ks!r}")
    settings = QUICK if args.quick else FULL
    seeds = args.seeds or (2 if args.quick else 5)
    labels, skipped = available(benchmark_registry(), labels)
    for label in skipped:
        print(f"skipped {label}: estimator {ESTIMATORS[label]['name']!r} is not registered")
    started = time.perf_counter()
    runs = run_all(labels, ks, seeds, settings, args.jobs)
    payload = {
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "ks": ks,
        "seeds": seeds,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 1),
        "jobs": args.jobs,
        "runs": runs,
    }
    print(write_outputs(payload, args.out))
    print(f"wrote {args.out}")
    return 0
