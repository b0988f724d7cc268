"""Command-line hygiene (issue 16): `--json` prints one JSON document and nothing else on
stdout, `-h` is `--help`, exit codes (0 ok, 1 runtime failure, 2 bad input), a sweep with a
failed cell exits 1 naming it, shell completion, and a run folder's config.toml re-runs as
it is from another working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.data.readers import write_jsonl
from latentrag.testing import toy_corpus, toy_examples

ROOT = Path(__file__).resolve().parents[1]
LATENTRAG = Path(sys.executable).with_name("latentrag")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

#: bow retriever + tiny random llama + top-k on the toy set, read from JSONL files beside
#: the config (relative paths)
CONFIG = """\
[data]
source = "jsonl"
corpus = "passages.jsonl"
train = "train.jsonl"
dev = "train.jsonl"
[retriever]
name = "bow"
dim = 16
buckets = 256
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

#: a learning rate that overflows the loss: a runtime failure (TrainingError)
NONFINITE = ("--set", "train.lr=1e38", "--set", "train.max_grad_norm=1e38")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LATENTRAG), *args], capture_output=True, text=True, env=ENV, cwd=cwd)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "passages.jsonl", toy_corpus())
    write_jsonl(folder / "train.jsonl", toy_examples())
    (folder / "c.toml").write_text(CONFIG)
    return folder


