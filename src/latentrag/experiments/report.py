"""Sweep reports: every run folder collected into results.csv, a markdown table and plots.

The table has one row per grid cell: the mean ± the half-width of its 95% confidence
interval (Student t over the cell's finished seeds); with a single seed only the mean.
Two cells are compared by `paired_difference`: the same seeds start from the same
initialisation, so the difference is taken seed by seed and given with its own interval.
The best mean of each metric is bold: higher is better for recall, MRR, EM, F1, BLEU,
ELBO, accuracy and the like; lower is better for loss-like names (loss, NLL, perplexity,
KL, error, time); metrics matching neither rule are not marked.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentrag.experiments.sweep import CELL_FILE, ERROR_FILE, EVAL_FILE, METRICS_FILE, SWEEP_FILE
from latentrag.experiments.tables import format_table
from latentrag.io.atomic import atomic_write_bytes

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"
METRICS_PLOT = "metrics.png"
CURVES_PLOT = "curves.png"
STATUS_ORDER = ("done", "failed", "incomplete")

HIGHER_IS_BETTER = {
    "recall", "mrr", "em", "exact", "f1", "bleu", "rouge", "elbo", "accuracy", "acc",
    "precision", "ndcg", "hit", "hits",
}  # fmt: skip
LOWER_IS_BETTER = {
    "loss", "nll", "perplexity", "ppl", "kl", "error", "err", "time", "seconds", "latency",
}  # fmt: skip
#: what a run cost rather than what it achieved: kept in the table, never plotted as a result
BOOKKEEPING = {
    "time", "seconds", "wall", "latency", "pairs", "scored", "forwards", "backwards", "passes",
    "steps", "skipped",
}  # fmt: skip
BEFORE = " (before)"


@dataclass
class Report:
    """What `write_report` wrote: the markdown text and the files' paths."""

    markdown: str
    csv_path: Path
    markdown_path: Path
    plots: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


# -- collecting ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def read_manifest(out_dir: Path) -> dict[str, Any]:
    manifest = _read_json(out_dir / SWEEP_FILE)
    return manifest if isinstance(manifest, dict) else {}


def _grid_order(out_dir: Path) -> dict[str, list[Any]]:
    """key -> values in the order the sweep listed them (empty without sweep.json)."""
    return {axis["key"]: list(axis["values"]) for axis in read_manifest(out_dir).get("grid", [])}


def _read_run(run_dir: Path) -> dict[str, Any]:
    cell = _read_json(run_dir / CELL_FILE) or {}
    row: dict[str, Any] = {"run": run_dir.name, "assignment": cell.get("assignment", {})}
    row["seed"] = cell.get("seed")
    metrics = _read_json(run_dir / EVAL_FILE)
    if isinstance(metrics, dict):
        row["status"], row["metrics"] = "done", metrics
    elif (run_dir / ERROR_FILE).exists():
        text = (run_dir / ERROR_FILE).read_text("utf-8", errors="replace").strip()
        row["status"], row["error"] = "failed", (text.splitlines() or ["(empty error.txt)"])[0]
    else:
        row["status"] = "incomplete"
    row.setdefault("metrics", {})
    return row


def _sort_key(row: dict[str, Any], order: dict[str, list[Any]]) -> tuple:
    """Grid values in the sweep's own order (else by their JSON text), then seed."""
    key = []
    for name, value in row["assignment"].items():
        values = order.get(name, [])
        key.append((0, values.index(value), "") if value in values else (1, 0, json.dumps(value)))
    seed = row["seed"] if isinstance(row["seed"], int) else -1
    return (tuple(key), seed, row["run"])


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """One row per run folder under `out_dir`: run, assignment, seed, status, metrics, error.

    Run folders are those with a `cell.json`, `eval.json` or `error.txt`; a run with
    `eval.json` is "done" (even beside a stale error.txt), one with only `error.txt`
    "failed", one with only `cell.json` "incomplete" (running, or killed).
    """
    out_dir = Path(out_dir)
    markers = (CELL_FILE, EVAL_FILE, ERROR_FILE)
    run_dirs = sorted({path.parent for marker in markers for path in out_dir.glob(f"*/{marker}")})
    rows = [_read_run(run_dir) for run_dir in run_dirs]
    order = _grid_order(out_dir)
    return sorted(rows, key=lambda row: _sort_key(row, order))


def grid_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row["assignment"]))
    return list(keys)


def metric_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({name for row in rows for name in row["metrics"]})


# -- values and statistics ----------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Exact, reproducible text: floats by repr, strings as they are, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_direction(name: str) -> str | None:
    """Which way is better: "max", "min" or None (unknown), by the words of the name."""
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    if words & LOWER_IS_BETTER:
        return "min"
    if words & HIGHER_IS_BETTER:
        return "max"
    return None


