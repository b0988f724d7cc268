"""The `latentrag` command line.

Heavy modules (torch, transformers, faiss) are imported inside the commands that need
them, so `latentrag --help`, `components` and `config validate` start fast.

Exit status: 0 ok; 1 a runtime failure (`TrainingError`: a non-finite loss, a checkpoint
that does not fit; a sweep cell or demo run that failed); 2 bad input (a config, data file
or option a user can fix: `LatentragError`, click's usage errors). Errors print one line
per problem on stderr. With `--json` a command prints exactly one JSON document on stdout;
tables, progress bars and warnings go elsewhere (stderr) or nowhere.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from latentrag import __version__
from latentrag.core.errors import LatentragError

EXIT_FAILURE = 1
EXIT_USAGE = 2

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set estimator.samples=4 (repeatable).",
)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead."
)


def _echo_json(document: Any) -> None:
    """One JSON document on stdout (paths and other objects as strings)."""
    click.echo(json.dumps(document, indent=2, default=str))


def _exit_code(exc: LatentragError) -> int:
    """1 when the input was fine but the work failed (training), else 2 (bad input)."""
    from latentrag.training.errors import TrainingError  # light: no torch

    return EXIT_FAILURE if isinstance(exc, TrainingError) else EXIT_USAGE


class LatentragGroup(click.Group):
    """A click group that turns latentrag's errors into one line per problem on stderr and
    exit code 1 (runtime failure) or 2 (bad input)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LatentragError as exc:
            for line in str(exc).splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(_exit_code(exc))
        except FileNotFoundError as exc:
            click.echo(f"error: {exc.filename}: no such file", err=True)
            sys.exit(EXIT_USAGE)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@click.group(cls=LatentragGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="latentrag")
def main() -> None:
    """latentrag: retrieval-augmented generation with the passage as a latent variable.

    Exit status: 0 ok, 1 a run failed, 2 bad input. Shell completion (bash; zsh_source
    and fish_source for the other shells):

    \b
        eval "$(_LATENTRAG_COMPLETE=bash_source latentrag)"
    """
    warnings.formatwarning = _one_line_warning
    # transformers' "Loading weights" bars, one per model load, would bury ours
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _load(config_file: str, overrides: tuple[str, ...]):
    from latentrag.core.config import load_config

    return load_config(config_file, list(overrides))


# -- components and plugins -----------------------------------------------------------


@main.command()
@json_option
def components(as_json: bool) -> None:
    """List every available component: kind, name, plugin, description."""
    from latentrag.core.registry import catalogue
    from latentrag.experiments.tables import format_table

    specs, broken = catalogue()
    rows = [
        {"kind": s.kind, "name": s.name, "plugin": s.plugin, "description": s.description}
        for s in specs
    ]
    if as_json:
        _echo_json(rows)
    else:
        click.echo(format_table(rows, markdown=False))
    for info in broken:
        click.echo(f"warning: plugin {info.name!r} failed to load: {info.error}", err=True)


@main.command()
@json_option
def plugins(as_json: bool) -> None:
    """List loaded plugins with their version, components, and load errors."""
    from latentrag.core.registry import default_registry
    from latentrag.experiments.tables import format_table

    infos = default_registry().plugins()
    if as_json:
        _echo_json([_plugin_json(info) for info in infos])
        return
    rows = []
    for info in infos:
        names = ", ".join(f"{kind}:{name}" for kind, name in info.components)
        status = f"FAILED: {info.error}" if info.error else names
        rows.append(
            {"plugin": info.name, "source": info.source, "version": info.version, "": status}
        )
    click.echo(format_table(rows, markdown=False))


def _plugin_json(info) -> dict[str, Any]:
    components = [{"kind": kind, "name": name} for kind, name in info.components]
    return {
        "plugin": info.name,
        "source": info.source,
        "version": info.version,
        "components": components,
        "error": info.error or None,
    }


# -- configs --------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check and show pipeline configs."""


