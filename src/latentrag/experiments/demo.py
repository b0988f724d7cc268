"""The embedded demo (`make demo`, `latentrag demo`): the estimators compared where training
moves the numbers, with >= 3 seeds each and 95% intervals.

Part 1, controlled (`latent_retrieval`, the benchmark's task): latent retrieval learned from
the answers alone on the synthetic *vault* task, the retriever starting weak (held-out gold
recall@1 about 0.1) and K = 2, so top-K rarely sees the gold passage; top-K, VRAG, JSA and
PDist from the same initialisation, 3 seeds. Part 2, real: the shipped SQuAD slice with the
packaged models: a MiniLM bi-encoder prior (its query encoder learns; passages are encoded
once), a second MiniLM reading "question answer" as the posterior, and a frozen SmolLM2-135M
generator. A frozen generator's outputs never change, so its log-likelihoods
(`training.loglik_cache`, handed to each run's pipeline) and its greedy answers
(`AnswerCache`) are computed once and shared by every run; end-to-end training then costs
retriever steps only. Each run is a `runs.train_run` with the demo's measurement.

Every comparison printed is a paired difference over seeds with its 95% interval
(`report.paired_difference`): "yes", "no, the reverse" or "no difference beyond noise".

The demo config ships inside the package (`latentrag/experiments/demo.toml`, read through
importlib.resources, so an installed wheel finds it); `examples/demo.toml` is the same file
for readers of the source tree (tests/test_packaging.py keeps them identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from latentrag.core.config import EvalConfig, ResolvedConfig
from latentrag.core.errors import LatentragError
from latentrag.core.types import Example
from latentrag.evaluation.measure import measure
from latentrag.experiments import latent_retrieval
from latentrag.experiments.report import Summary, paired_difference, summarise, write_report
from latentrag.experiments.runs import RunData, load_run_data, train_run
from latentrag.experiments.sweep import expand_grid, resolve_cells, run_sweep
from latentrag.experiments.tables import format_table
from latentrag.io.atomic import atomic_write_bytes
from latentrag.training.errors import TrainingError
from latentrag.training.loglik_cache import LoglikCache, generator_identity

#: the packaged demo config (a plain file: the package is installed as a folder, not a zip)
DEMO_CONFIG = Path(str(resources.files("latentrag.experiments").joinpath("demo.toml")))
DEMO_ESTIMATORS = ("topk", "vrag", "jsa")
DEMO_SEEDS = 3
#: the controlled part: the benchmark's task at K = 2, these estimators, DEMO_SEEDS seeds
CONTROLLED_ESTIMATORS = ("topk", "vrag", "jsa-corpus-persistent", "pdist")
CONTROLLED = latent_retrieval.Settings(k=2)
CONTROLLED_FOLDER = "controlled"
LOGLIK_FILE = "logliks.json"
ANSWER_FILE = "answers.json"
QA_KEYS = ("em", "f1")
#: the metrics the verdict compares, best first
VERDICT_METRICS = ("recall@1", "f1")

COLUMNS_NOTE = (
    "recall@k: the prior on the dev questions (data.max_eval, all when unset); train "
    "recall@1: on the training questions; em/f1: greedy answers from the top-1 passage, "
    "first {qa} dev questions; pairs scored: generator log-likelihoods that run computed "
    "(later runs reuse earlier runs' scores); (before): the same metric before training."
)

Echo = Callable[[str], None]


# -- answers of a frozen generator -------------------------------------------------------------


class AnswerCache:
    """Greedy answers of a frozen generator per (generator, question, passages), optionally
    kept in a JSON file: greedy decoding of a fixed model is a function of its prompt."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._answers: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                self._answers = dict(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                raise LatentragError(f"{path}: not an answer cache ({exc}); delete it") from None
        self.generated = 0

    def answers(
        self,
        generator: Any,
        questions: Sequence[str],
        passages: Sequence[Sequence[str]],
        max_new_tokens: int,
        batch_size: int = 8,
    ) -> list[str]:
        """One answer per question; only prompts never seen before reach the generator."""
        identity = generator_identity(generator)
        if identity is None:  # a trainable generator changes: nothing to remember
            return generator.generate(list(questions), [list(p) for p in passages], max_new_tokens)
        keys = [_answer_key(identity, q, p, max_new_tokens) for q, p in zip(questions, passages)]
        todo = [i for i, key in enumerate(keys) if key not in self._answers]
        starts = range(0, len(todo), batch_size)
        for start in tqdm(starts, desc="answering", unit="batch", disable=not todo):
            chunk = todo[start : start + batch_size]
            new = generator.generate(
                [questions[i] for i in chunk], [list(passages[i]) for i in chunk], max_new_tokens
            )
            self._answers.update({keys[i]: answer for i, answer in zip(chunk, new)})
        self.generated += len(todo)
        return [self._answers[key] for key in keys]

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(self._answers).encode("utf-8"))


