"""The run log beyond metrics.jsonl (issue 16): a plugin's `log_record` hook receives exactly
the records of metrics.jsonl; a failing logger is switched off with one warning; the
builtin TensorBoard writer (``train.loggers = ["tensorboard"]``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from latentrag import hookimpl
from latentrag.core.config import read_toml, resolve
from latentrag.core.errors import ConfigError
from latentrag.core.registry import Registry
from latentrag.experiments.runs import train_run
from latentrag.training.loggers import build_loggers, scalars

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY_RUN = """\
[data]
source = "toy"
[retriever]
name = "bow"
dim = 8
buckets = 128
[estimator]
name = "topk"
k = 3
candidates = "prior"
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
freeze = true
[train]
steps = 3
batch_size = 4
eval_every = 2
loggers = {loggers}
[eval]
recall_at = [1]
max_new_tokens = 1
"""


class Recorder:
    """An in-process plugin that keeps every record it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Path]] = []

    @hookimpl
    def log_record(self, record: dict[str, Any], run_dir: Path) -> None:
        self.calls.append((record, run_dir))


class Broken:
    """A logger whose dashboard went away."""

    calls = 0

    @hookimpl
    def log_record(self, record, run_dir):
        Broken.calls += 1
        raise ConnectionError("dashboard unreachable\nsecond line")


def _train(tmp_path: Path, *plugins: object, loggers: str = "[]") -> Path:
    registry = Registry().load(entry_points=False)
    for i, plugin in enumerate(plugins):
        registry.register(plugin, f"test-logger-{i}")
    config = tmp_path / "run.toml"
    config.write_text(TOY_RUN.format(loggers=loggers))
    resolved = resolve(read_toml(config), str(config), registry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(resolved, config, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    return tmp_path / "run"


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_plugins_log_record_hook_receives_exactly_the_records_of_metrics_jsonl(tmp_path):
    recorder = Recorder()
    run = _train(tmp_path, recorder)
    written = _metrics(run)
    assert [record for record, _ in recorder.calls] == written
    assert {folder for _, folder in recorder.calls} == {run}
    steps = [(r["step"], "eval" in r) for r in written]
    assert steps == [(1, False), (2, False), (2, True), (3, False), (3, True)]


def test_a_failing_logger_warns_once_and_training_goes_on(tmp_path):
    recorder = Recorder()
    Broken.calls = 0
    with pytest.warns(UserWarning, match="test-logger-0.*ConnectionError: dashboard unreachable"):
        run = _train(tmp_path, Broken(), recorder)
    assert Broken.calls == 1 and len(recorder.calls) == len(_metrics(run)) == 5
    assert (run / "eval.json").is_file()


def test_tensorboard_events_hold_the_logged_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, loggers='["tensorboard"]')
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    written = _metrics(run)
    losses = [(r["step"], r["loss"]) for r in written if "loss" in r]
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in shown] == [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in shown] == pytest.approx([v for _, v in losses], rel=1e-6)
    mrr = [(e.step, e.value) for e in events.Scalars("eval/mrr@10")]
    expected = [(r["step"], r["eval"]["mrr@10"]) for r in written if "eval" in r]
    assert [s for s, _ in mrr] == [s for s, _ in expected] == [2, 3]
    assert [v for _, v in mrr] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert min(v for _, v in mrr) > 0
    assert "train/lr/retriever" in events.Tags()["scalars"]


def test_tensorboard_missing_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    config = resolve(
        {"retriever": {"name": "bow"}, "train": {"loggers": ["tensorboard"]}}, "run.toml"
    )
    with pytest.raises(ConfigError, match=r"run.toml: train.loggers: .*pip install tensorboard"):
        build_loggers(config, tmp_path)


def test_loggers_are_checked_when_the_config_is():
    with pytest.raises(ConfigError, match="train.loggers.0"):
        resolve({"retriever": {"name": "bow"}, "train": {"loggers": ["wandb"]}})
    with pytest.raises(ConfigError, match="listed more than once: tensorboard"):
        resolve({"retriever": {"name": "bow"}, "train": {"loggers": ["tensorboard"] * 2}})


def test_scalars_flatten_a_record_into_tags():
    step = {"step": 4, "loss": 1.5, "lr": {"retriever": 0.1}, "skipped": False, "note": "x"}
    assert list(scalars(step)) == [
        ("train/loss", 1.5),
        ("train/lr/retriever", 0.1),
        ("train/skipped", 0.0),
    ]
    assert list(scalars({"step": 4, "eval": {"em": 0.5, "f1": None}})) == [("eval/em", 0.5)]