def is_bookkeeping(name: str) -> bool:
    """A cost or counter (train time, pairs scored), not a result ("_s" ends a seconds key)."""
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    return bool(words & BOOKKEEPING) or name.endswith("_s")


def t_quantile(count: int, level: float = 0.95) -> float:
    """The two-sided Student t quantile for `count` values (count - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, count - 1))


@dataclass
class Summary:
    """A metric over the seeds of one grid cell: mean, sample std, 95% interval."""

    mean: float
    std: float | None  # None with a single seed
    count: int

    @property
    def half_width(self) -> float | None:
        """Half-width of the 95% confidence interval of the mean (None with one seed)."""
        if self.std is None:
            return None
        return t_quantile(self.count) * self.std / math.sqrt(self.count)

    @property
    def interval(self) -> tuple[float, float] | None:
        hw = self.half_width
        return None if hw is None else (self.mean - hw, self.mean + hw)

    def text(self) -> str:
        if self.half_width is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


def summarise(values: Sequence[float]) -> Summary | None:
    values = [v for v in values if _is_number(v)]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(statistics.fmean(values), std, len(values))


@dataclass
class Difference:
    """`first - second` on one metric, paired by seed, with its 95% interval."""

    metric: str
    first: str
    second: str
    summary: Summary

    @property
    def separated(self) -> bool:
        """The interval excludes 0 (needs >= 2 paired seeds)."""
        interval = self.summary.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)

    def verdict(self) -> str:
        """E.g. "jsa > vrag on recall@1: yes, +0.06 [0.03, 0.09] (5 seeds)"."""
        s = self.summary
        interval = s.interval
        span = f" [{_signed(interval[0])}, {_signed(interval[1])}]" if interval else ""
        numbers = f"{_signed(s.mean)}{span} ({s.count} paired seed{'s' if s.count != 1 else ''})"
        question = f"{self.first} > {self.second} on {self.metric}"
        if interval is None:
            return f"{question}: cannot tell from one seed, {numbers}"
        if not self.separated:
            return f"{question}: no difference beyond noise, {numbers}"
        better = self.first if (s.mean > 0) == (metric_direction(self.metric) != "min") else None
        answer = "yes" if better == self.first else "no, the reverse"
        return f"{question}: {answer}, {numbers}"


def _signed(value: float) -> str:
    """+0.105, -0.003; 2 significant digits below 0.01 (+0.00042), never -0.000; float
    noise (|value| < 1e-6, e.g. two recalls of 0.3 computed in float32) is +0."""
    if abs(value) < 1e-6:
        return "+0"
    return f"{value:+.3f}" if abs(value) >= 0.01 else f"{value:+.2g}"


def paired_difference(
    rows: Sequence[dict[str, Any]], metric: str, first: dict[str, Any], second: dict[str, Any]
) -> Difference | None:
    """first - second on `metric` over the seeds both cells finished (None: no common seed).

    `first` and `second` are grid assignments (e.g. {"estimator.name": "jsa"})."""

    def by_seed(assignment: dict[str, Any]) -> dict[Any, float]:
        return {
            r["seed"]: r["metrics"][metric]
            for r in rows
            if r["status"] == "done"
            and all(r["assignment"].get(k) == v for k, v in assignment.items())
            and _is_number(r["metrics"].get(metric))
        }

    a, b = by_seed(first), by_seed(second)
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    summary = summarise([a[seed] - b[seed] for seed in seeds])
    assert summary is not None
    return Difference(metric, cell_label(first), cell_label(second), summary)


def group_cells(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict]]]:
    """Rows grouped by grid assignment, keeping the rows' order."""
    groups: dict[str, tuple[dict[str, Any], list[dict]]] = {}
    for row in rows:
        key = json.dumps(row["assignment"], sort_keys=True, default=str)
        groups.setdefault(key, (row["assignment"], []))[1].append(row)
    return list(groups.values())


# -- results.csv --------------------------------------------------------------------------------


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per run: grid keys, seed, status, then every metric (sorted by name)."""
    keys, metrics = grid_keys(rows), metric_names(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*keys, "seed", "status", *metrics])
    for row in rows:
        values = [row["assignment"].get(k) for k in keys] + [row["seed"], row["status"]]
        values += [row["metrics"].get(m) for m in metrics]
        writer.writerow([format_value(v) for v in values])
    return buffer.getvalue()


# -- results.md ---------------------------------------------------------------------------------


def _best(summaries: list[Summary | None], direction: str | None) -> float | None:
    means = [s.mean for s in summaries if s is not None]
    if direction is None or len(means) < 2:
        return None
    return max(means) if direction == "max" else min(means)


def cell_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The markdown table's rows: one per grid cell, mean ± 95% half-width per metric,
    best in bold."""
    keys, metrics = grid_keys(rows), metric_names(rows)
    groups = group_cells(rows)
    done = [[r for r in runs if r["status"] == "done"] for _, runs in groups]
    columns: dict[str, list[Summary | None]] = {
        m: [summarise([r["metrics"].get(m) for r in runs]) for runs in done] for m in metrics
    }
    table = []
    for index, (assignment, runs) in enumerate(groups):
        line = {k: format_value(assignment.get(k)) for k in keys}
        line["seeds"] = str(len(done[index]))
        failed = sum(r["status"] == "failed" for r in runs)
        if any(r["status"] != "done" for r in rows):
            line["failed"] = str(failed)
        for m in metrics:
            summary = columns[m][index]
            text = summary.text() if summary else ""
            best = _best(columns[m], metric_direction(m))
            line[m] = f"**{text}**" if summary and summary.mean == best else text
        table.append(line)
    return table


