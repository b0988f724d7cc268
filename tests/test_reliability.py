"""Reliability through the command line (issue 8): exact resume after SIGKILL, one-line
errors (exit code 2) for every bad input with nothing already written damaged, and a
truncated checkpoint detected on resume. docs/reliability.md lists the messages.

Random bad records fed to the readers: tests/test_data.py::test_junk_parses_or_raises_data_error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.data.readers import write_jsonl
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training import checkpoint as ckpt
from latentrag.training.checkpoint import list_checkpoints, read_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LATENTRAG = Path(sys.executable).with_name("latentrag")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

#: bow retrievers + tiny random llama + JSA (persistent chains) on the toy set
JSA_CONFIG = """\
[data]
source = "toy"
[retriever]
name = "bow"
dim = 16
buckets = 256
[posterior]
name = "bow"
dim = 16
buckets = 256
seed = 1
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "jsa"
k = 3
samples = 2
[train]
steps = {steps}
batch_size = 4
checkpoint_every = 2
lr = 1e-3
"""

#: the same kind of pipeline reading JSONL files beside the config
JSONL_CONFIG = """\
[data]
source = "jsonl"
corpus = "passages.jsonl"
train = "train.jsonl"
dev = "train.jsonl"
[retriever]
name = "{retriever}"
{retriever_options}
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
k = 3
[train]
steps = 2
batch_size = 2
"""
BOW_OPTIONS = "dim = 16\nbuckets = 256"


# -- helpers ---------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LATENTRAG), *args], capture_output=True, text=True, env=ENV)


def invoke(*args: str):
    """The CLI in this process (no interpreter start-up); stderr kept apart."""
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(returncode: int, stderr: str, *fragments: str, code: int = 2) -> str:
    assert "Traceback" not in stderr, stderr
    assert returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_cli_error(result, *fragments: str, code: int = 2) -> str:
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return assert_one_line_error(result.exit_code, result.stderr, *fragments, code=code)


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "wall_s"} for line in lines]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    # from bytes, not load_file: a memory map of a file the test later truncates is a SIGBUS
    return safetensors.torch.load(path.read_bytes())


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        first, second = tensors(a / name), tensors(b / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)
    state_a, state_b = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for key in ("step", "position", "rng", "estimator", "optimizer", "skipped_steps", "loss"):
        assert state_a[key] == state_b[key], key


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Toy passages and questions as JSONL, and a config (bow retriever) reading them."""
    write_jsonl(tmp_path / "passages.jsonl", toy_corpus())
    write_jsonl(tmp_path / "train.jsonl", toy_examples())
    write_config(tmp_path, "bow", BOW_OPTIONS)
    return tmp_path


def write_config(folder: Path, retriever: str, options: str) -> Path:
    path = folder / "c.toml"
    path.write_text(JSONL_CONFIG.format(retriever=retriever, retriever_options=options))
    return path


def edit_line(path: Path, number: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new)
    path.write_text("".join(lines))


# -- acceptance 1: SIGKILL, then --resume, equals an uninterrupted run -----------------------


