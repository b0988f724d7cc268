"""One training run: the one way a job runs (`latentrag train`, each cell of a sweep, each
run of the demo).

`train_run` reads the data, builds the pipeline and the trainer (every check passed),
writes the run folder's `config.toml`, measures the pipeline on the dev split, trains, and
writes `eval.json` (last, atomically: its presence marks the run as finished). The metrics
after training are the trainer's final evaluation: a run measures once before and once
after. The folder's files are named in `training.run_folder`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentrag.core.config import ResolvedConfig
from latentrag.core.errors import LatentragError
from latentrag.core.types import Corpus, Example
from latentrag.data.dataset import load_dataset
from latentrag.evaluation.measure import Measure, measure_with
from latentrag.io.atomic import atomic_write_bytes
from latentrag.io.toml_writer import dumps
from latentrag.training.run_folder import CONFIG_FILE, EVAL_FILE

if TYPE_CHECKING:
    from latentrag.training.loglik_cache import LoglikCache


@dataclass
class RunData:
    """What a run reads: the corpus, its training examples and its dev examples."""

    corpus: Corpus
    train: list[Example]
    dev: list[Example]


#: builds a run's measurement once its data is read (the demo's also reads the training set)
MeasureFactory = Callable[[RunData], Measure]


def load_run_data(resolved: ResolvedConfig, config_path: Path) -> RunData:
    """The config's data (relative paths from the config's folder); LatentragError naming
    the file and line when it is bad."""
    settings = resolved.pipeline.data
    dataset = load_dataset(settings, base=config_path.parent)
    if "generator" in resolved.components:  # retrieval-only data has no answers to train on
        dataset.require_answers("train", "dev")
    train = dataset.split("train", settings.max_train)
    dev = dataset.split("dev", settings.max_eval)
    return RunData(dataset.corpus, train, dev)


class _Timed:
    """A measurement that adds up the seconds spent in it."""

    def __init__(self, measure: Measure) -> None:
        self.measure, self.seconds = measure, 0.0

    def __call__(self, pipeline: Any, examples: Any, *, qa: bool) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return self.measure(pipeline, examples, qa=qa)
        finally:
            self.seconds += time.perf_counter() - start


def train_run(
    resolved: ResolvedConfig,
    config_path: Path,
    out_dir: Path,
    resume: bool = False,
    *,
    measure: MeasureFactory | None = None,
    loglik_cache: LoglikCache | None = None,
    timed: bool = False,
) -> dict[str, float]:
    """Train, measure before and after on the dev split, and write the run folder; return
    the metrics written to eval.json (``<metric>`` after, ``<metric> (before)``).

    measure: the run's measurement (default: `evaluation.measure.measure` with [eval]; the
    "before" measurement does not answer questions). loglik_cache: a `LoglikCache` the
    pipeline consults; the result then counts the "pairs scored" in this run. timed: also
    report "train time (s)", the wall time of training without its evaluations.
    """
    from latentrag.core.pipeline import Pipeline
    from latentrag.training.distributed import is_main  # under torchrun only rank 0 writes
    from latentrag.training.loop import Trainer

    data = load_run_data(resolved, config_path)
    pipeline = Pipeline.from_config(resolved, data.corpus, loglik_cache=loglik_cache)
    timer = _Timed(measure(data) if measure else measure_with(resolved.pipeline.eval))
    trainer = Trainer(pipeline, resolved, data.train, data.dev, out_dir, measure=timer)
    if not is_main():
        trainer.train(resume=resume)
        return {}
    # every check passed: a bad run writes nothing
    write_run_config(out_dir, resolved, config_path.parent)

    before = trainer.evaluate(qa=False) if data.dev else {}
    scored = loglik_cache.misses if loglik_cache is not None else 0
    measuring, start = timer.seconds, time.perf_counter()
    trainer.train(resume=resume)
    result = {**trainer.final_metrics, **{f"{k} (before)": v for k, v in before.items()}}
    if timed:
        seconds = time.perf_counter() - start - (timer.seconds - measuring)
        result["train time (s)"] = round(seconds, 1)
    if loglik_cache is not None:
        result["pairs scored"] = loglik_cache.misses - scored
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(out_dir / EVAL_FILE, text.encode("utf-8"))
    return result


def write_run_config(out_dir: Path, resolved: ResolvedConfig, base: Path | None = None) -> None:
    """The run folder with its config.toml (the resolved config, every default filled in).

    Relative data paths were read from `base` (the config's folder); they are written
    absolute, so the saved config re-runs as it is from any working directory."""
    data = resolved.to_dict()
    if base is not None:
        data["data"] = absolute_data_paths(data.get("data", {}), base)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / CONFIG_FILE, dumps(data).encode("utf-8"))
    except OSError as exc:
        raise LatentragError(f"{out_dir}: cannot write the run folder ({exc.strerror})") from None


def absolute_data_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A [data] table with its file paths (path, corpus, train, dev, test) made absolute
    from `base`, the way `load_dataset` reads them."""
    paths = {}
    for key in ("path", "corpus", "train", "dev", "test"):
        value = data.get(key)
        if isinstance(value, str):
            path = Path(value).expanduser()
            paths[key] = str(path if path.is_absolute() else (base / path).resolve())
    return {**data, **paths}
