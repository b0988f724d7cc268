"""The embedded demo (`latentrag demo`) on a tiny variant, and the frozen-generator
log-likelihood cache it relies on."""

from __future__ import annotations

import json
import os

import pytest
import torch

from latentrag.core.loglik_cache import LoglikCache, generator_identity, use_cache
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch
from latentrag.testing.toy import toy_corpus, toy_examples

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


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cached_logliks_equal_uncached_ones(frozen, batch, reduce, one_thread):
    plain = frozen.rows_loglik(batch, ROWS, reduce, mask=MASK)
    cache = LoglikCache()
    with use_cache(cache):
        cold = frozen.rows_loglik(batch, ROWS, reduce, mask=MASK)
        forwards = frozen.generator_forwards
        warm = frozen.rows_loglik(batch, ROWS, reduce, mask=MASK)
    assert torch.equal(plain, cold) and torch.equal(plain, warm)
    assert cold.dtype == warm.dtype == plain.dtype
    assert frozen.generator_forwards == forwards  # the warm call scored nothing
    assert cache.misses == 9 and cache.hits == 9  # 9 distinct valid (example, row) pairs


def test_partly_cached_rows_score_only_the_new_pairs(frozen, batch, one_thread):
    plain = frozen.rows_loglik(batch, ROWS, mask=MASK)
    cache = LoglikCache()
    with use_cache(cache):
        frozen.rows_loglik(batch, ROWS[:, :2])
        before = frozen.generator_forwards
        mixed = frozen.rows_loglik(batch, ROWS, mask=MASK)
    assert frozen.generator_forwards - before == 9 - 5  # 5 pairs were scored first
    torch.testing.assert_close(mixed, plain)  # other batch-mates: equal up to rounding


def test_sum_and_mean_are_cached_apart(frozen, batch, one_thread):
    with use_cache(LoglikCache()):
        total = frozen.rows_loglik(batch, ROWS, "sum")
        mean = frozen.rows_loglik(batch, ROWS, "mean")
    assert not torch.allclose(total, mean)


def test_a_trainable_generator_is_never_cached(batch, one_thread):
    trainable = tiny_pipeline(freeze=False)
    assert generator_identity(trainable.generator) is None
    cache = LoglikCache()
    with use_cache(cache):
        out = trainable.rows_loglik(batch, ROWS)
    assert len(cache) == 0 and out.requires_grad


def test_identity_names_the_generator_config(frozen):
    other = build("generator", "hf-causal-lm", model="tiny-llama", freeze=True, seed=1)
    assert generator_identity(frozen.generator) != generator_identity(other)
    assert '"model": "tiny-llama"' in generator_identity(frozen.generator)


def test_the_cache_file_round_trips_exactly(frozen, batch, tmp_path, one_thread):
    path = tmp_path / "sub" / "logliks.json"
    first = LoglikCache(path)
    with use_cache(first):
        written = frozen.rows_loglik(batch, ROWS, mask=MASK)
    first.save()
    second = LoglikCache(path)
    forwards = frozen.generator_forwards
    with use_cache(second):
        read = frozen.rows_loglik(batch, ROWS, mask=MASK)
    assert torch.equal(written, read) and len(second) == 9
    assert frozen.generator_forwards == forwards
    assert json.loads(path.read_text())["version"] == 1


def test_a_damaged_cache_file_is_a_latentrag_error(tmp_path):
    from latentrag.core.errors import LatentragError

    path = tmp_path / "logliks.json"
    path.write_text('{"values": [1, 2]')
    with pytest.raises(LatentragError, match="logliks.json: not a log-likelihood cache"):
        LoglikCache(path)


def test_use_cache_restores_the_previous_cache():
    from latentrag.core.loglik_cache import active_cache

    outer, inner = LoglikCache(), LoglikCache()
    with use_cache(outer):
        with use_cache(inner):
            assert active_cache() is inner
        assert active_cache() is outer
    assert active_cache() is None