def _explain(rows: Sequence[dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUS_ORDER}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"{len(rows)} runs ({summary}). Each metric: mean ± half-width of its 95% confidence "
        "interval (Student t over the cell's finished seeds); with one seed, the mean alone. "
        "Bold: the best mean per "
        "column (higher is better for recall/MRR/EM/F1/BLEU/ELBO-like names, lower for "
        "loss/NLL/perplexity/KL/error/time-like names; other metrics are not marked)."
    )


def _describe_sweep(manifest: dict[str, Any]) -> list[str]:
    """What was swept, from sweep.json (no folder names: shards copied anywhere agree)."""
    if not manifest:
        return []
    grid = "; ".join(
        f"`{axis['key']}` = {', '.join(format_value(v) for v in axis['values'])}"
        for axis in manifest.get("grid", [])
    )
    line = f"Config `{Path(str(manifest.get('config', '?'))).name}`"
    line += f", grid: {grid or '(none)'}, seeds: {manifest.get('seeds', '?')}"
    if manifest.get("overrides"):
        line += ", overrides: " + " ".join(f"`{o}`" for o in manifest["overrides"])
    return [line + ".", ""]


def markdown_report(
    manifest: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    plots: Sequence[Path],
    plot_note: str,
) -> str:
    """The report's markdown; its text depends only on the runs, never on where they are."""
    lines = ["# Sweep results", "", *_describe_sweep(manifest)]
    if not rows:
        return "\n".join([*lines, "No runs found.", ""])
    table = cell_table(rows)
    lines += [_explain(rows), "", format_table(table, list(table[0]), markdown=True), ""]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- `{r['run']}`: {r['error']}" for r in failed] + [""]
    incomplete = [r for r in rows if r["status"] == "incomplete"]
    if incomplete:
        lines += ["## Unfinished runs", ""]
        lines += [f"- `{r['run']}`" for r in incomplete] + [""]
    lines += ["## Plots", ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots] or [plot_note]
    return "\n".join([*lines, ""])


# -- plots --------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_key(key: str) -> str:
    """`retriever.k1` -> `k1`; `estimator.name` -> `estimator`."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def cell_label(assignment: dict[str, Any]) -> str:
    if not assignment:
        return "all"
    if len(assignment) == 1:
        return format_value(next(iter(assignment.values())))
    return "\n".join(f"{_short_key(k)}={format_value(v)}" for k, v in assignment.items())


def result_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metrics worth a panel: results (not bookkeeping), the "after" value of a before/after
    pair, and not the same number in every run (an all-zero EM says nothing)."""
    done = [r for r in rows if r["status"] == "done"]
    names = [m for m in metric_names(done) if not m.endswith(BEFORE) and not is_bookkeeping(m)]
    varying = []
    for name in names:
        values = {r["metrics"].get(name) for r in done} | {
            r["metrics"].get(name + BEFORE) for r in done
        }
        numbers = {v for v in values if _is_number(v)}
        if len(numbers) > 1:
            varying.append(name)
    return varying


def _cell_summaries(groups, metric: str) -> list[Summary | None]:
    return [
        summarise([r["metrics"].get(metric) for r in runs if r["status"] == "done"])
        for _, runs in groups
    ]


def _errorbar(ax, xs, summaries, **style) -> None:
    means = [s.mean if s else math.nan for s in summaries]
    errors = [s.half_width or 0.0 if s else 0.0 for s in summaries]
    ax.errorbar(xs, means, yerr=errors if any(errors) else None, capsize=4, **style)


