"""Sweeps: grid expansion, folder names, shards, resume after a kill, failures, refusal."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentrag.core.errors import ConfigError
from latentrag.experiments.report import write_report
from latentrag.experiments.sweep import (
    SweepWarning,
    cell_name,
    expand_grid,
    parse_shard,
    run_sweep,
    shard_cells,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = """\
[retriever]
name = "bm25"
[posterior]
name = "bm25"
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
[data]
source = "toy"
[train]
steps = 3
"""
GRID = ["estimator.name=topk,vrag,jsa", "retriever.k1=1.2,1.5"]


def fake_metric(resolved, salt: str) -> float:
    """A deterministic number in [0, 1) from the resolved estimator, k1 and seed."""
    data = resolved.to_dict()
    key = f"{data['estimator']['name']}|{data['retriever']['k1']}|{data['train']['seed']}|{salt}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8


class FakeTrain:
    """Writes metrics.jsonl and eval.json from the resolved config; counts its calls."""

    def __init__(self, fail_on: str | None = None, interrupt_at: int | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail_on = fail_on
        self.interrupt_at = interrupt_at

    def __call__(self, resolved, config_path, out_dir: Path, resume: bool = False):
        self.calls.append((out_dir.name, resume))
        if self.fail_on and resolved.to_dict()["estimator"]["name"] == self.fail_on:
            raise RuntimeError(f"{self.fail_on} diverged\nsecond line")
        steps = resolved.pipeline.train.steps
        with open(out_dir / "metrics.jsonl", "a") as handle:
            for step in range(1, steps + 1):
                loss = 2.0 / step + fake_metric(resolved, str(step))
                handle.write(json.dumps({"step": step, "loss": loss, "wall_time": 0.1}) + "\n")
            handle.write(json.dumps({"step": steps, "eval": {"recall@1": 0.5}}) + "\n")
        if len(self.calls) == self.interrupt_at:
            (out_dir / "ckpt-2").mkdir()
            raise KeyboardInterrupt
        metrics = {"recall@1": fake_metric(resolved, "r"), "loss": fake_metric(resolved, "l")}
        (out_dir / "eval.json").write_text(json.dumps(metrics))
        return metrics


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(CONFIG)
    return path


def outputs(out_dir: Path) -> tuple[bytes, bytes]:
    write_report(out_dir)
    return (out_dir / "results.csv").read_bytes(), (out_dir / "results.md").read_bytes()


# -- grid ---------------------------------------------------------------------------------


def test_expand_grid_orders_product_then_seeds():
    cells = expand_grid(["estimator.name=topk,jsa", "retriever.k1=1.2,1.5"], seeds=2)
    assert len(cells) == 8
    assert [c.index for c in cells] == list(range(8))
    first = cells[0]
    assert first.assignment == {"estimator.name": "topk", "retriever.k1": 1.2}
    assert first.overrides == ["estimator.name=topk", "retriever.k1=1.2", "train.seed=0"]
    assert first.name == "estimator.name=topk__retriever.k1=1.2__seed=0"
    assert [(c.assignment["estimator.name"], c.assignment["retriever.k1"], c.seed) for c in cells][
        :4
    ] == [("topk", 1.2, 0), ("topk", 1.2, 1), ("topk", 1.5, 0), ("topk", 1.5, 1)]
    assert cells[-1].name == "estimator.name=jsa__retriever.k1=1.5__seed=1"


def test_values_are_parsed_like_set_values_and_brackets_keep_commas():
    cells = expand_grid(["eval.recall_at=[1,5],[1,20]", "train.lr=1e-4", 'x.y="a,b"'], 1)
    assert [c.assignment["eval.recall_at"] for c in cells] == [[1, 5], [1, 20]]
    assert cells[0].assignment["train.lr"] == pytest.approx(1e-4)
    assert cells[0].assignment["x.y"] == "a,b"


def test_odd_and_long_values_get_safe_unique_names():
    names = {
        cell_name({"generator.model": "models/a b"}, 0),
        cell_name({"generator.model": "models/a?b"}, 0),
        cell_name({"generator.model": "x" * 100}, 0),
        cell_name({"generator.model": "x" * 100 + "y"}, 0),
    }
    assert len(names) == 4
    for name in names:
        assert "/" not in name and " " not in name and "?" not in name
        assert len(name) < 100
    assert cell_name({"a": "models/a b"}, 3).startswith("a=models-a-b~")


@pytest.mark.parametrize(
    "grid, message",
    [
        (["estimator.name"], "'estimator.name'"),
        (["=topk"], "'=topk'"),
        (["estimator.name=topk,,jsa"], "'estimator.name=topk,,jsa'"),
        (["estimator.name=topk,topk"], "listed twice"),
        (["estimator.name=topk", "estimator.name=jsa"], "two --grid options"),
        (["train.seed=1,2"], "--seeds"),
    ],
)
def test_bad_grid_is_a_config_error_naming_the_entry(grid, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        expand_grid(grid, 1)


def test_zero_seeds_is_refused():
    with pytest.raises(ConfigError, match="--seeds 0"):
        expand_grid([], 0)


# -- shards -------------------------------------------------------------------------------


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "a/2", "1", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_shards_are_disjoint_and_cover_every_cell():
    cells = expand_grid(GRID, 3)
    shards = [shard_cells(cells, (i, 4)) for i in range(4)]
    indices = [c.index for shard in shards for c in shard]
    assert sorted(indices) == list(range(len(cells)))
    assert [c.index for c in shards[1]] == list(range(1, len(cells), 4))


def test_two_shards_in_one_folder_equal_one_unsharded_sweep(config, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    run_sweep(config, GRID, 2, whole, train_fn=FakeTrain())
    first = run_sweep(config, GRID, 2, sharded, shard=(0, 2), train_fn=FakeTrain())
    second = run_sweep(config, GRID, 2, sharded, shard=(1, 2), train_fn=FakeTrain())
    assert len(first) == len(second) == 6
    assert {r.name for r in first}.isdisjoint(r.name for r in second)
    assert outputs(sharded) == outputs(whole)
    csv_lines = (whole / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "estimator.name,retriever.k1,seed,status,loss,recall@1"
    assert len(csv_lines) == 13


# -- resume ---------------------------------------------------------------------------------


def test_interrupted_sweep_resumes_only_missing_cells(config, tmp_path):
    reference = tmp_path / "reference"
    run_sweep(config, GRID, 1, reference, train_fn=FakeTrain())

    out = tmp_path / "resumed"
    interrupted = FakeTrain(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, GRID, 1, out, train_fn=interrupted)
    assert len(interrupted.calls) == 3
    third = interrupted.calls[2][0]
    assert not (out / third / "error.txt").exists()  # an interrupt is not a failure

    again = FakeTrain()
    results = run_sweep(config, GRID, 1, out, train_fn=again)
    assert [r.status for r in results] == ["skipped"] * 2 + ["done"] * 4
    assert len(again.calls) == 4
    assert again.calls[0] == (third, True)  # the killed cell left a checkpoint: resume
    assert all(not resume for _, resume in again.calls[1:])
    assert outputs(out) == outputs(reference)


def test_killed_run_without_checkpoint_starts_over(config, tmp_path):
    out = tmp_path / "out"
    cell_dir = out / expand_grid(GRID, 1)[0].name
    cell_dir.mkdir(parents=True)
    (cell_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "lo')
    fake = FakeTrain()
    run_sweep(config, GRID, 1, out, train_fn=fake)
    assert fake.calls[0] == (cell_dir.name, False)
    lines = (cell_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "99.0" not in lines[0]


# -- failures and refusals ------------------------------------------------------------------


def test_failing_cell_is_recorded_and_the_others_run(config, tmp_path):
    out = tmp_path / "out"
    fake = FakeTrain(fail_on="vrag")
    results = run_sweep(config, GRID, 1, out, train_fn=fake)
    assert len(fake.calls) == 6
    failed = [r for r in results if r.status == "failed"]
    assert [r.name for r in failed] == [
        "estimator.name=vrag__retriever.k1=1.2__seed=0",
        "estimator.name=vrag__retriever.k1=1.5__seed=0",
    ]
    assert failed[0].error == "RuntimeError: vrag diverged"
    error_text = (out / failed[0].name / "error.txt").read_text()
    assert error_text.startswith("RuntimeError: vrag diverged\n\nTraceback")
    markdown = write_report(out).markdown
    assert "## Failed runs" in markdown
    assert f"- `{failed[0].name}`: RuntimeError: vrag diverged" in markdown

    # a later successful run of the failed cells clears the stale error
    rerun = FakeTrain()
    results = run_sweep(config, GRID, 1, out, train_fn=rerun)
    assert [c for c, _ in rerun.calls] == [r.name for r in failed]
    assert not (out / failed[0].name / "error.txt").exists()
    assert "Failed runs" not in write_report(out).markdown


def test_a_different_sweep_in_the_same_folder_is_refused(config, tmp_path):
    out = tmp_path / "out"
    run_sweep(config, GRID[:1], 1, out, train_fn=FakeTrain())
    with pytest.raises(ConfigError, match="different sweep.*seeds"):
        run_sweep(config, GRID[:1], 2, out, train_fn=FakeTrain())
    with pytest.raises(ConfigError, match="different sweep.*grid"):
        run_sweep(config, GRID, 1, out, train_fn=FakeTrain())
    config.write_text(CONFIG.replace("steps = 3", "steps = 4"))
    with pytest.raises(ConfigError, match="different sweep.*config_sha256"):
        run_sweep(config, GRID[:1], 1, out, train_fn=FakeTrain())


def test_bad_cells_are_all_reported_before_anything_runs(config, tmp_path):
    fake = FakeTrain()
    grid = ["estimator.name=topk,nosuch", "retriever.k1=1.5,fast"]
    with pytest.raises(ConfigError) as info:
        run_sweep(config, grid, 1, tmp_path / "out", train_fn=fake)
    lines = str(info.value).splitlines()
    assert fake.calls == [] and not (tmp_path / "out").exists()
    assert any(
        "nosuch" in line and "estimator.name=nosuch__retriever.k1=1.5__seed=0" in line
        for line in lines
    )
    assert any("retriever.k1" in line and "'fast'" in line for line in lines)


def test_set_overrides_apply_to_every_cell_but_not_to_grid_keys(config, tmp_path):
    fake = FakeTrain()
    run_sweep(config, GRID[:1], 1, tmp_path / "a", overrides=["train.steps=2"], train_fn=fake)
    lines = (tmp_path / "a" / expand_grid(GRID[:1], 1)[0].name / "metrics.jsonl").read_text()
    assert len(lines.splitlines()) == 3
    with pytest.raises(ConfigError, match="also swept"):
        run_sweep(config, GRID, 1, tmp_path / "b", overrides=["retriever.k1=2"], train_fn=fake)
    with pytest.raises(ConfigError, match="--seeds"):
        run_sweep(config, GRID, 1, tmp_path / "c", overrides=["train.seed=3"], train_fn=fake)


def test_cell_json_records_assignment_and_seed(config, tmp_path):
    run_sweep(config, GRID, 2, tmp_path / "out", train_fn=FakeTrain())
    cell = expand_grid(GRID, 2)[3]
    info = json.loads((tmp_path / "out" / cell.name / "cell.json").read_text())
    assert info["assignment"] == {"estimator.name": "topk", "retriever.k1": 1.5}
    assert info["seed"] == 1
    manifest = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert manifest["grid"][1] == {"key": "retriever.k1", "values": [1.2, 1.5]}


# -- end to end: the real CLI, killed and rerun -----------------------------------------------

TINY_CONFIG = """\
[retriever]
name = "bow"
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
k = 4
[data]
source = "toy"
[train]
steps = 2
batch_size = 2
"""


def start_sweep(config: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "latentrag.cli", "sweep", str(config), "--out", str(out)]
    command += ["--grid", "train.lr=0.01,0.001"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"sweep ended before {path.name}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.02)


def test_cli_sweep_killed_and_rerun_equals_an_uninterrupted_sweep(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG)
    first, second = (cell.name for cell in expand_grid(["train.lr=0.01,0.001"], 1))

    killed = tmp_path / "killed"
    process = start_sweep(config, killed)
    wait_for(killed / first / "eval.json", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (killed / second / "eval.json").exists()
    assert not (killed / "results.csv").exists()

    rerun = start_sweep(config, killed)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{first}: skipped (already finished)" in stderr
    assert f"{second}: done" in stderr

    reference = tmp_path / "reference"  # in-process: the same code path without the CLI
    results = run_sweep(config, ["train.lr=0.01,0.001"], 1, reference)
    assert [r.status for r in results] == ["done", "done"]
    write_report(reference)
    expected = (reference / "results.csv").read_text()
    assert "em" in expected.splitlines()[0].split(",")
    assert (killed / "results.csv").read_text() == expected


# -- estimators with different keys ------------------------------------------------------------

MIXED_CONFIG = """\
[retriever]
name = "bm25"
[posterior]
name = "bm25"
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
k = 3
samples = 2            # jsa and vrag have it, topk does not
[estimator.jsa]        # only the jsa cells
chain = "fresh"
k = 5
[data]
source = "toy"
[train]
steps = 1
"""


class RecordingTrain(FakeTrain):
    """FakeTrain that keeps each cell's resolved [estimator] section."""

    def __init__(self):
        super().__init__()
        self.estimators: dict[str, dict] = {}

    def __call__(self, resolved, config_path, out_dir: Path, resume: bool = False):
        self.estimators[out_dir.name] = resolved.to_dict()["estimator"]
        return super().__call__(resolved, config_path, out_dir, resume)