@config.command("validate")
@click.argument("config_file", type=click.Path(dir_okay=False))
@set_option
def config_validate(config_file: str, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG_FILE without building anything; report every problem."""
    resolved = _load(config_file, overrides)
    _check_estimator_k(resolved, config_file)
    roles = ", ".join(f"{role}={spec.name}" for role, (spec, _) in resolved.components.items())
    click.echo(f"{config_file}: ok ({roles})")


def _corpus_size(data, base: Path) -> int | None:
    """Passages in the config's corpus, counted as lines without parsing them (no torch);
    None when the corpus cannot be read (the commands that load it say why)."""
    if data.source == "toy":
        from latentrag.toy.corpus import toy_corpus

        return len(toy_corpus())
    if data.source == "squad-slice":
        from latentrag.data import squad_slice_dir

        path = squad_slice_dir() / "passages.jsonl"
    else:
        from latentrag.data.dataset import corpus_file

        path = corpus_file(data, base)
        if path is None:
            return None
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return None


def _check_estimator_k(resolved, config_file: str) -> None:
    """An estimator that draws `k` candidates per retriever needs a corpus of at least k."""
    from latentrag.core.errors import ConfigError

    component = resolved.component("estimator")
    k = getattr(component[1], "k", None) if component else None
    if not isinstance(k, int) or getattr(component[1], "candidates", None) == "corpus":
        return
    if "k" not in component[1].model_fields_set:  # a default k is clipped to the corpus
        return
    size = _corpus_size(resolved.pipeline.data, Path(config_file).parent)
    if size is not None and k > size:
        raise ConfigError(
            f"{config_file}: estimator.k: {k} is larger than the corpus ({size} passages)"
        )


@config.command("show")
@click.argument("config_file", type=click.Path(dir_okay=False))
@set_option
@json_option
def config_show(config_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved config with every default filled in, as TOML (or JSON)."""
    from latentrag.io.toml_writer import dumps

    data = _load(config_file, overrides).to_dict()
    if as_json:
        _echo_json(data)
    else:
        click.echo(dumps(data), nl=False)



# -- building, evaluating, training -----------------------------------------------------


def _setup(config_file: str, overrides: tuple[str, ...]):
    """Resolve the config, read its data and build the pipeline (indexing the corpus)."""
    from latentrag.core.pipeline import Pipeline
    from latentrag.data.dataset import load_dataset

    resolved = _load(config_file, overrides)
    dataset = load_dataset(resolved.pipeline.data, base=Path(config_file).parent)
    return resolved, dataset, Pipeline.from_config(resolved, dataset.corpus)


@main.group()
def index() -> None:
    """Build retrieval indexes."""


@index.command("build")
@click.argument("config_file", type=click.Path(dir_okay=False))
@set_option
def index_build(config_file: str, overrides: tuple[str, ...]) -> None:
    """(Re)build the indexes of the config's retriever and posterior from scratch, replacing
    any saved (or stale) index in their `index_dir`."""
    from latentrag.core.pipeline import Pipeline
    from latentrag.data.dataset import load_dataset

    resolved = _load(config_file, overrides)
    dataset = load_dataset(resolved.pipeline.data, base=Path(config_file).parent)
    pipeline = Pipeline.from_config(resolved, dataset.corpus, index=False)
    built = set()
    for role, retriever in (("retriever", pipeline.retriever), ("posterior", pipeline.posterior)):
        if retriever is None or id(retriever) in built:
            continue
        built.add(id(retriever))
        retriever.build(dataset.corpus)
        spec, settings = resolved.components[role]
        where = getattr(settings, "index_dir", None) or "memory only: set index_dir to keep it"
        click.echo(f"{role} {spec.name}: indexed {len(dataset.corpus)} passages ({where})")


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False), required=False)
@click.option("--split", default="dev", show_default=True, help="Which questions to use.")
@click.option("--qa", is_flag=True, help="Also generate answers and report EM/F1.")
@click.option("--limit", type=int, default=None, help="Use only the first N questions.")
@set_option
@json_option
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Evaluate a trained run folder instead of CONFIG_FILE (its config, data and last "
    "checkpoint; answers too when it has a generator, as the run did).",
)
@click.option(
    "--trec-run",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write each question's ranking to this file in TREC run format.",
)
@click.option(
    "--trec-depth",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Passages per question in the TREC run (at most the corpus or candidate list).",
)
@click.option("--verbose", is_flag=True, help="Log the fields the data readers ignored.")
def evaluate(
    config_file: str | None,
    split: str,
    qa: bool,
    limit: int | None,
    overrides: tuple[str, ...],
    as_json: bool,
    run_dir: str | None,
    trec_run: str | None,
    trec_depth: int,
    verbose: bool,
) -> None:
    """Recall@k and MRR@10 of the retriever against gold passages (EM/F1 with --qa).

    With --run RUN: the trained pipeline of a run folder, measured as the run measured it;
    on the dev split this reproduces the metrics after training in RUN/eval.json."""
    if run_dir is not None or config_file is None:
        _evaluate_run(run_dir, config_file, split, limit, overrides, as_json)
        return
    import logging
    from functools import partial

    from latentrag.evaluation.measure import RETRIEVAL_METRICS, measure, metric_legend
    from latentrag.experiments.tables import format_table

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    resolved, dataset, pipeline = _setup(config_file, overrides)
    examples = dataset.split(split, limit)
    if qa and pipeline.generator is None:
        raise LatentragError(f"{config_file}: --qa needs a [generator] section")
    if qa:
        dataset.require_answers(split)
    measure_it = partial(measure, pipeline, examples, resolved.pipeline.eval, qa=qa, progress=True)
    if trec_run is None:
        metrics = measure_it()
    else:
        metrics = _measure_to_trec(measure_it, trec_run, trec_depth)
    if not any(k.split("@")[0] in RETRIEVAL_METRICS for k in metrics) and not qa:
        raise LatentragError(
            f"{config_file}: split {split!r}: no question has gold_ids to measure retrieval "
            "against; use --qa for EM/F1"
        )
    roles = [r for r in ("retriever", "reranker") if r in resolved.components]
    names = [resolved.components[r][0].name for r in roles]
    row = {"retrieval": " > ".join(names), "split": split}
    row.update({"questions": len(examples), **metrics})
    if as_json:
        _echo_json(row)
    else:
        click.echo(format_table([row]))
        click.echo(metric_legend(metrics))


