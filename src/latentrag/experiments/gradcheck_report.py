"""What `latentrag gradcheck` prints and draws: the per-block table, `--json`, the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentrag.core.errors import ConfigError
from latentrag.experiments import tables
from latentrag.experiments.gradcheck import (
    BLOCKS,
    BlockStats,
    GradcheckResult,
    GradcheckRow,
    Interval,
)

LEGEND = (
    "cos: cosine of the seed-averaged gradient to g; bias²: noise-corrected "
    "||ḡ-g||² - tr Σ̂/S; var: tr Σ̂ of one step's gradient; both / ||g_block||²; "
    "[95%]: bootstrap over seeds; fwd/bwd: generator passes per example in the measured step."
)


# -- the table ------------------------------------------------------------------------------


#: relative values below this are rounding noise (a deterministic estimator's variance)
NOISE = 1e-9


def _number(value: float, spec: str) -> str:
    return f"{0.0 if abs(value) < NOISE else value:{spec}}"


def _interval(interval: Interval, digits: int, fixed: bool = False) -> str:
    if math.isnan(interval.value):
        return "n/a"
    spec = f".{digits}f" if fixed else f".{digits}g"
    point = _number(interval.value, spec)
    low, high = _number(interval.low, spec), _number(interval.high, spec)
    return point if low == high else f"{point} [{low}, {high}]"


def _exact_label(row: GradcheckRow) -> str:
    return "yes" if row.exact else "no (by design)"


def row_cells(row: GradcheckRow, lead: dict[str, str] | None = None) -> list[dict[str, str]]:
    """One table line per block the estimator trains (a dash line when none is checked)."""
    cells = []
    blocks: list[tuple[str, BlockStats | None]] = list(row.blocks.items()) or [("-", None)]
    for i, (role, stats) in enumerate(blocks):
        first = i == 0
        line = dict(lead or {}) if first else dict.fromkeys(lead or {}, "")
        line.update(
            {
                "estimator": row.estimator if first else "",
                "exact": _exact_label(row) if first else "",
                "block": role,
                "share": f"{stats.share:.3f}" if stats else "",
                "cos of mean [95%]": _interval(stats.cosine, 4, fixed=True) if stats else "",
                "bias² [95%]": _interval(stats.bias, 3) if stats else "",
                "var [95%]": _interval(stats.variance, 3) if stats else "",
                "fwd/ex": f"{row.forwards_per_example:.1f}" if first else "",
                "bwd/ex": f"{row.backwards_per_example:.1f}" if first else "",
            }
        )
        cells.append(line)
    return cells


def summary_line(result: GradcheckResult) -> str:
    """The reference at this point: block shares, proposal quality, prior quality."""
    objective = result.objective
    shares = ", ".join(f"{role} {share:.3f}" for role, share in result.shares.items())
    parts = [f"g at T = {objective.temperature:g}, loglik {objective.reduce}: {shares} of ||g||²"]
    summary = result.summary
    if "kl_pi_q" in summary:
        parts.append(f"KL(π||q) {summary['kl_pi_q']:.3g} nats")
    if "outside_top_k" in summary:
        parts.append(f"π outside the prior's top-k {summary['outside_top_k']:.3f}")
    if "prior_recall_at_1" in summary:
        parts.append(f"prior recall@1 {summary['prior_recall_at_1']:.2f}")
    lead = f"{result.key} = {result.value}: " if result.key else ""
    return lead + "; ".join(parts)


def format_results(results: Sequence[GradcheckResult] | Sequence[GradcheckRow]) -> str:
    """Summary lines, one aligned markdown table (a line per estimator and block), notes."""
    if results and isinstance(results[0], GradcheckRow):
        return tables.format_table([c for row in results for c in row_cells(row)])
    lines = [summary_line(r) for r in results]
    cells = []
    for result in results:
        lead = {result.key: str(result.value)} if result.key else None
        for row in result.rows:
            cells += row_cells(row, lead)
    lines += ["", tables.format_table(cells), LEGEND]
    lines += _notes(results)
    return "\n".join(lines)


def _notes(results: Sequence[GradcheckResult]) -> list[str]:
    notes: dict[str, str] = {}
    for result in results:
        for row in result.rows:
            if row.unchecked:
                notes[row.estimator] = (
                    f"{row.estimator} also trains {', '.join(row.unchecked)}: not compared "
                    "(the exact objective has no such term)"
                )
            if not row.exact:
                notes.setdefault(
                    f"{row.estimator}/exact",
                    f"{row.estimator} declares exact = False: biased by design, shown not judged",
                )
    return list(notes.values())


# -- JSON -----------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def _stats_json(stats: BlockStats) -> dict[str, Any]:
    return {
        "share": _finite(stats.share),
        "cosine": [_finite(v) for v in stats.cosine.as_list()],
        "bias": [_finite(v) for v in stats.bias.as_list()],
        "variance": [_finite(v) for v in stats.variance.as_list()],
        "cosine_mean": _finite(stats.cosine_mean),
    }


def _row_json(row: GradcheckRow) -> dict[str, Any]:
    return {
        "name": row.estimator,
        "exact": row.exact,
        "trains": list(row.trains),
        "objective": {"temperature": row.objective.temperature, "reduce": row.objective.reduce},
        "forwards_per_example": row.forwards_per_example,
        "backwards_per_example": row.backwards_per_example,
        "blocks": {role: _stats_json(stats) for role, stats in row.blocks.items()},
        "likelihood": _stats_json(row.likelihood) if row.likelihood else None,
        "unchecked": list(row.unchecked),
    }


def _point_json(result: GradcheckResult) -> dict[str, Any]:
    return {
        "objective": {
            "temperature": result.objective.temperature,
            "reduce": result.objective.reduce,
        },
        "blocks": {role: {"share": _finite(share)} for role, share in result.shares.items()},
        "summary": result.summary,
        "estimators": [_row_json(row) for row in result.rows],
    }


def to_json(results: Sequence[GradcheckResult], seeds: int | None = None) -> dict[str, Any]:
    """{"blocks": {role: {"share": ...}}, "estimators": [...]} for the first (or only)
    point; with a sweep or a training run also "sweep" (the key) and "points"."""
    out = _point_json(results[0])
    if seeds is not None:
        out["seeds"] = seeds
    if results[0].key:
        out["sweep"] = results[0].key
        out["points"] = [{"value": r.value, **_point_json(r)} for r in results]
    return out


# -- the plot -------------------------------------------------------------------------------

FLOOR = 1e-6  # bias² and variance below this (or a negative noise-corrected bias²) sit here


def plot(results: Sequence[GradcheckResult], path: str | Path) -> Path:
    """Bias² and variance (relative) against generator passes per example, one panel per
    block, one colour per estimator (filled: bias², hollow: variance), 95% error bars;
    against the step along a training run, and against the swept value when a sweep's
    points all cost the same."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'latentrag[plot]'") from None
    blocks = [b for b in BLOCKS if any(b in row.blocks for r in results for row in r.rows)]
    if not blocks:
        raise ConfigError("--plot: no block was compared")
    by_value = _x_is_value(results)
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.8), squeeze=False)
    labels = list(dict.fromkeys(row.estimator for r in results for row in r.rows))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    handles = {}
    for ax, block in zip(axes[0], blocks):
        xs = []
        for label in labels:
            drawn = _draw(ax, results, label, block, colours[label], by_value)
            if drawn is not None:
                handles.setdefault(label, drawn[0])
                xs += drawn[1]
        ax.set_title(block)
        ax.set_yscale("log")
        ax.set_xlabel(results[0].key if by_value else "generator passes per example")
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("bias² (filled), variance (hollow) / ||g||²")
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _x_is_value(results: Sequence[GradcheckResult]) -> bool:
    if not results[0].key or not all(isinstance(r.value, (int, float)) for r in results):
        return False
    if results[0].key == "step":
        return True
    costs = {}
    for result in results:
        for row in result.rows:
            costs.setdefault(row.estimator, set()).add(
                round(row.forwards_per_example + row.backwards_per_example, 6)
            )
    return all(len(c) == 1 for c in costs.values())


def _draw(ax, results, label: str, block: str, colour: str, by_value: bool):
    """Draw one estimator's points in one panel; (a legend handle, the x values) or None."""
    xs, bias, var = [], [], []
    for result in results:
        row = next((row for row in result.rows if row.estimator == label), None)
        if row is None or block not in row.blocks:
            continue
        stats = row.blocks[block]
        cost = row.forwards_per_example + row.backwards_per_example
        xs.append(float(result.value) if by_value else cost)
        bias.append(stats.bias)
        var.append(stats.variance)
    if not xs:
        return None
    handle = None
    for series, style, fill in ((bias, "-", colour), (var, "--", "none")):
        if fill == "none" and all(abs(i.value) < NOISE for i in series):
            continue  # a deterministic estimator: no variance to draw
        y = [max(i.value, FLOOR) for i in series]
        low = [max(0.0, v - max(i.low, FLOOR)) for v, i in zip(y, series)]
        high = [max(0.0, max(i.high, FLOOR) - v) for v, i in zip(y, series)]
        drawn = ax.errorbar(
            xs, y, yerr=[low, high], fmt="o" + style, color=colour, markerfacecolor=fill, capsize=2
        )
        handle = handle or drawn
    return handle, xs