def test_sweep_over_estimators_with_different_keys(tmp_path):
    config = tmp_path / "mixed.toml"
    config.write_text(MIXED_CONFIG)
    fake = RecordingTrain()
    with pytest.warns(SweepWarning) as caught:
        results = run_sweep(config, ["estimator.name=topk,jsa"], 2, tmp_path / "out", train_fn=fake)
    assert [r.status for r in results] == ["done"] * 4
    topk = fake.estimators["estimator.name=topk__seed=0"]
    jsa = fake.estimators["estimator.name=jsa__seed=1"]
    assert "samples" not in topk and "chain" not in topk and topk["k"] == 3
    assert (jsa["samples"], jsa["chain"], jsa["k"]) == (2, "fresh", 5)
    messages = sorted(str(w.message) for w in caught if w.category is SweepWarning)
    assert messages == [
        f"cell estimator.name=topk__seed={seed}: estimator.samples dropped: "
        "estimator 'topk' has no such key"
        for seed in (0, 1)
    ]


def test_grid_and_set_values_beat_the_per_estimator_section(tmp_path):
    config = tmp_path / "mixed.toml"
    config.write_text(MIXED_CONFIG)
    fake = RecordingTrain()
    grid = ["estimator.name=topk,jsa", "estimator.k=2,4"]
    with pytest.warns(SweepWarning):
        run_sweep(
            config, grid, 1, tmp_path / "out", overrides=["estimator.jsa.samples=7"], train_fn=fake
        )
    ks = {name: section["k"] for name, section in fake.estimators.items()}
    assert ks == {
        "estimator.name=topk__estimator.k=2__seed=0": 2,
        "estimator.name=topk__estimator.k=4__seed=0": 4,
        "estimator.name=jsa__estimator.k=2__seed=0": 2,
        "estimator.name=jsa__estimator.k=4__seed=0": 4,
    }
    assert fake.estimators["estimator.name=jsa__estimator.k=2__seed=0"]["samples"] == 7