def _measure_to_trec(measure_it, path: str, depth: int) -> dict[str, float]:
    """`measure_it` (a bound `measure`) writing every question's ranking to a TREC run."""
    from latentrag.evaluation.trec import TrecRunWriter
    from latentrag.io.atomic import atomic_file

    with atomic_file(path) as handle:
        writer = TrecRunWriter(handle)
        metrics = measure_it(depth=depth, on_ranking=writer)
    click.echo(f"TREC run: {path} ({writer.questions} questions)", err=True)
    return metrics


# -- using a trained run -------------------------------------------------------------------


def _open_run(run_dir: str):
    """The run folder's trained pipeline, config and data (`experiments.loading`)."""
    from latentrag.experiments.loading import open_run

    return open_run(run_dir)


def _evaluate_run(
    run_dir: str | None,
    config_file: str | None,
    split: str,
    limit: int | None,
    overrides: tuple[str, ...],
    as_json: bool,
) -> None:
    """`evaluate --run RUN`: the run's metrics now, compared with its eval.json."""
    from latentrag.experiments.loading import evaluate_run, run_metrics_after
    from latentrag.experiments.tables import format_table

    if run_dir is None:
        raise click.UsageError("missing CONFIG_FILE (or --run RUN)")
    if config_file is not None or overrides:
        raise click.UsageError("--run RUN takes no CONFIG_FILE nor --set: the run has its config")
    run = _open_run(run_dir)
    metrics = evaluate_run(run, split, limit)
    row = {"run": run_dir, "step": run.step, "split": split}
    row.update({"questions": len(run.split(split, limit)), **metrics})
    saved = run_metrics_after(run.path) if split == "dev" and limit is None else None
    same = None if saved is None else saved == metrics
    if as_json:
        _echo_json({**row, "matches_eval_json": same})
        return
    click.echo(format_table([row]))
    if same is not None:
        note = "the same as" if same else "different from"
        click.echo(f"{note} the metrics after training in {run.path / 'eval.json'}", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("question")
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=None,
    help="Passages to retrieve and read [default: the run's eval.passages].",
)
@json_option
def ask(run_dir: str, question: str, k: int | None, as_json: bool) -> None:
    """Answer QUESTION with the trained pipeline of RUN_DIR; show the passages it read
    (ids and scores, best first)."""
    answer = _open_run(run_dir).pipeline.answer(question, k)
    if as_json:
        _echo_json(answer.to_json())
        return
    if answer.text is not None:
        click.echo(f"answer: {answer.text.strip()}")
    for rank, passage in enumerate(answer.passages, start=1):
        text = passage.text if len(passage.text) <= 100 else passage.text[:97] + "..."
        click.echo(f"{rank}. [{passage.id}] {passage.score:.4g}  {text}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="Which questions to answer.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), required=True)