@pytest.fixture(scope="module")
def failing_sweep(data_dir, tmp_path_factory):
    """A two-cell sweep (`--json`, a separate process) whose second cell's loss overflows."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    grid = ("--grid", "train.lr=1e-3,1e38", "--set", "train.max_grad_norm=1e38")
    result = cli("sweep", str(data_dir / "c.toml"), *grid, "--out", str(out), "--json")
    return result, out


def parse_json(stdout: str):
    """The whole of stdout is one JSON document (json.loads refuses anything after it)."""
    return json.loads(stdout)


# -- --json --------------------------------------------------------------------------------


def test_components_and_plugins_json():
    components = invoke("components", "--json")
    assert components.exit_code == 0, components.output
    rows = parse_json(components.stdout)
    assert {"kind": "retriever", "name": "bm25"}.items() <= rows[0].items()
    assert {(r["kind"], r["name"]) for r in rows} >= {("estimator", "jsa"), ("retriever", "bow")}
    plugins = invoke("plugins", "--json")
    assert plugins.exit_code == 0, plugins.output
    by_name = {p["plugin"]: p for p in parse_json(plugins.stdout)}
    assert by_name["latentrag.bm25"]["components"] == [{"kind": "retriever", "name": "bm25"}]
    assert by_name["latentrag.bm25"]["error"] is None


def test_config_show_json_equals_the_toml(data_dir):
    config = str(data_dir / "c.toml")
    shown = invoke("config", "show", config, "--set", "train.steps=7", "--json")
    assert shown.exit_code == 0, shown.output
    data = parse_json(shown.stdout)
    assert data["train"]["steps"] == 7 and data["retriever"] == {
        "name": "bow",
        **{k: v for k, v in data["retriever"].items() if k != "name"},
    }
    toml = invoke("config", "show", config, "--set", "train.steps=7")
    assert tomllib.loads(toml.stdout) == data


def test_config_show_does_not_begin_with_a_blank_line(data_dir):
    shown = invoke("config", "show", str(data_dir / "c.toml"))
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0] == "[retriever]"


def test_evaluate_json_in_a_separate_process(data_dir):
    result = cli("evaluate", str(data_dir / "c.toml"), "--json")
    assert result.returncode == 0, result.stderr
    row = parse_json(result.stdout)
    assert row["retrieval"] == "bow" and row["split"] == "dev"
    assert row["questions"] == len(toy_examples())
    assert 0.0 <= row["recall@1"] <= row["recall@5"] <= 1.0


def test_sweep_and_report_json(failing_sweep):
    result, out = failing_sweep
    document = parse_json(result.stdout)
    statuses = {cell["name"]: cell["status"] for cell in document["cells"]}
    assert sorted(statuses.values()) == ["done", "failed"]
    runs = document["report"]["runs"]
    assert {r["status"] for r in runs} == {"done", "failed"}
    assert Path(document["report"]["csv"]) == out / "results.csv"
    report = invoke("report", str(out), "--json")
    assert report.exit_code == 0, report.output
    assert parse_json(report.stdout)["runs"] == runs


# -- exit codes ---------------------------------------------------------------------------


def test_a_sweep_with_a_failed_cell_exits_1_and_names_it(failing_sweep):
    result, out = failing_sweep
    assert result.returncode == 1, result.stderr
    failed = [c["name"] for c in parse_json(result.stdout)["cells"] if c["status"] == "failed"]
    assert len(failed) == 1 and "1e38" in failed[0]
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"failed: {failed[0]}: TrainingError:") for line in lines)
    assert "error: 1 of 2 runs failed" in lines
    assert (out / failed[0] / "error.txt").is_file()


def test_a_training_error_exits_1(data_dir, tmp_path):
    config = str(data_dir / "c.toml")
    result = invoke("train", config, "--out", str(tmp_path / "run"), *NONFINITE)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: step ") and "non-finite loss" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_error_exits_2(data_dir, tmp_path):
    config = str(data_dir / "c.toml")
    result = invoke("train", config, "--out", str(tmp_path / "run"), "--set", "train.stepz=3")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().endswith("train.stepz: unknown key")
    assert not (tmp_path / "run").exists()


def test_bad_data_exits_2(data_dir, tmp_path):
    (tmp_path / "passages.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "c.toml").write_text(CONFIG.replace('"train.jsonl"', '"passages.jsonl"'))
    result = invoke("evaluate", str(tmp_path / "c.toml"), "--json")
    assert result.exit_code == 2, result.output
    assert "passages.jsonl" in result.stderr and result.stdout == ""


# -- help and completion ---------------------------------------------------------------------


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


@pytest.mark.parametrize("path", command_paths(main), ids=lambda p: " ".join(p) or "main")
def test_dash_h_is_help(path):
    short, long = invoke(*path, "-h"), invoke(*path, "--help")
    assert short.exit_code == long.exit_code == 0, short.output
    assert short.stdout == long.stdout and short.stdout.startswith("Usage: ")


def test_shell_completion_works_and_is_documented():
    env = {**ENV, "_LATENTRAG_COMPLETE": "bash_source"}
    script = subprocess.run([str(LATENTRAG)], capture_output=True, text=True, env=env)
    assert script.returncode == 0 and "_latentrag_completion()" in script.stdout
    env = {**ENV, "_LATENTRAG_COMPLETE": "bash_complete", "COMP_WORDS": "latentrag con"}
    words = subprocess.run(
        [str(LATENTRAG)], capture_output=True, text=True, env={**env, "COMP_CWORD": "1"}
    )
    assert words.stdout.strip() == "plain,config"
    for doc in ("README.md", "docs/cli.md"):
        assert "_LATENTRAG_COMPLETE=bash_source latentrag" in (ROOT / doc).read_text(), doc


# -- run folders -------------------------------------------------------------------------------


def test_a_run_folder_config_reruns_from_another_directory(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert invoke("train", str(data_dir / "c.toml"), "--out", str(run)).exit_code == 0
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["data"]["corpus"] == str(data_dir.resolve() / "passages.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = invoke("train", str(run / "config.toml"), "--out", "again")
    assert again.exit_code == 0, again.output
    assert tomllib.loads((elsewhere / "again" / "config.toml").read_text()) == saved
    first, second = (json.loads((d / "eval.json").read_text()) for d in (run, elsewhere / "again"))
    assert first == second  # the same data, config and seed: the same run


# -- quiet model loading -----------------------------------------------------------------------


def test_model_loading_is_quiet_and_our_progress_bars_stay(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # set by `main`
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from latentrag.experiments.demo import quiet_model_loading
    from latentrag.testing import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "tiny")
    was_enabled = transformers_logging.is_progress_bar_enabled()
    try:
        transformers_logging.enable_progress_bar()
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        assert "Loading weights" in capfd.readouterr().err  # what the demo printed per model
        quiet_model_loading()
        AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
        for _ in tqdm(range(3), desc="answering"):
            pass
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "answering: 100%" in err
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else quiet_model_loading)()
