"""The embedded demo (`make demo`, `latentrag demo`): estimators compared on the SQuAD slice.

A sweep of the demo config over the estimators (top-K, VRAG, JSA), one seed each, with
the packaged models: a MiniLM bi-encoder prior (its query encoder learns; passages are
encoded once), a second MiniLM reading "question answer" as the posterior, and a frozen
SmolLM2-135M generator. A frozen generator's outputs never change, so its log-likelihoods
(`training.loglik_cache`, handed to each run's pipeline) and its greedy answers
(`AnswerCache`) are computed once and shared by every run; end-to-end training then costs
retriever steps only. Each run is a `runs.train_run` with the demo's measurement: the
prior's recall@k and the answers' EM/F1 before and after training; the demo prints the
sweep's table, the plot paths and a verdict computed from those numbers.

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
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from latentrag.core.config import EvalConfig, ResolvedConfig
from latentrag.core.errors import LatentragError
from latentrag.core.types import Example
from latentrag.evaluation.measure import measure
from latentrag.experiments.report import write_report
from latentrag.experiments.runs import RunData, load_run_data, train_run
from latentrag.experiments.sweep import expand_grid, resolve_cells, run_sweep
from latentrag.experiments.tables import format_table
from latentrag.io.atomic import atomic_write_bytes
from latentrag.training.errors import TrainingError
from latentrag.training.loglik_cache import LoglikCache, generator_identity

#: the packaged demo config (a plain file: the package is installed as a folder, not a zip)
DEMO_CONFIG = Path(str(resources.files("latentrag.experiments").joinpath("demo.toml")))
DEMO_ESTIMATORS = ("topk", "vrag", "jsa")
LOGLIK_FILE = "logliks.json"
ANSWER_FILE = "answers.json"
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
        metrics = {k: v for k, v in metrics.items() if not k.startswith("mrr@")}
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


def _number(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def before_after_rows(rows: Sequence[dict]) -> list[dict[str, object]]:
    """Per finished run: each verdict metric before -> after training."""
    table = []
    for row in rows:
        if row["status"] != "done":
            continue
        line: dict[str, object] = {"estimator": row["assignment"].get("estimator.name", "?")}
        for metric in VERDICT_METRICS:
            before = _number(row["metrics"], f"{metric} (before)")
            after = _number(row["metrics"], metric)
            if before is not None and after is not None:
                line[metric] = f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"
        table.append(line)
    return table


def beats(rows: Sequence[dict], winner: str, others: Sequence[str], metric: str) -> str:
    """Whether `winner` has a strictly higher `metric` after training than every one of
    `others`: "yes" or "no", with the numbers."""
    values = {
        row["assignment"].get("estimator.name"): _number(row["metrics"], metric)
        for row in rows
        if row["status"] == "done"
    }
    named = [winner, *others]
    missing = [name for name in named if values.get(name) is None]
    if missing:
        return f"cannot tell ({', '.join(missing)} did not finish)"
    strictly = all(values[winner] > values[other] for other in others)
    numbers = ", ".join(f"{name} {values[name]:.3f}" for name in named)
    return f"{'yes' if strictly else 'no'} ({numbers})"


def verdict(rows: Sequence[dict]) -> str:
    """The demo's conclusion, computed from the runs whatever they say."""
    lines = ["Before -> after training (recall@1 of the prior, F1 of the answers):", ""]
    lines.append(format_table(before_after_rows(rows), markdown=True))
    names = {row["assignment"].get("estimator.name") for row in rows}
    if "jsa" in names:
        others = [name for name in ("topk", "vrag") if name in names]
        lines.append("")
        for metric in VERDICT_METRICS:
            lines.append(
                f"JSA beats {' and '.join(others)} on {metric} here: "
                f"{beats(rows, 'jsa', others, metric)}"
            )
    return "\n".join(lines)


# -- the demo --------------------------------------------------------------------------------


@dataclass
class DemoResult:
    markdown: str
    verdict: str
    plots: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


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
) -> DemoResult:
    """Sweep the estimators of `config` (default: the packaged demo.toml) into `out_dir`, print
    the report and the verdict, and return them. Finished runs are kept and skipped."""
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
    # the runs' data is checked before the sweep claims the folder: a bad demo writes nothing
    cells = resolve_cells(config, expand_grid(grid, 1), overrides)
    load_run_data(cells[0], config)
    run = DemoRun(
        LoglikCache(out_dir / LOGLIK_FILE), AnswerCache(out_dir / ANSWER_FILE), qa_questions
    )
    results = run_sweep(config, grid, 1, out_dir, overrides, train_fn=run.train)
    report = write_report(out_dir)
    conclusion = verdict(report.rows)

    echo("")
    echo(report.markdown.split("## Plots")[0].rstrip())
    echo("")
    echo(COLUMNS_NOTE.format(qa=qa_questions))
    echo("")
    echo(conclusion)
    echo("")
    echo("Plots: " + (", ".join(str(p) for p in report.plots) or "none"))
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
    return DemoResult(report.markdown, conclusion, report.plots, report.rows)
