"""Reports: collecting run folders, results.csv, the mean ± 95% interval table, plots."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.experiments.report import (
    band,
    collect,
    metric_direction,
    paired_difference,
    read_eval_curve,
    result_metrics,
    summarise,
    write_report,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = [
    {"key": "estimator.name", "values": ["topk", "jsa"]},
    {"key": "train.lr", "values": [0.001]},
]


def add_run(
    out: Path,
    estimator: str,
    seed: int,
    metrics: dict | None = None,
    error: str | None = None,
    losses: list[float] = (),
) -> Path:
    run = out / f"estimator.name={estimator}__train.lr=0.001__seed={seed}"
    run.mkdir(parents=True)
    assignment = {"estimator.name": estimator, "train.lr": 0.001}
    (run / "cell.json").write_text(json.dumps({"assignment": assignment, "seed": seed}))
    if metrics is not None:
        (run / "eval.json").write_text(json.dumps(metrics))
    if error is not None:
        (run / "error.txt").write_text(f"{error}\n\nTraceback (most recent call last):\n  ...\n")
    lines = []
    for i, loss in enumerate(losses):
        lines.append({"step": i + 1, "loss": loss, "wall_time": 1.0})
        lines.append({"step": i + 1, "eval": {"recall@1": 0.1 * (i + seed)}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """topk: 3 seeds; jsa: 2 seeds done and 1 failed; alphabetical order would put jsa first."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"config": "x.toml", "grid": GRID, "seeds": 3}))
    add_run(out, "topk", 0, {"recall@1": 0.2, "loss": 1.0}, losses=[3.0, 2.0])
    add_run(out, "topk", 1, {"recall@1": 0.4, "loss": 2.0}, losses=[5.0, 4.0])
    add_run(out, "topk", 2, {"recall@1": 0.6, "loss": 3.0}, losses=[4.0])
    add_run(out, "jsa", 0, {"recall@1": 0.1, "loss": 0.5}, losses=[1.0, 0.5])
    add_run(out, "jsa", 1, {"recall@1": 0.1 + 0.2, "loss": 0.7})
    add_run(out, "jsa", 2, error="RuntimeError: loss is nan at step 3")
    return out


def test_collect_reads_every_run_in_grid_order(sweep_dir):
    rows = collect(sweep_dir)
    assert [(r["assignment"]["estimator.name"], r["seed"]) for r in rows] == [
        ("topk", 0), ("topk", 1), ("topk", 2), ("jsa", 0), ("jsa", 1), ("jsa", 2),
    ]  # fmt: skip
    assert [r["status"] for r in rows] == ["done"] * 5 + ["failed"]
    assert rows[-1]["error"] == "RuntimeError: loss is nan at step 3"
    assert rows[0]["metrics"] == {"recall@1": 0.2, "loss": 1.0}


def test_results_csv_is_exact(sweep_dir):
    report = write_report(sweep_dir)
    assert report.csv_path.read_text() == (
        "estimator.name,train.lr,seed,status,loss,recall@1\n"
        "topk,0.001,0,done,1.0,0.2\n"
        "topk,0.001,1,done,2.0,0.4\n"
        "topk,0.001,2,done,3.0,0.6\n"
        "jsa,0.001,0,done,0.5,0.1\n"
        "jsa,0.001,1,done,0.7,0.30000000000000004\n"
        "jsa,0.001,2,failed,,\n"
    )


def table_cells(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]


def test_markdown_table_has_mean_interval_seeds_and_best_in_bold(sweep_dir):
    markdown = write_report(sweep_dir).markdown
    header, *cells = table_cells(markdown)
    assert header == ["estimator.name", "train.lr", "seeds", "failed", "loss", "recall@1"]
    # topk recall 0.2/0.4/0.6: mean 0.4, std 0.2, t(0.975, 2) = 4.303 -> ± 0.497
    # loss 1/2/3: mean 2, std 1 -> ± 2.48
    assert cells[0] == ["topk", "0.001", "3", "0", "2 ± 2.5", "**0.4 ± 0.5**"]
    # jsa recall 0.1/0.3: std 0.1414, t(0.975, 1) = 12.71 -> ± 1.27; loss lower is better
    assert cells[1] == ["jsa", "0.001", "2", "1", "**0.6 ± 1.3**", "0.2 ± 1.3"]
    assert "- `estimator.name=jsa__train.lr=0.001__seed=2`: RuntimeError: loss is nan" in markdown
    assert "95% confidence interval" in markdown
    assert (sweep_dir / "results.md").read_text() == markdown


def test_single_seed_shows_the_mean_alone(tmp_path):
    add_run(tmp_path, "topk", 0, {"f1": 0.25})
    add_run(tmp_path, "jsa", 0, {"f1": 0.5})
    cells = table_cells(write_report(tmp_path).markdown)
    # without sweep.json, cells are sorted by their values' text
    assert cells == [
        ["estimator.name", "train.lr", "seeds", "f1"],
        ["jsa", "0.001", "1", "**0.5**"],
        ["topk", "0.001", "1", "0.25"],
    ]