def _answer_key(identity: str, question: str, passages: Sequence[str], max_new: int) -> str:
    text = json.dumps([identity, question, list(passages), max_new])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# -- one run of the sweep ------------------------------------------------------------------------


@dataclass
class DemoMeasure:
    """The demo's measurement of a run (a `Measure`): the prior's recall@k on the dev
    questions, its recall@1 on the training questions, and EM/F1 of the cached greedy
    answers to the first `qa_questions` dev questions, before training as well as after
    (so it answers whatever `qa` says)."""

    settings: EvalConfig
    train: Sequence[Example]
    answers: AnswerCache
    qa_questions: int

    def __call__(self, pipeline: Any, examples: Sequence[Example], *, qa: bool) -> dict:
        metrics = measure(
            pipeline,
            examples,
            self.settings,
            qa=self.qa_questions > 0,
            answer=self.answers.answers,
            qa_questions=self.qa_questions,
        )
        # the numbers the demo compares: recall@k (one gold passage per question, so hit@k
        # and all-gold recall@k coincide), EM and F1; the rest would only widen the table
        metrics = {k: v for k, v in metrics.items() if k.startswith("recall@") or k in QA_KEYS}
        fitted = measure(pipeline, self.train, self.settings.model_copy(update={"recall_at": [1]}))
        if "recall@1" in fitted:  # absent when no training question has gold ids
            metrics["train recall@1"] = fitted["recall@1"]
        return metrics


@dataclass
class DemoRun:
    """What every cell of the demo sweep shares: the caches, and how many questions get
    answered (EM/F1; recall uses all of `data.max_eval`)."""

    logliks: LoglikCache
    answers: AnswerCache
    qa_questions: int

    def train(
        self, resolved: ResolvedConfig, config_path: Path, out_dir: Path, resume: bool = False
    ) -> dict[str, float]:
        """`train_run` with the demo's measurement and caches; the result also has the
        training time and the generator pairs this run scored."""

        def measure_for(data: RunData) -> DemoMeasure:
            settings = resolved.pipeline.eval
            return DemoMeasure(settings, data.train, self.answers, self.qa_questions)

        result = train_run(
            resolved,
            config_path,
            out_dir,
            resume,
            measure=measure_for,
            loglik_cache=self.logliks,
            timed=True,
        )
        self.save()
        return result

    def save(self) -> None:
        self.logliks.save()
        self.answers.save()


# -- the verdict -------------------------------------------------------------------------------


def _by_estimator(rows: Sequence[dict], metric: str) -> dict[str, Summary | None]:
    names = dict.fromkeys(r["assignment"].get("estimator.name", "?") for r in rows)
    return {
        name: summarise(
            [
                r["metrics"].get(metric)
                for r in rows
                if r["status"] == "done" and r["assignment"].get("estimator.name") == name
            ]
        )
        for name in names
    }


def _text(summary: Summary | None) -> str:
    if summary is None:
        return ""
    if summary.half_width is None:
        return f"{summary.mean:.3f}"
    return f"{summary.mean:.3f} ± {summary.half_width:.3f}"


