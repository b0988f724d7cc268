"""Use what a run trained: `load_run` rebuilds its pipeline with the weights of its last
checkpoint, over its corpus, ready to `retrieve`, `predict` and `answer`.

::

    import latentrag

    pipeline = latentrag.load_run("runs/topk")
    answer = pipeline.answer("What is the capital of France?")
    print(answer.text, [(p.id, p.score) for p in answer.passages])

A run folder (`training.run_folder`) holds the resolved ``config.toml`` and the checkpoints;
the pipeline is built from that config, its retrievers index the corpus, and the
checkpoint's weights go into the components it trained. A retriever whose loaded weights
change its passage vectors re-encodes the corpus (`Retriever.refresh`), so a dense index
reflects the trained encoders. `open_run` also gives the run's data, for evaluating it
(`evaluate_run`: the run's "after" metrics again) and predicting over a split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentrag.core.config import ResolvedConfig, read_toml, resolve
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import Registry
from latentrag.data.dataset import Dataset, load_dataset
from latentrag.evaluation.measure import measure
from latentrag.training.checkpoint import Checkpoint, load_latest
from latentrag.training.checkpointer import checkpoint_roles, load_model_state
from latentrag.training.run_folder import CONFIG_FILE, EVAL_FILE

__all__ = ["LoadedRun", "evaluate_run", "load_run", "open_run", "run_metrics_after"]

DATA_FILES = ("corpus", "train", "dev", "test")


@dataclass
class LoadedRun:
    """A run folder opened for use: its trained pipeline, config, data and checkpoint step
    (None when it trained no step)."""

    path: Path
    config: ResolvedConfig
    dataset: Dataset
    pipeline: Pipeline
    step: int | None

    def split(self, name: str, limit: int | None = None) -> list[Any]:
        """The questions of a split, at most `limit` (default: ``data.max_eval`` for dev and
        test, ``data.max_train`` for train: what the run itself used)."""
        data = self.config.pipeline.data
        if limit is None:
            limit = data.max_train if name == "train" else data.max_eval
        return self.dataset.split(name, limit)


def load_run(run_dir: str | Path, *, registry: Registry | None = None) -> Pipeline:
    """The trained pipeline of a run folder (`latentrag train --out RUN`, a sweep cell).

    Built from the run's ``config.toml`` over its corpus, with the weights of the newest
    checkpoint that verifies (a damaged newer one is skipped with a warning); its `config`
    attribute is the run's resolved config. A run trained for 0 steps has no checkpoint and
    gives the configured (untrained) pipeline. Raises `LatentragError` with one line when
    the folder is not a run or its checkpoint does not fit its config. registry: the one
    whose plugins built the run (default: the installed plugins).
    """
    return open_run(run_dir, registry=registry).pipeline


def open_run(run_dir: str | Path, *, registry: Registry | None = None) -> LoadedRun:
    """`load_run`, with the run's config, data and checkpoint step."""
    path = Path(run_dir)
    config = read_run_config(path, registry)
    checkpoint = _latest_checkpoint(path, config)
    dataset = load_dataset(config.pipeline.data, base=data_base(path, config))
    pipeline = Pipeline.from_config(config, dataset.corpus)
    if checkpoint is not None:
        load_weights(pipeline, checkpoint)
    for module in _modules(pipeline):
        module.eval()
    return LoadedRun(path, config, dataset, pipeline, checkpoint.step if checkpoint else None)


def read_run_config(path: Path, registry: Registry | None = None) -> ResolvedConfig:
    """The resolved config.toml of a run folder; LatentragError when it is not a run."""
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise LatentragError(f"{path}: no such run folder")
    if not config_file.is_file():
        raise LatentragError(f"{path}: not a run folder (no {CONFIG_FILE})")
    return resolve(read_toml(config_file), str(config_file), registry)


def data_base(path: Path, config: ResolvedConfig) -> Path:
    """Where the config's relative data paths are read from: the run folder (a run writes
    them absolute; a copied run folder may carry its files), else the working directory
    (runs written before data paths were made absolute name them from the original
    config's folder, usually the working directory)."""
    data = config.pipeline.data
    relative = [
        name
        for name in DATA_FILES
        if getattr(data, name) and not Path(getattr(data, name)).expanduser().is_absolute()
    ]
    if all((path / getattr(data, name)).exists() for name in relative):
        return path
    return Path.cwd()


def _latest_checkpoint(path: Path, config: ResolvedConfig) -> Checkpoint | None:
    checkpoint = load_latest(path)  # CheckpointError (a LatentragError) if every one is bad
    if checkpoint is None and config.pipeline.train.steps > 0:
        raise LatentragError(
            f"{path}: no checkpoint (the run has not finished its first checkpoint yet)"
        )
    return checkpoint


def load_weights(pipeline: Pipeline, checkpoint: Checkpoint) -> None:
    """Put the checkpoint's weights into the pipeline's components, then let each loaded
    retriever re-encode the corpus with them. LatentragError naming the checkpoint when
    they do not fit."""
    roles = pipeline.roles()
    components: dict[str, Any] = {}
    for role in checkpoint_roles(checkpoint):
        if role not in roles:
            raise LatentragError(
                f"{checkpoint.path}: holds weights of the {role}, which the run's config lacks"
            )
        if all(roles[role] is not other for other in components.values()):
            components[role] = roles[role]
    try:
        load_model_state(checkpoint, components)
    except (KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise LatentragError(f"{checkpoint.path} does not fit the run's config: {reason}") from None
    for role, component in components.items():
        if role in ("retriever", "posterior"):
            component.refresh()


def _modules(pipeline: Pipeline) -> list[Any]:
    """Every trainable module of the pipeline (put in eval mode: no dropout)."""
    return [
        module
        for component in pipeline.roles().values()
        for module in component.trainable_modules().values()
    ]


def evaluate_run(run: LoadedRun, split: str = "dev", limit: int | None = None) -> dict[str, float]:
    """The run's pipeline measured as the run measured it after training: `measure` with
    its [eval] settings, answering the questions when it has a generator. On the dev split
    with the default limit this reproduces the run's "after" metrics (`run_metrics_after`)."""
    examples = run.split(split, limit)
    return measure(run.pipeline, examples, run.config.pipeline.eval, qa=True)


def run_metrics_after(path: Path) -> dict[str, float] | None:
    """The metrics after training in a finished run's eval.json (no "(before)" entries and
    no bookkeeping: train time, pairs scored), or None when the run has not finished."""
    try:
        saved = json.loads((path / EVAL_FILE).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{path / EVAL_FILE}: invalid JSON ({exc})") from None
    bookkeeping = {"train time (s)", "pairs scored"}
    return {k: v for k, v in saved.items() if not k.endswith(" (before)") and k not in bookkeeping}