def test_summarise():
    summary = summarise([1.0, 2.0, 4.0])
    assert summary.mean == pytest.approx(7 / 3)
    assert summary.std == pytest.approx(1.5275252316519468)
    assert summary.half_width == pytest.approx(4.302652729911275 * 1.5275252316519468 / 3**0.5)
    assert summarise([3.0]).std is None and summarise([3.0]).interval is None
    assert summarise([float("nan")]) is None


@pytest.mark.parametrize(
    "name, direction",
    [
        ("recall@5", "max"),
        ("recall@20 (before)", "max"),
        ("mrr@10", "max"),
        ("em", "max"),
        ("f1", "max"),
        ("bleu", "max"),
        ("elbo", "max"),
        ("loss", "min"),
        ("eval_loss", "min"),
        ("nll", "min"),
        ("kl", "min"),
        ("perplexity", "min"),
        ("acceptance_rate", None),
        ("temperature", None),
    ],
)
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction


def test_incomplete_runs_are_listed(tmp_path):
    run = add_run(tmp_path, "topk", 0)
    (run / "eval.json").unlink(missing_ok=True)
    add_run(tmp_path, "jsa", 0, {"em": 1.0})
    report = write_report(tmp_path)
    assert [r["status"] for r in report.rows] == ["done", "incomplete"]
    assert "## Unfinished runs" in report.markdown and run.name in report.markdown


def test_eval_json_wins_over_a_stale_error(tmp_path):
    add_run(tmp_path, "topk", 0, {"em": 1.0}, error="RuntimeError: old")
    assert [r["status"] for r in collect(tmp_path)] == ["done"]


def test_empty_folder_gives_an_empty_report(tmp_path):
    report = write_report(tmp_path)
    assert "No runs found." in report.markdown
    assert report.csv_path.read_text() == "seed,status\n"
    assert report.plots == []


def test_eval_curves_skip_loss_lines_and_a_line_cut_short(tmp_path):
    run = add_run(tmp_path, "topk", 0, losses=[3.0, 2.0])
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "ev')
    assert read_eval_curve(run, "recall@1") == {1: 0.0, 2: 0.1}
    steps, means, widths = band([{1: 0.0, 2: 0.2}, {1: 0.2, 2: 0.4}, {2: 9.0}])
    assert steps == [2] and means == pytest.approx([3.2])  # only steps every seed reached
    steps, means, widths = band([{1: 0.0, 2: 0.2}, {1: 0.2, 2: 0.4}])
    assert steps == [1, 2] and means == pytest.approx([0.1, 0.3])
    assert widths == pytest.approx([12.706204736174698 * 0.1414213562373095 / 2**0.5] * 2)


def test_paired_difference_gives_the_verdict_from_the_interval(tmp_path):
    for seed, (a, b) in enumerate([(0.50, 0.40), (0.62, 0.50), (0.55, 0.46), (0.70, 0.59)]):
        add_run(tmp_path, "jsa", seed, {"recall@1": a, "loss": 1.0})
        add_run(tmp_path, "topk", seed, {"recall@1": b, "loss": 1.0 + 0.1 * (-1) ** seed})
    rows = collect(tmp_path)
    jsa, topk = {"estimator.name": "jsa"}, {"estimator.name": "topk"}
    diff = paired_difference(rows, "recall@1", jsa, topk)
    # differences 0.10, 0.12, 0.09, 0.11: mean 0.105, std 0.0129, t(0.975, 3) = 3.182
    assert diff.summary.mean == pytest.approx(0.105) and diff.separated
    expected = "jsa > topk on recall@1: yes, +0.105 [+0.084, +0.126] (4 paired seeds)"
    assert diff.verdict() == expected
    reverse = paired_difference(rows, "recall@1", topk, jsa)
    assert reverse.verdict().startswith("topk > jsa on recall@1: no, the reverse, -0.105")
    noisy = paired_difference(rows, "loss", jsa, topk)
    assert not noisy.separated and "no difference beyond noise" in noisy.verdict()
    assert paired_difference(rows, "recall@1", jsa, {"estimator.name": "vrag"}) is None


def test_plotted_metrics_leave_out_bookkeeping_and_constant_columns(tmp_path):
    add_run(tmp_path, "topk", 0, {"recall@1": 0.2, "recall@1 (before)": 0.1, "em": 0.0,
                                  "train_s": 12.0, "pairs_scored": 30})  # fmt: skip
    add_run(tmp_path, "jsa", 0, {"recall@1": 0.3, "recall@1 (before)": 0.1, "em": 0.0,
                                 "train_s": 15.0, "pairs_scored": 40})  # fmt: skip
    assert result_metrics(collect(tmp_path)) == ["recall@1"]


def test_plots_are_png_files(sweep_dir):
    pytest.importorskip("matplotlib")
    report = write_report(sweep_dir)
    assert [p.name for p in report.plots] == ["metrics.png", "curves.png"]
    for plot in report.plots:
        assert plot.read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({plot.name})" in report.markdown


def test_without_matplotlib_the_report_says_so(sweep_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    report = write_report(sweep_dir)
    assert report.plots == []
    assert "matplotlib is not installed" in report.markdown
    assert not (sweep_dir / "metrics.png").exists()


def test_report_command(sweep_dir):
    result = CliRunner().invoke(main, ["report", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    assert "**0.4 ± 0.5**" in result.output
    assert f"results: {sweep_dir / 'results.csv'}" in result.output
