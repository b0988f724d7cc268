"""The embedded demo (`latentrag demo`) on a tiny variant, and the frozen-generator
log-likelihood cache it relies on."""

from __future__ import annotations

import json
import os

import pytest
import torch

from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch
from latentrag.experiments.report import paired_difference
from latentrag.toy.corpus import toy_corpus, toy_examples
from latentrag.training.loglik_cache import LoglikCache, generator_identity

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(kind: str, name: str, **options):
    spec = default_registry().get(kind, name)
    return spec.build(spec.config_model.model_validate(options))


def tiny_pipeline(freeze: bool = True) -> Pipeline:
    generator = build("generator", "hf-causal-lm", model="tiny-llama", freeze=freeze)
    pipeline = Pipeline(toy_corpus(), build("retriever", "bow"), generator)
    pipeline.index()
    return pipeline


ROWS = torch.tensor([[0, 3, 5, 3], [2, 2, 7, 11], [4, 1, 0, 9]])
MASK = torch.tensor([[True, True, True, True], [True, True, True, False], [True] * 4])


@pytest.fixture(scope="module")
def frozen() -> Pipeline:
    return tiny_pipeline(freeze=True)


@pytest.fixture
def batch() -> Batch:
    return Batch(toy_examples()[:3])


# -- the log-likelihood cache ----------------------------------------------------------------


def cached(pipeline: Pipeline, cache: LoglikCache) -> Pipeline:
    """A pipeline sharing `pipeline`'s components, given `cache` (its own forward count)."""
    return Pipeline(pipeline.corpus, pipeline.retriever, pipeline.generator, loglik_cache=cache)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cached_logliks_equal_uncached_ones(frozen, batch, reduce, one_thread):
    plain = frozen.rows_loglik(batch, ROWS, reduce, mask=MASK)
    cache = LoglikCache()
    pipeline = cached(frozen, cache)
    cold = pipeline.rows_loglik(batch, ROWS, reduce, mask=MASK)
    forwards = pipeline.generator_forwards
    warm = pipeline.rows_loglik(batch, ROWS, reduce, mask=MASK)
    assert torch.equal(plain, cold) and torch.equal(plain, warm)
    assert cold.dtype == warm.dtype == plain.dtype
    assert forwards == 9 and pipeline.generator_forwards == forwards  # warm: nothing scored
    assert cache.misses == 9 and cache.hits == 9  # 9 distinct valid (example, row) pairs


def test_partly_cached_rows_score_only_the_new_pairs(frozen, batch, one_thread):
    plain = frozen.rows_loglik(batch, ROWS, mask=MASK)
    pipeline = cached(frozen, LoglikCache())
    pipeline.rows_loglik(batch, ROWS[:, :2])
    before = pipeline.generator_forwards
    mixed = pipeline.rows_loglik(batch, ROWS, mask=MASK)
    assert pipeline.generator_forwards - before == 9 - 5  # 5 pairs were scored first
    torch.testing.assert_close(mixed, plain)  # other batch-mates: equal up to rounding


def test_sum_and_mean_are_cached_apart(frozen, batch, one_thread):
    pipeline = cached(frozen, LoglikCache())
    total = pipeline.rows_loglik(batch, ROWS, "sum")
    mean = pipeline.rows_loglik(batch, ROWS, "mean")
    assert not torch.allclose(total, mean)


def test_a_trainable_generator_is_never_cached(batch, one_thread):
    trainable = tiny_pipeline(freeze=False)
    assert generator_identity(trainable.generator) is None
    cache = LoglikCache()
    trainable.loglik_cache = cache
    out = trainable.rows_loglik(batch, ROWS)
    again = trainable.rows_loglik(batch, ROWS)
    assert len(cache) == 0 and cache.misses == cache.hits == 0
    assert out.requires_grad and torch.equal(out, again)


def test_identity_names_the_generator_config(frozen):
    other = build("generator", "hf-causal-lm", model="tiny-llama", freeze=True, seed=1)
    assert generator_identity(frozen.generator) != generator_identity(other)
    assert '"model": "tiny-llama"' in generator_identity(frozen.generator)


def test_the_cache_file_round_trips_exactly(frozen, batch, tmp_path, one_thread):
    path = tmp_path / "sub" / "logliks.json"
    first = LoglikCache(path)
    written = cached(frozen, first).rows_loglik(batch, ROWS, mask=MASK)
    first.save()
    second = LoglikCache(path)
    reader = cached(frozen, second)
    read = reader.rows_loglik(batch, ROWS, mask=MASK)
    assert torch.equal(written, read) and len(second) == 9
    assert reader.generator_forwards == 0
    assert json.loads(path.read_text())["version"] == 1


def test_a_damaged_cache_file_is_a_latentrag_error(tmp_path):
    from latentrag.core.errors import LatentragError

    path = tmp_path / "logliks.json"
    path.write_text('{"values": [1, 2]')
    with pytest.raises(LatentragError, match="logliks.json: not a log-likelihood cache"):
        LoglikCache(path)


def test_only_the_pipeline_given_the_cache_consults_it(frozen, batch, one_thread):
    from latentrag.core.config import resolve

    cache = LoglikCache()
    data = {"retriever": {"name": "bow"}}
    data["generator"] = {"name": "hf-causal-lm", "model": "tiny-llama", "freeze": True}
    built = Pipeline.from_config(resolve(data), toy_corpus(), loglik_cache=cache)
    assert built.loglik_cache is cache
    frozen.rows_loglik(batch, ROWS)  # no cache given: no process-wide one is consulted
    assert len(cache) == 0 and frozen.loglik_cache is None
    built.rows_loglik(batch, ROWS)
    assert len(cache) == cache.misses == 10  # distinct (example, row) pairs of ROWS


