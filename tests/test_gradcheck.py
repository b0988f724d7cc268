"""gradcheck: the exact gradient, the per-seed comparison, the table and the config route."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.config import load_config
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch
from latentrag.experiments.gradcheck import (
    build_estimator,
    checked_parameters,
    compare,
    exact_gradient,
    exact_loss,
    format_table,
    run_gradcheck,
)
from latentrag.plugins.estimators.jsa import JsaConfig
from latentrag.plugins.estimators.jsa.estimator import JsaEstimator
from latentrag.plugins.estimators.topk import TopKConfig
from latentrag.plugins.estimators.topk.estimator import TopKEstimator, TopKTokenEstimator
from latentrag.plugins.estimators.vrag import VragConfig
from latentrag.plugins.estimators.vrag.estimator import VragEstimator
from latentrag.testing import toy_corpus, toy_examples
from latentrag.toy.components import TableGenerator, TableRetriever

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


def test_exact_gradient_matches_finite_differences():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:3])
    params = checked_parameters(pipeline)
    assert [p.shape for p in params] == [(12, 12), (12, 12, 12)]  # prior and generator only
    gradient = exact_gradient(pipeline, batch, T)
    largest = gradient.abs().topk(5).indices
    for flat_index in largest.tolist():
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


def test_compare_gives_one_finite_row_per_estimator():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:3])
    estimators = {
        "topk-corpus": TopKEstimator(TopKConfig(candidates="corpus")),
        "topk": TopKEstimator(TopKConfig(k=3)),
        "topk-token": TopKTokenEstimator(TopKConfig(k=3)),
        "vrag": VragEstimator(VragConfig(k=3)),
        "vrag-sampled": VragEstimator(VragConfig(k=3, sampled=True)),
        "jsa": JsaEstimator(JsaConfig(k=3)),
    }
    rows = {row.estimator: row for row in compare(pipeline, estimators, batch, range(4))}
    assert list(rows) == list(estimators)
    for row in rows.values():
        values = [row.cosine_mean, row.cosine_of_mean, row.relative_bias, row.variance]
        assert all(math.isfinite(v) for v in values)
        assert -1 <= row.cosine_mean <= 1 and row.variance >= 0
    exact = rows["topk-corpus"]
    assert exact.cosine_mean > 0.9999 and exact.relative_bias < 1e-4 and exact.variance == 0
    assert exact.forwards_per_example == 12
    assert rows["topk"].forwards_per_example == 3
    assert rows["vrag"].variance == 0  # deterministic: no sampling
    assert rows["vrag-sampled"].variance > 0 and rows["jsa"].variance > 0

    table = format_table(list(rows.values())).splitlines()
    assert len(table) == 2 + len(estimators)
    assert table[0].startswith("| estimator") and set(table[1]) <= {"|", "-"}
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_gradcheck_jsa_seeds_are_reproducible():
    pipeline, batch = table_pipeline(), Batch(toy_examples()[:2])
    estimator = JsaEstimator(JsaConfig(k=3))
    first = compare(pipeline, {"jsa": estimator}, batch, [0, 1])[0]
    again = compare(pipeline, {"jsa": estimator}, batch, [0, 1])[0]
    assert first == again


def test_run_gradcheck_from_the_example_config():
    config = load_config(EXAMPLE)
    assert build_estimator(config, "jsa").config.k == 4
    topk = build_estimator(config, "topk").config
    assert (topk.k, topk.candidates) == (4, "prior")  # shared k, own default candidates
    rows = run_gradcheck(config, ["topk", "vrag", "jsa"], seeds=2, examples=2)
    assert [r.estimator for r in rows] == ["topk", "vrag", "jsa"]
    for row in rows:
        assert math.isfinite(row.cosine_of_mean) and math.isfinite(row.variance)
        assert 0 < row.forwards_per_example <= 8