def before_after_rows(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict[str, object]]:
    """Per estimator: each metric's mean ± 95% half-width before -> after training, and the
    change paired by seed with its interval."""
    table: list[dict[str, object]] = []
    names = dict.fromkeys(r["assignment"].get("estimator.name", "?") for r in rows)
    for name in names:
        line: dict[str, object] = {"estimator": name}
        runs = [
            r
            for r in rows
            if r["status"] == "done" and r["assignment"].get("estimator.name") == name
        ]
        line["seeds"] = len(runs)
        for metric in metrics:
            before = summarise([r["metrics"].get(f"{metric} (before)") for r in runs])
            after = summarise([r["metrics"].get(metric) for r in runs])
            change = summarise(
                [
                    r["metrics"][metric] - r["metrics"][f"{metric} (before)"]
                    for r in runs
                    if isinstance(r["metrics"].get(metric), (int, float))
                    and isinstance(r["metrics"].get(f"{metric} (before)"), (int, float))
                ]
            )
            if before and after and change:
                interval = change.interval
                span = f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
                line[metric] = (
                    f"{_text(before)} -> {_text(after)} (change {change.mean:+.3f}{span})"
                )
        table.append(line)
    return table


def verdict_lines(
    rows: Sequence[dict], pairs: Sequence[tuple[str, str]], metrics: Sequence[str]
) -> list[str]:
    """One line per (pair, metric): the paired difference and what its interval says."""
    lines = []
    for metric in metrics:
        for first, second in pairs:
            diff = paired_difference(
                rows, metric, {"estimator.name": first}, {"estimator.name": second}
            )
            if diff is None:
                lines.append(f"{first} > {second} on {metric}: cannot tell (no common seed)")
            else:
                lines.append(diff.verdict())
    return lines


def verdict(rows: Sequence[dict], metrics: Sequence[str] = VERDICT_METRICS) -> str:
    """The SQuAD part's conclusion, computed from the runs whatever they say."""
    lines = ["Before -> after training (mean ± 95% interval over seeds):", ""]
    lines.append(format_table(before_after_rows(rows, metrics), markdown=True))
    names = dict.fromkeys(r["assignment"].get("estimator.name") for r in rows)
    pairs = [(a, b) for a, b in (("jsa", "topk"), ("jsa", "vrag"), ("vrag", "topk"))
             if a in names and b in names]  # fmt: skip
    return "\n".join([*lines, "", *verdict_lines(rows, pairs, metrics)])


# -- the controlled part -------------------------------------------------------------------------


@dataclass
class ControlledResult:
    rows: list[dict]
    text: str
    plot: Path | None


def controlled_rows(runs: Sequence[dict]) -> list[dict]:
    """The benchmark's runs as report rows: held-out recall@1 and marginal log-likelihood,
    training recall@1, each after training and (before) at step 0."""
    rows = []
    for run in runs:
        first, last = run["points"][0], run["points"][-1]
        metrics = {}
        for key, name in (
            ("recall@1", "held-out recall@1"),
            ("marginal_loglik", "held-out log-lik"),
            ("train_recall@1", "train recall@1"),
        ):
            metrics[name], metrics[f"{name} (before)"] = last[key], first[key]
        metrics["passes / example"] = run["passes_per_example"]
        assignment = {"estimator.name": run["estimator"]}
        rows.append({"assignment": assignment, "seed": run["seed"], "status": "done",
                     "metrics": metrics, "run": f"{run['estimator']}-{run['seed']}"})  # fmt: skip
    return rows


def run_controlled(
    out_dir: Path,
    seeds: int = DEMO_SEEDS,
    settings: latent_retrieval.Settings = CONTROLLED,
    labels: Sequence[str] = CONTROLLED_ESTIMATORS,
    echo: Echo = print,
) -> ControlledResult:
    """Part 1: train `labels` on the vault task from the same initialisations (reusing the
    runs of an earlier demo in `out_dir` with the same settings), write the benchmark's
    outputs there, and return the rows, the printed text and the plot."""
    folder = out_dir / CONTROLLED_FOLDER
    payload_path = folder / "runs.json"
    wanted = {"settings": asdict(settings), "seeds": seeds, "labels": list(labels)}
    runs = None
    if payload_path.exists():
        saved = json.loads(payload_path.read_text("utf-8"))
        if {k: saved.get(k) for k in wanted} == wanted:
            runs = saved["runs"]
    if runs is None:
        registry = latent_retrieval.benchmark_registry()
        labels, skipped = latent_retrieval.available(registry, labels)
        started = time.perf_counter()
        runs = latent_retrieval.run_all(labels, [settings.k], seeds, settings, log=echo)
        wall_s = time.perf_counter() - started
        payload = {**wanted, "mode": "demo", "ks": [settings.k], "jobs": 1, "wall_s": wall_s}
        payload["skipped"] = skipped
        payload["runs"] = runs
        latent_retrieval.write_outputs(payload, folder)
    rows = controlled_rows(runs)
    metrics = ("held-out recall@1", "train recall@1")
    names = [r["assignment"]["estimator.name"] for r in rows]
    jsa = next((n for n in names if n.startswith("jsa")), None)
    pairs = [(a, b) for a, b in ((jsa, "topk"), ("vrag", "topk"), (jsa, "vrag"))
             if a in names and b in names]  # fmt: skip
    text = "\n".join(
        [
            f"Vault task, K = {settings.k}, {settings.steps} steps x {settings.batch_size} "
            f"questions, {seeds} seeds from the same initialisations (mean ± 95% interval):",
            "",
            format_table(before_after_rows(rows, metrics), markdown=True),
            "",
            *verdict_lines(rows, pairs, metrics),
        ]
    )
    plot = folder / f"curves_k{settings.k}.png"
    return ControlledResult(rows, text, plot if plot.exists() else None)