# -- the demo --------------------------------------------------------------------------------

TINY_DEMO = """\
[data]
source = "toy"
[retriever]
name = "bow"
seed = 0
[posterior]
name = "bow"
seed = 1
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
freeze = true
[estimator]
name = "topk"
k = 4
[train]
steps = 2
batch_size = 4
lr = 0.05
[eval]
recall_at = [1, 5]
max_new_tokens = 3
"""


def test_run_demo_prints_the_table_and_a_verdict_from_the_numbers(tmp_path, one_thread):
    from latentrag.experiments.demo import run_demo

    config = tmp_path / "tiny.toml"
    config.write_text(TINY_DEMO)
    out, lines = tmp_path / "demo", []
    result = run_demo(
        out, config=config, qa_questions=4, echo=lines.append, seeds=2, controlled=None
    )
    printed = "\n".join(lines)

    assert "| estimator.name | seeds |" in printed
    for name in ("topk", "vrag", "jsa"):
        for seed in (0, 1):
            run = out / f"estimator.name={name}__seed={seed}"
            metrics = json.loads((run / "eval.json").read_text())
            assert {"recall@1", "recall@1 (before)", "f1", "f1 (before)"} <= set(metrics)
    # the verdict lines are the paired differences over the two seeds
    for first, second in (("jsa", "topk"), ("jsa", "vrag"), ("vrag", "topk")):
        diff = paired_difference(
            result.rows, "recall@1", {"estimator.name": first}, {"estimator.name": second}
        )
        assert diff.summary.count == 2 and diff.verdict() in printed
    assert f"{out / 'metrics.png'}" in printed
    assert (out / "logliks.json").exists() and (out / "answers.json").exists()

    # a second demo into the same folder skips the finished runs and prints the same table
    again: list[str] = []
    run_demo(out, config=config, qa_questions=4, echo=again.append, seeds=2, controlled=None)
    assert again[2:-1] == lines[2:-1]  # all but the header and the timing line


def row(name: str, seed: int, recall: float, f1: float, status: str = "done") -> dict:
    metrics = {"recall@1": recall, "recall@1 (before)": 0.5, "f1": f1, "f1 (before)": 0.1}
    assignment = {"estimator.name": name}
    return {"assignment": assignment, "seed": seed, "status": status, "metrics": metrics}


def test_the_verdict_comes_from_paired_intervals_and_says_when_there_is_no_difference():
    from latentrag.experiments.demo import verdict

    rows = [row("topk", s, 0.60 + 0.01 * s, 0.2 + 0.05 * (-1) ** s) for s in range(3)]
    rows += [row("jsa", s, 0.70 + 0.01 * s, 0.2 - 0.05 * (-1) ** s) for s in range(3)]
    text = verdict(rows)
    # recall@1: jsa - topk = +0.10 on every seed: an interval of zero width that excludes 0
    assert "jsa > topk on recall@1: yes, +0.1" in text
    # f1: -0.1, +0.1, -0.1: the interval holds 0
    assert "jsa > topk on f1: no difference beyond noise" in text
    assert "0.500 ± 0.000 -> 0.610 ± 0.025 (change +0.110 [+0.085, +0.135])" in text
    failed = [row("topk", 0, 0.6, 0.2), row("jsa", 1, 0.7, 0.3)]
    assert "jsa > topk on recall@1: cannot tell (no common seed)" in verdict(failed)


def test_the_controlled_part_trains_and_compares_and_reuses_its_runs(tmp_path, one_thread):
    from latentrag.experiments.demo import run_controlled
    from latentrag.experiments.latent_retrieval import Settings

    tiny = Settings(passages=40, steps=8, checkpoints=2, k=2, chain_questions=8)
    labels = ("topk", "jsa-corpus-persistent")
    result = run_controlled(tmp_path, seeds=2, settings=tiny, labels=labels, echo=lambda _: None)
    assert {r["assignment"]["estimator.name"] for r in result.rows} == set(labels)
    assert len(result.rows) == 4 and result.plot is not None and result.plot.exists()
    assert "jsa-corpus-persistent > topk on held-out recall@1: " in result.text
    saved = tmp_path / "controlled" / "runs.json"
    stamp = saved.stat().st_mtime_ns
    again = run_controlled(tmp_path, seeds=2, settings=tiny, labels=labels, echo=lambda _: None)
    assert saved.stat().st_mtime_ns == stamp and again.text == result.text  # reused


def test_answer_cache_generates_each_prompt_once(frozen, tmp_path, one_thread):
    from latentrag.experiments.demo import AnswerCache

    cache = AnswerCache(tmp_path / "answers.json")
    questions, passages = ["What is the capital of France?"] * 2, [["Paris."], ["Rome."]]
    first = cache.answers(frozen.generator, questions, passages, 3)
    assert cache.generated == 2
    assert cache.answers(frozen.generator, questions[:1], passages[:1], 3) == first[:1]
    assert cache.generated == 2
    cache.save()
    reread = AnswerCache(tmp_path / "answers.json")
    assert reread.answers(frozen.generator, questions, passages, 3) == first
    assert reread.generated == 0
    assert first == frozen.generator.generate(questions, passages, 3)