def plot_metrics(plt, rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """One panel per result metric: each grid cell's mean with its 95% interval, after
    training, and before it (hollow, joined by a line) where the run measured both."""
    metrics = result_metrics(rows)
    if not metrics:
        return False
    groups = group_cells(rows)
    labels = [cell_label(assignment) for assignment, _ in groups]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(4.0, 0.7 * len(labels) + 2.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.8 * nrows), squeeze=False)
    xs = list(range(len(labels)))
    for ax, metric in zip(axes.flat, metrics):
        after = _cell_summaries(groups, metric)
        before = _cell_summaries(groups, metric + BEFORE)
        if any(before):
            shifted = [x - 0.12 for x in xs]
            _errorbar(ax, shifted, before, fmt="o", mfc="white", color="tab:gray", label="before")
            for x, b, a in zip(xs, before, after):
                if a and b:
                    ax.plot([x - 0.12, x + 0.12], [b.mean, a.mean], color="tab:gray", lw=0.8)
        _errorbar(ax, [x + 0.12 for x in xs] if any(before) else xs, after, fmt="o",
                  color="tab:blue", label="after")  # fmt: skip
        ax.set_title(metric + (" (mean, 95% CI)" if any(s and s.count > 1 for s in after) else ""))
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        if any(before):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def read_eval_curve(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> a dev metric from a run's periodic evaluations in metrics.jsonl, and at step 0
    its value before training (eval.json's "(before)" entry) when the run measured it."""
    curve: dict[int, float] = {}
    before = _read_json(run_dir / EVAL_FILE)
    if isinstance(before, dict) and _is_number(before.get(metric + BEFORE)):
        curve[0] = float(before[metric + BEFORE])
    path = run_dir / METRICS_FILE
    if not path.exists():
        return curve
    for text in path.read_text("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(text)
        except ValueError:
            continue  # a line cut short by a killed run
        evaluation = record.get("eval") if isinstance(record, dict) else None
        if isinstance(evaluation, dict) and _is_number(evaluation.get(metric)):
            curve[int(record["step"])] = float(evaluation[metric])
    return curve


def curve_metric(out_dir: Path, rows: Sequence[dict[str, Any]]) -> str | None:
    """The dev metric to draw against steps: recall@1 / hit@1 when evaluated, else the
    first result metric that the runs evaluated periodically."""
    done = [r for r in rows if r["status"] == "done"]
    candidates = ["recall@1", "hit@1", *result_metrics(rows)]
    for metric in candidates:
        if any(len(read_eval_curve(out_dir / r["run"], metric)) > 1 for r in done):
            return metric
    return None


def band(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every curve reached, the mean and the 95% half-width over curves there."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    means, widths = [], []
    for step in steps:
        summary = summarise([c[step] for c in curves])
        assert summary is not None
        means.append(summary.mean)
        widths.append(summary.half_width or 0.0)
    return steps, means, widths


def plot_curves(plt, out_dir: Path, rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """A dev metric (recall@1 by default) against training step, one line per grid cell
    (mean over its seeds) with its 95% band."""
    metric = curve_metric(out_dir, rows)
    if metric is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for assignment, runs in group_cells(rows):
        done = [r for r in runs if r["status"] == "done"]
        curves = [c for c in (read_eval_curve(out_dir / r["run"], metric) for r in done) if c]
        steps, means, widths = band(curves)
        if not steps:
            continue
        label = cell_label(assignment).replace("\n", ", ") + f" ({len(curves)} seeds)"
        (line,) = ax.plot(steps, means, label=label, marker="." if len(steps) < 30 else None)
        lower = [m - w for m, w in zip(means, widths)]
        upper = [m + w for m, w in zip(means, widths)]
        ax.fill_between(steps, lower, upper, color=line.get_color(), alpha=0.2, lw=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"dev {metric} (mean, 95% band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(out_dir: Path, rows: Sequence[dict[str, Any]]) -> tuple[list[Path], str]:
    """The plots written, and a note for the markdown when there are none."""
    plt = _pyplot()
    if plt is None:
        return [], "No plots: matplotlib is not installed (`pip install 'latentrag[plot]'`)."
    plots = []
    if plot_metrics(plt, rows, out_dir / METRICS_PLOT):
        plots.append(out_dir / METRICS_PLOT)
    if plot_curves(plt, out_dir, rows, out_dir / CURVES_PLOT):
        plots.append(out_dir / CURVES_PLOT)
    return plots, "No plots: no finished run has metrics yet."


# -- everything ---------------------------------------------------------------------------------


def write_report(out_dir: Path) -> Report:
    """Collect `out_dir` and write results.csv, results.md and the plots there."""
    out_dir = Path(out_dir)
    rows = collect(out_dir)
    csv_path = out_dir / CSV_FILE
    atomic_write_bytes(csv_path, results_csv(rows).encode("utf-8"))
    plots, note = write_plots(out_dir, rows) if rows else ([], "No plots: no runs.")
    markdown = markdown_report(read_manifest(out_dir), rows, plots, note)
    markdown_path = out_dir / MARKDOWN_FILE
    atomic_write_bytes(markdown_path, markdown.encode("utf-8"))
    return Report(markdown, csv_path, markdown_path, plots, rows)