# -- the demo --------------------------------------------------------------------------------


@dataclass
class DemoResult:
    markdown: str
    verdict: str
    plots: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    controlled: ControlledResult | None = None


def quiet_model_loading() -> None:
    """Turn off transformers' own progress bars ("Loading weights", one per model load, a
    dozen in a demo); latentrag's bars (sweep, answering, encoding) are plain tqdm and stay.
    HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "0":
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_demo(
    out_dir: Path,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    estimators: Sequence[str] = DEMO_ESTIMATORS,
    qa_questions: int = 32,
    echo: Echo | None = None,
    seeds: int = DEMO_SEEDS,
    controlled: latent_retrieval.Settings | None = CONTROLLED,
) -> DemoResult:
    """Part 1 (unless `controlled` is None): the vault task. Part 2: sweep the estimators of
    `config` (default: the packaged demo.toml) over `seeds` seeds into `out_dir`. Print both
    parts' tables and verdicts and return them. Finished runs are kept and skipped."""
    echo = echo or partial(print, flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_model_loading()
    config = Path(config) if config is not None else DEMO_CONFIG
    if not config.is_file():
        raise LatentragError(f"{config}: demo config not found")
    out_dir = Path(out_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    echo(f"latentrag demo: {', '.join(estimators)} on {config.name}, results in {out_dir}/")

    grid = [f"estimator.name={','.join(estimators)}"]
    # the runs' data is checked before anything is written: a bad demo writes nothing
    cells = resolve_cells(config, expand_grid(grid, seeds), overrides)
    load_run_data(cells[0], config)
    part1 = None
    if controlled is not None:
        echo("Part 1: latent retrieval learned from the answers alone (vault task)")
        part1 = run_controlled(out_dir, seeds, controlled, echo=echo)
        echo("")
        echo(part1.text)
        echo("")
    echo(f"Part 2: {', '.join(estimators)} on the SQuAD slice, {seeds} seeds")
    run = DemoRun(
        LoglikCache(out_dir / LOGLIK_FILE), AnswerCache(out_dir / ANSWER_FILE), qa_questions
    )
    results = run_sweep(config, grid, seeds, out_dir, overrides, train_fn=run.train)
    report = write_report(out_dir)
    conclusion = verdict(report.rows)

    echo("")
    echo(report.markdown.split("## Plots")[0].rstrip())
    echo("")
    echo(COLUMNS_NOTE.format(qa=qa_questions))
    echo("")
    echo(conclusion)
    echo("")
    plots = ([part1.plot] if part1 and part1.plot else []) + list(report.plots)
    echo("Plots: " + (", ".join(str(p) for p in plots) or "none"))
    echo(f"Report: {report.markdown_path}")
    echo(
        f"Time: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU; "
        f"peak RSS {peak_rss_mb():.0f} MB; generator pairs scored {run.logliks.misses}, "
        f"reused {run.logliks.hits}; answers generated {run.answers.generated}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    failed = [r for r in results if r.status == "failed"]
    if failed:
        names = ", ".join(r.name for r in failed)
        raise TrainingError(f"demo: {len(failed)} run(s) failed ({names}); see their error.txt")
    return DemoResult(report.markdown, conclusion, plots, report.rows, part1)
