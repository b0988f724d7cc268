"""Regenerate the measured parts of docs/estimators.md from the committed benchmark outputs.

Inputs (each written by the command in its section of docs/estimators.md):
  benchmarks/results/gradcheck/{main,pool,samples,proposal,temperature,training}.json
  benchmarks/results/latent_retrieval/table.md (when present)
Outputs: the blocks between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` in
docs/estimators.md, and docs/img/gradcheck_*.png.

    python scripts/make_estimator_docs.py          # rewrite the tables and the plots
    python scripts/make_estimator_docs.py --check  # exit 1 when the tables are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "estimators.md"
IMAGES = ROOT / "docs" / "img"
BLOCKS = ("retriever", "posterior", "generator")


def load(name: str) -> dict:
    return json.loads((RESULTS / "gradcheck" / f"{name}.json").read_text("utf-8"))


def number(value: float) -> str:
    if abs(value) < 5e-4:
        return "0" if abs(value) < 1e-12 else f"{value:.1e}"
    return f"{value:.3g}"


def with_interval(triple: list[float] | None) -> str:
    """`mean [lo, hi]`, or the mean alone when the interval has no width."""
    if not triple:
        return ""
    mean, low, high = triple
    if abs(high - low) < 1e-9 * max(1.0, abs(mean)):
        return number(max(mean, 0.0) if abs(mean) < 1e-9 else mean)
    return f"{number(mean)} [{number(low)}, {number(high)}]"


def row_cells(estimator: dict, block: str) -> list[str]:
    numbers = estimator["blocks"].get(block)
    if numbers is None:
        return ["—", "—", "—"]
    return [
        f"{numbers['cosine'][0]:.3f}",
        with_interval(numbers["bias"]),
        with_interval(numbers["variance"]),
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(data: dict) -> str:
    shares = ", ".join(f"{b} {data['blocks'][b]['share']:.3f}" for b in BLOCKS)
    summary = data["summary"]
    header = ["estimator", "exact?", "passes fwd/bwd"]
    for block in BLOCKS:
        header += [f"{block} cos", f"{block} bias²", f"{block} variance"]
    rows = []
    for e in data["estimators"]:
        cells = [f"`{e['name']}`", "yes" if e["exact"] else "no (by design)"]
        cells.append(f"{e['forwards_per_example']:.1f}/{e['backwards_per_example']:.1f}")
        for block in BLOCKS:
            cells += row_cells(e, block)
        rows.append(cells)
    intro = (
        f"{data['seeds']} seeds per estimator. Shares of ||g_exact||²: {shares}. "
        f"KL(π‖q) = {summary['kl_pi_q']:.3f} nats; posterior mass outside the prior's "
        f"top 4: {summary['outside_top_k']:.3f}. bias² is noise-corrected "
        "(||ḡ − g||² − tr Σ̂ / S) and, like the variance (tr Σ̂), relative to ||g_block||²; "
        "[95% bootstrap interval over seeds]; — : a role the estimator does not train."
    )
    return intro + "\n\n" + table(header, rows)


def sweep_rows(data: dict, block: str, extra=None) -> tuple[list[str], list[list[str]]]:
    names = [e["name"] for e in data["points"][0]["estimators"]]
    header = [data["sweep"], *(extra[0] if extra else [])]
    header += [f"`{n}` bias² ({block})" for n in names] + [f"`{n}` passes" for n in names]
    rows = []
    for point in data["points"]:
        by_name = {e["name"]: e for e in point["estimators"]}
        cells = [number(point["value"]) if isinstance(point["value"], float) else
                 str(point["value"])]  # fmt: skip
        cells += extra[1](point) if extra else []
        vanishing = point["blocks"][block]["share"] < 1e-9  # the reference gradient is 0
        for name in names:
            numbers = by_name[name]["blocks"].get(block)
            if numbers is None:
                cells.append("—")
            else:
                cells.append("n/a (g = 0)" if vanishing else with_interval(numbers["bias"]))
        for name in names:
            e = by_name[name]
            cells.append(f"{e['forwards_per_example']:.1f}/{e['backwards_per_example']:.1f}")
        rows.append(cells)
    return header, rows


def sweep_table(name: str, block: str = "retriever", extra=None) -> str:
    data = load(name)
    header, rows = sweep_rows(data, block, extra)
    return f"{data['seeds']} seeds per point.\n\n" + table(header, rows)


def kl_column():
    return (["KL(π‖q)"], lambda point: [f"{point['summary']['kl_pi_q']:.2f}"])


def outside_column():
    return (["mass outside top k"], lambda point: [f"{point['summary']['outside_top_k']:.2f}"])


def latent_retrieval() -> str:
    path = RESULTS / "latent_retrieval" / "table.md"
    if not path.exists():
        return "(not measured yet: run `python benchmarks/latent_retrieval.py`)"
    text = path.read_text("utf-8").strip()
    return text.split("\n", 1)[1].strip() if text.startswith("# ") else text


def generated_blocks() -> dict[str, str]:
    return {
        "main": main_table(load("main")),
        "pool": sweep_table("pool", extra=outside_column()),
        "samples": sweep_table("samples"),
        "proposal": sweep_table("proposal", extra=kl_column()),
        "proposal-posterior": sweep_table("proposal", block="posterior", extra=kl_column()),
        "temperature": sweep_table("temperature"),
        "training": sweep_table("training"),
        "latent-retrieval": latent_retrieval(),
    }


def plot_sweeps() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("pool", "retriever", "candidate pool k (top-k of prior and posterior)", True),
        ("samples", "retriever", "proposals per example and step", True),
        ("proposal", "posterior", "proposal quality λ (q = λπ + (1−λ) random)", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    colours = {}  # one colour per estimator across the panels
    for ax, (name, block, xlabel, logx) in zip(axes, panels):
        data = load(name)
        names = [e["name"] for e in data["points"][0]["estimators"]]
        for estimator in names:
            xs, means, lows, highs = [], [], [], []
            for point in data["points"]:
                e = next(x for x in point["estimators"] if x["name"] == estimator)
                numbers = e["blocks"].get(block)
                if numbers is None or point["blocks"][block]["share"] < 1e-9:
                    continue
                mean, low, high = numbers["bias"]
                xs.append(point["value"])
                means.append(max(mean, 1e-5))
                lows.append(max(mean, 1e-5) - max(low, 1e-5))
                highs.append(max(high, 1e-5) - max(mean, 1e-5))
            if xs:
                colour = colours.setdefault(estimator, f"C{len(colours)}")
                ax.errorbar(
                    xs, means, yerr=[lows, highs], marker="o", capsize=3, label=estimator,
                    color=colour,
                )  # fmt: skip
        ax.set_yscale("log")
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{block}-block bias² / ||g||²  (95% CI)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "gradcheck_sweeps.png", dpi=100)
    plt.close(fig)


def render(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        start, end = f"<!-- generated:{name} -->\n", f"<!-- /generated:{name} -->"
        pattern = re.compile(f"({re.escape(start)})(?:.*?\n)?({re.escape(end)})", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no block `<!-- generated:{name} -->`")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the tables")
    args = parser.parse_args(argv)
    current = DOC.read_text("utf-8")
    wanted = render(current, generated_blocks())
    if args.check:
        if wanted != current:
            print(f"{DOC} is out of date: run python scripts/make_estimator_docs.py")
            return 1
        return 0
    DOC.write_text(wanted, "utf-8")
    plot_sweeps()
    print(f"wrote {DOC} and {IMAGES / 'gradcheck_sweeps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
