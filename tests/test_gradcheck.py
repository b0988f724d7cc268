"""gradcheck: the reference per block, the statistics over seeds, the predicted trends of
bias, the estimator contract (one-line errors), and the command line."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from click.testing import CliRunner
from pydantic import Field

from latentrag import hookimpl
from latentrag.cli import main
from latentrag.core.config import StrictModel
from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Estimator, EstimatorOutput
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import Registry, default_registry
from latentrag.core.types import Batch
from latentrag.experiments.gradcheck import (
    Sweep,
    Training,
    _Moments,
    block_parameters,
    block_stats,
    checked_parameters,
    compare,
    exact_gradient,
    exact_loss,
    format_table,
    load_setup,
    reference_gradients,
    run_gradcheck,
)
from latentrag.experiments.gradcheck_report import to_json
from latentrag.testing import toy_corpus, toy_examples
from latentrag.toy.components import TableGenerator, TableRetriever
from latentrag.toy.keycode import KeycodeConfig, exact_posterior, keycode_pipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "gradcheck.toml"
T = 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


def table_pipeline() -> Pipeline:
    corpus, examples = toy_corpus(), toy_examples()
    pipeline = Pipeline(
        corpus,
        TableRetriever.from_examples(examples, corpus, seed=1, scale=0.1),
        TableGenerator.from_examples(examples, corpus, seed=3),
        TableRetriever.from_examples(examples, corpus, posterior=True, seed=2, scale=0.1),
    )
    pipeline.index()
    return pipeline


def estimator(name: str, **options) -> Estimator:
    spec = default_registry().get("estimator", name)
    return spec.build(spec.config_model.model_validate(options))


def small_config(tmp_path: Path, body: str = "", **benchmark) -> Path:
    """A gradcheck config over a 40-passage keycode benchmark."""
    fields = {"passages": 40, "questions": 4, **benchmark}
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path = tmp_path / "gradcheck.toml"
    path.write_text(
        "[benchmark]\n" + "\n".join(lines) + "\n\n[estimator]\nk = 4\ntemperature = 1.0\n"
        "samples = 4\n\n[gradcheck]\nseeds = 8\nresamples = 100\n" + textwrap.dedent(body)
    )
    return path


# -- the reference gradient ----------------------------------------------------------------


def test_exact_gradient_matches_finite_differences():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:3])
    params = checked_parameters(pipeline)
    assert [p.shape for p in params] == [(12, 12), (12, 12, 12)]  # prior and generator only
    gradient = exact_gradient(pipeline, batch, T)
    for flat_index in gradient.abs().topk(5).indices.tolist():
        param, index = _locate(params, flat_index)
        with torch.no_grad():
            param.view(-1)[index] += 1e-2
            up = exact_loss(pipeline, batch, T, "sum").item()
            param.view(-1)[index] -= 2e-2
            down = exact_loss(pipeline, batch, T, "sum").item()
            param.view(-1)[index] += 1e-2
        assert (up - down) / 2e-2 == pytest.approx(gradient[flat_index].item(), rel=2e-2)


def _locate(params, flat_index):
    for p in params:
        if flat_index < p.numel():
            return p, flat_index
        flat_index -= p.numel()
    raise IndexError(flat_index)


def test_reference_posterior_block_is_the_gradient_of_kl_pi_to_q():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:3])
    objective = estimator("jsa").objective()
    reference = reference_gradients(pipeline, batch, objective)
    assert list(reference) == ["retriever", "posterior", "generator"]
    # d/d score_h of -Σ π log softmax(score / T), averaged over the batch: (q - π) / (T B)
    pi = exact_posterior(pipeline, batch, objective.temperature)
    rows = torch.arange(12).expand(3, -1)
    q = torch.softmax(pipeline.posterior.score(pipeline.posterior_queries(batch), rows) / T, -1)
    expected = torch.zeros(12, 12, dtype=torch.double)
    expected[:3] = (q.detach().double() - pi) / (T * 3)  # the batch holds the table's first rows
    torch.testing.assert_close(reference["posterior"], expected.flatten(), atol=1e-5, rtol=1e-4)


# -- statistics over seeds -------------------------------------------------------------------


def test_moments_give_the_direct_bias_variance_and_cosine():
    torch.manual_seed(0)
    reference = torch.randn(30, dtype=torch.double)
    grads = reference + 0.3 + 0.5 * torch.randn(25, 30, dtype=torch.double)
    stats = block_stats(_Moments.of(grads, reference), share=0.5, resamples=300)
    mean = grads.mean(0)
    trace = grads.var(0, unbiased=True).sum()
    norm2 = reference @ reference
    corrected = ((mean - reference).pow(2).sum() - trace / 25) / norm2
    assert stats.bias.value == pytest.approx(float(corrected), rel=1e-9)
    assert stats.variance.value == pytest.approx(float(trace / norm2), rel=1e-9)
    cosine = torch.nn.functional.cosine_similarity(mean, reference, dim=0)
    assert stats.cosine.value == pytest.approx(float(cosine), rel=1e-9)
    for interval in (stats.bias, stats.variance, stats.cosine):
        assert interval.low < interval.value < interval.high
    # the true squared bias (0.09 per coordinate) lies in the interval
    true_bias = 0.09 * 30 / float(norm2)
    assert stats.bias.low < true_bias < stats.bias.high


def test_compare_reports_the_blocks_each_estimator_trains():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:3])
    estimators = {
        "topk-corpus": estimator("topk", candidates="corpus"),
        "topk": estimator("topk", k=3),
        "vrag": estimator("vrag", k=3),
        "vrag-sampled": estimator("vrag", k=3, sampled=True),
        "jsa": estimator("jsa", k=3),
        "pdist": estimator("pdist", k=3),
    }
    rows = {row.estimator: row for row in compare(pipeline, estimators, batch, range(4))}
    assert list(rows) == list(estimators)
    assert list(rows["topk"].blocks) == ["retriever", "generator"]
    assert list(rows["jsa"].blocks) == ["retriever", "posterior", "generator"]
    assert list(rows["pdist"].blocks) == ["retriever"] and not rows["pdist"].exact
    exact = rows["topk-corpus"]
    for stats in exact.blocks.values():
        assert stats.cosine.value > 0.9999 and abs(stats.bias.value) < 1e-8
        assert abs(stats.variance.value) < 1e-10
    assert exact.forwards_per_example == exact.backwards_per_example == 12
    assert rows["topk"].forwards_per_example == 3
    assert abs(rows["vrag"].blocks["generator"].variance.value) < 1e-10  # no sampling
    assert rows["vrag-sampled"].blocks["generator"].variance.value > 1e-3
    assert rows["jsa"].blocks["posterior"].variance.value > 1e-3
    assert rows["pdist"].backwards_per_example == 0  # the generator is read, not trained
    shares = [s.share for s in rows["jsa"].blocks.values()]
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0

    table = format_table(list(rows.values())).splitlines()
    assert len(table) == 2 + 2 + 2 + 3 + 3 + 3 + 1  # header, rule, a line per block
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_gradcheck_seeds_are_reproducible():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:2])
    jsa = estimator("jsa", k=3)
    first = compare(pipeline, {"jsa": jsa}, batch, [0, 1])[0]
    again = compare(pipeline, {"jsa": jsa}, batch, [0, 1])[0]
    assert first.blocks == again.blocks


# -- the predicted trends, on the key -> code benchmark ------------------------------------


def test_topk_bias_grows_with_the_posterior_mass_outside_the_top_k(tmp_path):
    setup = load_setup(small_config(tmp_path), ["gradcheck.seeds=1", "gradcheck.burn_in=0"])
    results = run_gradcheck(setup, ["topk"], Sweep("k", (8, 16, 24, 40)))
    outside = [r.summary.get("outside_top_k", 0.0) for r in results]
    bias = [r.rows[0].blocks["retriever"].bias.value for r in results]
    assert outside == sorted(outside, reverse=True) and outside[0] > 0.3
    assert bias == sorted(bias, reverse=True), (outside, bias)
    assert bias[0] > 0.2 and abs(bias[-1]) < 1e-9  # k = N: the exact gradient


def test_jsa_bias_falls_toward_zero_with_chain_length_over_the_corpus(tmp_path):
    body = '\n[estimators.jsa-corpus]\nname = "jsa"\ncandidates = "corpus"\nchain = "fresh"\n'
    setup = load_setup(small_config(tmp_path, body), ["gradcheck.seeds=60"])
    results = run_gradcheck(setup, ["jsa-corpus"], Sweep("samples", (1, 4, 32)))
    bias = [r.rows[0].blocks["retriever"].bias for r in results]
    assert bias[0].low > bias[1].high and bias[1].low > bias[2].high  # separated intervals
    assert bias[0].value > 0.1 and abs(bias[2].value) < 0.01 and bias[2].low < 0
    cost = [r.rows[0].forwards_per_example for r in results]
    assert cost == sorted(cost)


def test_vrag_bias_falls_as_the_proposal_approaches_the_posterior(tmp_path):
    body = '\n[estimators.vrag-corpus]\nname = "vrag"\ncandidates = "corpus"\n'
    setup = load_setup(small_config(tmp_path, body), ["gradcheck.seeds=1"])
    results = run_gradcheck(setup, ["vrag-corpus"], Sweep("proposal", (0.0, 0.4, 0.8, 1.0)))
    kl = [r.summary["kl_pi_q"] for r in results]
    assert kl == sorted(kl, reverse=True) and kl[-1] < 1e-6
    for block in ("retriever", "generator"):
        bias = [r.rows[0].blocks[block].bias.value for r in results]
        assert bias == sorted(bias, reverse=True), (block, bias)
        assert bias[0] > 0.05 and abs(bias[-1]) < 1e-6


def test_keycode_generator_needs_the_gold_passage():
    config = KeycodeConfig(passages=60, questions=5)
    pipeline, batch = keycode_pipeline(config)
    cand = pipeline.candidates(batch, "corpus", 60)
    loglik = pipeline.loglik(batch, cand).detach()
    gold = torch.tensor([pipeline.corpus.index_of(e.gold_ids[0]) for e in batch.examples])
    gold_ll = loglik.gather(1, gold[:, None]).squeeze(1)
    others = loglik.scatter(1, gold[:, None], float("-inf")).max(-1).values
    assert bool((gold_ll > -1.0).all()) and bool((gold_ll - others > 1.0).all())
    assert bool((others > -3.0).all())  # a distractor: half the code right
    assert float(loglik.median()) < -6.0


def test_keycode_config_is_validated():
    with pytest.raises(ValueError, match="passages needed"):
        KeycodeConfig(passages=10, questions=8)
    with pytest.raises(ValueError, match="extra"):
        KeycodeConfig(pasages=10)


# -- the shipped config and the command line ------------------------------------------------


def test_example_config_gives_the_retriever_a_real_share_via_json():
    result = CliRunner().invoke(
        main,
        ["gradcheck", str(EXAMPLE), "--json", "--seeds", "3", "--estimators", "topk,jsa"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["blocks"]["retriever"]["share"] >= 0.10
    assert sum(b["share"] for b in data["blocks"].values()) == pytest.approx(1.0)
    topk = next(e for e in data["estimators"] if e["name"] == "topk")
    assert topk["blocks"]["retriever"]["bias"][0] > 0.1  # k = 4 of 100: visibly biased
    assert "posterior" not in topk["blocks"]
    jsa = next(e for e in data["estimators"] if e["name"] == "jsa")
    assert set(jsa["blocks"]) == {"retriever", "posterior", "generator"}


def test_example_config_names_only_registered_estimators():
    setup = load_setup(EXAMPLE)
    for label in setup.labels():
        setup.build_estimator(label)
    assert setup.settings.seeds >= 200


def test_cli_table_for_topk_and_the_emdr2_plugin():
    pytest.importorskip("latentrag_emdr2")
    result = CliRunner().invoke(
        main, ["gradcheck", str(EXAMPLE), "--estimators", "topk,emdr2", "--seeds", "2"]
    )
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    lines = result.output.splitlines()
    emdr2 = next(i for i, line in enumerate(lines) if line.startswith("| emdr2"))
    assert "| retriever" in lines[emdr2] and "| generator" in lines[emdr2 + 1]


class NoTemperatureConfig(StrictModel):
    k: int = Field(4, ge=1)


class NoTemperature(Estimator):
    """Top-K without a temperature key: gradcheck cannot know its objective."""

    trains = ("retriever",)

    def __init__(self, config: NoTemperatureConfig) -> None:
        self.config = config

    def loss(self, batch, model):
        cand = model.candidates(batch, "prior", self.config.k)
        return EstimatorOutput(loss=-model.prior_logprobs(batch, cand).sum())


class NoTemperaturePlugin:
    @hookimpl
    def register_components(self, register):
        register("estimator", "no-temperature", NoTemperature, NoTemperatureConfig)


def test_estimator_without_a_temperature_is_a_one_line_error(tmp_path):
    registry = Registry().load(entry_points=False)
    with registry.registered(NoTemperaturePlugin(), "test-no-temperature"):
        setup = load_setup(small_config(tmp_path), registry=registry)
        with pytest.raises(ConfigError) as error:
            run_gradcheck(setup, ["topk", "no-temperature"])
    message = str(error.value)
    assert "'no-temperature'" in message and "temperature" in message
    assert len(message.splitlines()) == 1


def test_cli_estimator_without_a_temperature_exits_2_with_one_line(tmp_path):
    with default_registry().registered(NoTemperaturePlugin(), "test-no-temperature-cli"):
        result = CliRunner().invoke(
            main, ["gradcheck", str(small_config(tmp_path)), "--estimators", "no-temperature"]
        )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: gradcheck: estimator 'no-temperature'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "benchmark.pasages=50"], "benchmark.pasages: unknown key"),
        (["--set", "estimator.k=0"], "estimator.k: Input should be greater"),
        (["--estimators", "topkk"], "unknown estimator 'topkk'; did you mean 'topk'"),
        (["--sweep", "kk=1,2"], "--sweep 'kk': not a benchmark key"),
        (["--sweep", "k"], "expected KEY=V1,V2"),
        (["--estimators", "gumbel"], "cannot run on this pipeline"),
        (["--seeds", "0"], "--seeds: Input should be greater"),
        (["--train", "5", "--sweep", "k=2,4"], "cannot be combined"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    result = CliRunner().invoke(main, ["gradcheck", str(small_config(tmp_path)), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and fragment in result.output


def test_cli_sweep_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "gc.png"
    args = ["--estimators", "topk,jsa", "--sweep", "samples=1,8", "--json", "--plot", str(plot)]
    result = CliRunner().invoke(main, ["gradcheck", str(small_config(tmp_path)), *args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sweep"] == "samples" and [p["value"] for p in data["points"]] == [1, 8]
    jsa = [next(e for e in p["estimators"] if e["name"] == "jsa") for p in data["points"]]
    assert jsa[1]["forwards_per_example"] > jsa[0]["forwards_per_example"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measuring_along_a_training_run_carries_the_chain_state(tmp_path):
    setup = load_setup(small_config(tmp_path), ["gradcheck.seeds=4"])
    results = run_gradcheck(setup, ["topk", "jsa"], training=Training(steps=20, snapshots=2))
    assert [(r.key, r.value) for r in results] == [("step", 0), ("step", 20)]
    before, after = (r.summary for r in results)
    assert after["kl_pi_q"] != before["kl_pi_q"]  # JSA trained the posterior too
    assert after["prior_recall_at_1"] >= before["prior_recall_at_1"]
    report = to_json(results)
    assert [p["value"] for p in report["points"]] == [0, 20]


def test_carried_state_replaces_the_burn_in(tmp_path):
    setup = load_setup(small_config(tmp_path))
    pipeline, batch = setup.pipeline(1.0)
    jsa = estimator("jsa", k=4, temperature=1.0, candidates="corpus")
    chain = {"cache": {e.id: e.gold_ids[0] for e in batch.examples}}  # chains at the gold
    fresh = compare(pipeline, {"jsa": jsa}, batch, range(8), burn_in=0)[0]
    carried = compare(pipeline, {"jsa": jsa}, batch, range(8), 0, 100, {"jsa": chain})[0]
    assert fresh.blocks["retriever"].bias != carried.blocks["retriever"].bias


def test_block_parameters_count_a_shared_component_once():
    corpus, examples = toy_corpus(), toy_examples()
    retriever = TableRetriever.from_examples(examples, corpus)
    pipeline = Pipeline(corpus, retriever, TableGenerator.from_examples(examples, corpus))
    pipeline.posterior = retriever
    assert list(block_parameters(pipeline)) == ["retriever", "generator"]


def test_pipeline_config_route(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        textwrap.dedent("""\
            [data]
            source = "toy"
            [retriever]
            name = "bow"
            [generator]
            name = "hf-causal-lm"
            model = "tiny-llama"
            [estimator]
            name = "topk"
            k = 3
            """)
    )
    setup = load_setup(config, ["estimator.temperature=1.0"])
    setup.settings = setup.settings.model_copy(update={"seeds": 2, "burn_in": 0, "examples": 2})
    [result] = run_gradcheck(setup, ["topk"])
    row = result.rows[0]
    assert row.forwards_per_example == 3 and math.isfinite(row.cosine_of_mean)
    assert set(result.shares) == {"retriever", "generator"}