@click.option(
    "--limit", type=int, default=None, help="Only the first N questions [default: data.max_eval]."
)
@click.option(
    "--k",
    "depth",
    type=click.IntRange(min=1),
    default=None,
    help="Passages listed per question [default: enough for every recall@k and MRR@10].",
)
@json_option
def predict(
    run_dir: str, split: str, out_file: str, limit: int | None, depth: int | None, as_json: bool
) -> None:
    """Answer every question of SPLIT with the trained pipeline of RUN_DIR; write one JSON
    line per question to OUT (retrieved passage ids and scores, the answer, EM/F1/sub-EM)."""
    from latentrag.experiments.predict import predict_examples, summarize, write_predictions
    from latentrag.experiments.tables import format_table

    run = _open_run(run_dir)
    examples = run.split(split, limit)
    records = predict_examples(run.pipeline, examples, run.config.pipeline.eval, depth)
    write_predictions(Path(out_file), records)
    row = {"split": split, "questions": len(records), **summarize(records)}
    if as_json:
        _echo_json({"out": out_file, **row})
        return
    click.echo(format_table([row]))
    click.echo(f"predictions: {out_file}")


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--to",
    "kind",
    type=click.Choice(["sentence-transformers", "peft", "faiss"]),
    required=True,
    help="sentence-transformers: the retriever's query encoder; peft: the generator's LoRA "
    "adapter; faiss: the retriever's index of trained passage vectors, with the ids.",
)
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--role",
    type=click.Choice(["retriever", "posterior"]),
    default="retriever",
    show_default=True,
    help="The retriever to export (sentence-transformers, faiss).",
)
def export_run(run_dir: str, kind: str, out: str, role: str) -> None:
    """Write what RUN_DIR trained to OUT in a format other tools load (a new folder)."""
    from latentrag.experiments.export import check_out, export

    check_out(out)  # before the minutes a large run takes to load
    click.echo(f"{kind}: {export(_open_run(run_dir).pipeline, kind, out, role)}")