def wait_for_checkpoint(process: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(out):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 40  # the first checkpoint comes at step 2: the kill lands well before the end
    config = tmp_path / "jsa.toml"
    config.write_text(JSA_CONFIG.format(steps=steps))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(
        [str(LATENTRAG), "train", str(config), "--out", str(whole)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    victim = subprocess.Popen(
        [str(LATENTRAG), "train", str(config), "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    wait_for_checkpoint(victim, killed)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert reference.wait() == 0
    interrupted_at = list_checkpoints(killed)[-1][0]
    assert interrupted_at < steps and not (killed / "eval.json").exists()

    resumed = cli("train", str(config), "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = f"ckpt-{steps}"
    assert_same_checkpoint(whole / final, killed / final)
    chains = read_checkpoint(killed / final).state["estimator"]["cache"]
    assert len(chains) == len(toy_examples())  # the chain cache made the round trip
    assert metric_lines(killed) == metric_lines(whole)
    assert json.loads((killed / "eval.json").read_text()) == json.loads(
        (whole / "eval.json").read_text()
    )


# -- acceptance 4: a truncated checkpoint is skipped on resume -------------------------------


def test_resume_skips_a_truncated_checkpoint_and_continues_from_the_previous(tmp_path):
    config = tmp_path / "jsa.toml"
    config.write_text(JSA_CONFIG.format(steps=4))
    out = tmp_path / "run"
    assert invoke("train", str(config), "--out", str(out)).exit_code == 0
    original = {name: tensors(out / "ckpt-4" / name) for name in ("model.safetensors",)}
    weights = out / "ckpt-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    result = cli("train", str(config), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "damaged checkpoint" in line)
    assert str(weights) in warning and "sha256 mismatch (truncated or corrupted)" in warning
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    steps = [line["step"] for line in metric_lines(out) if "loss" in line]
    assert steps == [1, 2, 3, 4]  # 3 and 4 trained again, from ckpt-2
    redone = tensors(out / "ckpt-4" / "model.safetensors")
    for key, value in original["model.safetensors"].items():
        assert torch.equal(redone[key], value), key


# -- acceptance 2: bad inputs, one line each, exit code 2 ------------------------------------


def test_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[retriever\nname = "bm25"\n')
    result = cli("config", "validate", str(path))
    assert_one_line_error(result.returncode, result.stderr, "bad.toml: invalid TOML", "line 1")


def test_truncated_toml(tmp_path):
    path = tmp_path / "cut.toml"
    path.write_text(JSA_CONFIG.format(steps=2)[:30])
    assert_cli_error(invoke("config", "validate", str(path)), "cut.toml: invalid TOML")


def test_missing_config_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nsource = "toy"\n')
    assert_cli_error(
        invoke("config", "validate", str(path)), "c.toml: retriever: required key is missing"
    )


def test_unknown_component(data_dir):
    config = data_dir / "c.toml"
    config.write_text(config.read_text().replace('name = "topk"', 'name = "top-k"'))
    assert_cli_error(
        invoke("train", str(config), "--out", str(data_dir / "out")),
        "c.toml: estimator.name: unknown estimator 'top-k'",
    )
    assert not (data_dir / "out").exists()


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (
            lambda d: edit_line(d / "passages.jsonl", 3, '"}', '"'),
            ["passages.jsonl:3: malformed JSON"],
        ),
        (
            lambda d: (d / "passages.jsonl").write_bytes(
                (d / "passages.jsonl").read_bytes()[:1000]
            ),
            ["passages.jsonl:10: malformed JSON: Unterminated string"],
        ),
        (
            lambda d: edit_line(d / "train.jsonl", 2, '"question": ', '"query": '),
            ["train.jsonl:2: missing field 'question'"],
        ),
        (
            lambda d: (d / "passages.jsonl").write_text(""),
            ["passages.jsonl: no passages (the file is empty)"],
        ),
        (
            lambda d: edit_line(d / "train.jsonl", 2, '["rome"]', '["roma"]'),
            ["train.jsonl:2: example 'q-rome': gold id 'roma' is not in the corpus"],
        ),
        (
            lambda d: edit_line(d / "train.jsonl", 2, '["Rome"]', "[]"),
            ["train.jsonl:2: field 'answers' must not be empty"],
        ),
        (
            lambda d: (d / "train.jsonl").unlink(),
            ["train.jsonl: no such file"],
        ),
    ],
    ids=[
        "malformed-jsonl",
        "truncated-jsonl",
        "missing-field",
        "empty-corpus",
        "gold-id-absent",
        "no-answer",
        "missing-file",
    ],
)
def test_bad_data_files(data_dir, damage, fragments):
    damage(data_dir)
    out = data_dir / "out"
    assert_cli_error(invoke("train", str(data_dir / "c.toml"), "--out", str(out)), *fragments)
    assert not out.exists()
    assert_cli_error(invoke("evaluate", str(data_dir / "c.toml")), *fragments)


def test_k_larger_than_the_corpus(data_dir):
    result = invoke("train", str(data_dir / "c.toml"), "--out", str(data_dir / "out"))
    assert result.exit_code == 0, result.output
    before = hashes(data_dir / "out")
    result = invoke(
        "train", str(data_dir / "c.toml"), "--out", str(data_dir / "out"), "--resume",
        "--set", "estimator.k=50",
    )  # fmt: skip
    assert_cli_error(result, "c.toml: estimator.k: 50 is larger than the corpus (12 passages)")
    assert hashes(data_dir / "out") == before  # config.toml included


@pytest.fixture
def dense_index(data_dir) -> Path:
    """A tiny-random DPR index built by `latentrag index build` for the toy corpus."""
    index_dir = data_dir / "index"
    write_config(data_dir, "dpr", f'model = "tiny-random"\nindex_dir = "{index_dir}"')
    result = invoke("index", "build", str(data_dir / "c.toml"))
    assert result.exit_code == 0, result.output
    return index_dir


@pytest.mark.parametrize(
    ("change", "args", "fragments"),
    [
        (
            lambda d: edit_line(d / "passages.jsonl", 1, "Seine", "Danube"),
            [],
            ["was built from a different corpus (saved", "latentrag index build CONFIG"],
        ),
        (
            lambda d: None,
            ["--set", "retriever.seed=3"],
            ["was built from a different passage encoder weights (saved"],
        ),
    ],
    ids=["other-corpus", "other-model"],
)
def test_index_built_for_another_corpus_or_model(data_dir, dense_index, change, args, fragments):
    before = hashes(dense_index)
    change(data_dir)
    config = str(data_dir / "c.toml")
    line = assert_cli_error(invoke("evaluate", config, *args), *fragments)
    assert f"index in {dense_index}" in line
    assert hashes(dense_index) == before
    # the command the message names does rebuild it
    assert invoke("index", "build", config, *args).exit_code == 0
    assert invoke("evaluate", config, *args).exit_code == 0


def test_truncated_dense_index(data_dir, dense_index):
    index_file = dense_index / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:500])
    assert_cli_error(
        invoke("evaluate", str(data_dir / "c.toml")),
        f"{index_file}: unreadable faiss index (truncated?)",
    )


def test_full_disk_while_writing_a_checkpoint(data_dir, monkeypatch):
    config, out = str(data_dir / "c.toml"), data_dir / "out"
    assert (
        invoke("train", config, "--out", str(out), "--set", "train.checkpoint_every=2").exit_code
        == 0
    )
    written = hashes(out / "ckpt-2")
    old_metrics = (out / "metrics.jsonl").read_text()

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_file", disk_full)
    result = invoke("train", config, "--out", str(out), "--resume", "--set", "train.steps=4")
    assert_cli_error(result, f"could not write checkpoint {out}/ckpt-4: No space left on device")
    assert hashes(out / "ckpt-2") == written
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt-2"]
    assert (out / "metrics.jsonl").read_text().startswith(old_metrics)
    assert read_checkpoint(out / "ckpt-2").step == 2


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(data_dir):
    out = data_dir / "out"
    result = cli(
        "train", str(data_dir / "c.toml"), "--out", str(out),
        "--set", "train.lr=1e38", "--set", "train.max_grad_norm=1e38",
        "--set", "train.steps=6", "--set", "train.checkpoint_every=1",
    )  # fmt: skip
    line = assert_one_line_error(
        result.returncode,
        result.stderr,
        "step 2: non-finite loss (nan); training stopped",
        code=1,  # a runtime failure, not bad input
    )
    assert line.endswith(f"(last checkpoint: {out}/ckpt-1)")
    assert read_checkpoint(out / "ckpt-1").step == 1  # it verifies
    assert [line["step"] for line in metric_lines(out)] == [1]


def test_resume_with_only_a_damaged_checkpoint(data_dir):
    out = data_dir / "out"
    assert invoke("train", str(data_dir / "c.toml"), "--out", str(out)).exit_code == 0
    state = out / "ckpt-2" / "state.json"
    state.write_bytes(state.read_bytes()[:20])
    result = cli("train", str(data_dir / "c.toml"), "--out", str(out), "--resume")
    assert_one_line_error(
        result.returncode,
        result.stderr,
        f"no usable checkpoint in {out}; skipped damaged checkpoint: {state}: sha256 mismatch",
    )


def test_resume_with_a_checkpoint_of_another_run(data_dir):
    out, config = data_dir / "out", str(data_dir / "c.toml")
    assert invoke("train", config, "--out", str(out)).exit_code == 0
    written = hashes(out / "ckpt-2")
    result = invoke("train", config, "--out", str(out), "--resume", "--set", "data.max_train=6")
    assert_cli_error(
        result,
        f"{out}/ckpt-2 does not fit this run: it was trained on 12 examples, this run has 6",
        code=1,  # TrainingError
    )
    assert hashes(out / "ckpt-2") == written


def test_run_folder_that_cannot_be_created(data_dir):
    blocker = data_dir / "passages.jsonl"
    before = hashes(data_dir)
    result = invoke("train", str(data_dir / "c.toml"), "--out", str(blocker / "run"))
    assert_cli_error(result, f"{blocker}/run: cannot write the run folder (Not a directory)")
    assert hashes(data_dir) == before