def test_a_key_no_swept_estimator_has_is_still_an_error(tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text(MIXED_CONFIG.replace("samples = 2 ", "samplez = 2"))
    fake = RecordingTrain()
    with pytest.raises(ConfigError) as info:
        run_sweep(config, ["estimator.name=topk,jsa"], 1, tmp_path / "out", train_fn=fake)
    assert str(info.value) == f"{config}: estimator.samplez: unknown key [all 2 cells]"
    assert fake.calls == [] and not (tmp_path / "out").exists()


def test_a_bad_key_in_a_per_estimator_section_names_its_cells(tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text(MIXED_CONFIG.replace('chain = "fresh"', 'chian = "fresh"'))
    with pytest.raises(ConfigError) as info, pytest.warns(SweepWarning):
        run_sweep(config, ["estimator.name=topk,jsa"], 1, tmp_path / "out", train_fn=FakeTrain())
    assert str(info.value) == f"{config}: estimator.chian: unknown key [estimator.name=jsa__seed=0]"


def test_real_sweep_over_topk_and_jsa_with_a_jsa_only_key(tmp_path, one_thread):
    config = tmp_path / "tiny.toml"
    config.write_text(
        TINY_CONFIG.replace('name = "bow"\n', 'name = "bow"\n[posterior]\nname = "bow"\nseed = 1\n')
        .replace("k = 4\n", 'k = 4\nsamples = 2\n[estimator.jsa]\nchain = "fresh"\n')
        .replace("steps = 2", "steps = 1")
    )
    out = tmp_path / "out"
    with pytest.warns(SweepWarning, match="estimator.samples dropped: estimator 'topk'"):
        results = run_sweep(config, ["estimator.name=topk,jsa"], 1, out)
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    written = (out / "estimator.name=jsa__seed=0" / "config.toml").read_text()
    assert 'chain = "fresh"' in written and "samples = 2" in written
    assert "samples" not in (out / "estimator.name=topk__seed=0" / "config.toml").read_text()