# -- training ------------------------------------------------------------------------------


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--resume", is_flag=True, help="Continue from the last good checkpoint in OUT.")
@set_option
def train(config_file: str, out_dir: str, resume: bool, overrides: tuple[str, ...]) -> None:
    """Train the pipeline end to end with its estimator; results go to OUT."""
    from latentrag.experiments.runs import train_run
    from latentrag.experiments.tables import format_table

    metrics = train_run(_load(config_file, overrides), Path(config_file), Path(out_dir), resume)
    if metrics:  # under torchrun, ranks other than 0 have none to print
        click.echo(format_table([metrics]))


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--estimators",
    default=None,
    help="Comma-separated labels ([estimators.<label>]) or registry names to compare "
    "(default: the config's [gradcheck] estimators, else topk,topk-token,vrag,jsa).",
)
@click.option("--seeds", type=int, default=None, help="Seeds per estimator [config: 16].")
@click.option("--examples", type=int, default=None, help="Questions in the batch.")
@click.option("--burn-in", type=int, default=None, help="Update-free steps before measuring.")
@click.option(
    "--sweep",
    default=None,
    metavar="KEY=V1,V2",
    help="Measure at each value of a benchmark key (proposal, prior_gold...), an estimator "
    "key (k, temperature, samples, candidates, chain...) or burn_in.",
)
@click.option("--train", "train_steps", type=int, default=0, help="Measure along N train steps.")
@click.option("--snapshots", type=int, default=3, show_default=True, help="States with --train.")
@click.option("--train-estimator", default=None, help="Estimator that trains (with --train).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write bias² and variance against passes per example (PNG).",
)
@set_option
def gradcheck(
    config_file: str,
    estimators: str | None,
    seeds: int | None,
    examples: int | None,
    burn_in: int | None,
    sweep: str | None,
    train_steps: int,
    snapshots: int,
    train_estimator: str | None,
    as_json: bool,
    plot_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Compare each estimator's gradient with the exact one, block by block, on a corpus
    small enough to sum over (a [benchmark] config, or a pipeline config and its data)."""
    import json

    from latentrag.experiments import gradcheck_report as report
    from latentrag.experiments.gradcheck import Sweep, Training, load_setup, run_gradcheck

    setup = load_setup(config_file, overrides)
    setup.override(seeds=seeds, examples=examples, burn_in=burn_in)
    names = [n.strip() for n in estimators.split(",") if n.strip()] if estimators else None
    training = Training(train_steps, snapshots, train_estimator) if train_steps else None
    results = run_gradcheck(setup, names, Sweep.parse(sweep) if sweep else None, training)
    if as_json:
        click.echo(json.dumps(report.to_json(results, setup.settings.seeds), indent=2))
    else:
        click.echo(report.format_results(results))
    if plot_path:
        report.plot(results, plot_path)
        click.echo(f"plot: {plot_path}", err=as_json)


# -- ablations ----------------------------------------------------------------------------


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--grid",
    multiple=True,
    metavar="KEY=V1,V2",
    help="A config key and the values to sweep, e.g. estimator.name=topk,vrag,jsa (repeatable).",
)
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per grid cell.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--shard", default=None, metavar="I/N", help="Run only shard I of N (0-based).")
@set_option
@json_option
def sweep(
    config_file: str,
    grid: tuple[str, ...],
    seeds: int,
    out_dir: str,
    shard: str | None,
    overrides: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run a grid of training runs (finished cells are skipped), then print the report.
    Exits with status 1, naming them, when any cell failed."""
    from latentrag.experiments.report import write_report
    from latentrag.experiments.sweep import parse_shard, run_sweep

    results = run_sweep(
        Path(config_file),
        list(grid),
        seeds,
        Path(out_dir),
        overrides=list(overrides),
        shard=parse_shard(shard) if shard else None,
    )
    failed = [r for r in results if r.status == "failed"]
    report = write_report(Path(out_dir))
    if as_json:
        cells = [
            {"name": r.name, "status": r.status, "error": r.error or None, "seconds": r.seconds}
            for r in results
        ]
        _echo_json({"cells": cells, "report": _report_json(report)})
    else:
        _echo_report(report)
    for r in failed:
        click.echo(f"failed: {r.name}: {r.error}", err=True)
    if failed:
        click.echo(f"error: {len(failed)} of {len(results)} runs failed", err=True)
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("sweep_dir", type=click.Path(file_okay=False, exists=True))
@json_option
def report(sweep_dir: str, as_json: bool) -> None:
    """Collect a sweep folder (shards merged) into results.csv, a table and plots."""
    from latentrag.experiments.report import write_report

    result = write_report(Path(sweep_dir))
    if as_json:
        _echo_json(_report_json(result))
    else:
        _echo_report(result)


def _echo_report(result) -> None:
    click.echo(result.markdown)
    click.echo(f"results: {result.csv_path}")
    for plot in result.plots:
        click.echo(f"plot: {plot}")


def _report_json(result) -> dict[str, Any]:
    """A sweep report as JSON: one row per run (assignment, seed, status, metrics, error)
    and the files written."""
    return {
        "runs": result.rows,
        "csv": str(result.csv_path),
        "markdown": str(result.markdown_path),
        "plots": [str(plot) for plot in result.plots],
    }



@main.command()
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True
)
def demo(out_dir: str) -> None:
    """The embedded demo: a sweep of estimators on the shipped SQuAD slice, then its report."""
    from latentrag.experiments.demo import run_demo

    run_demo(Path(out_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
