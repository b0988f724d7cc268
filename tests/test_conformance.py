"""Every builtin component passes the conformance checks; broken ones fail them clearly."""

from __future__ import annotations

import os

import pytest
import torch

from latentrag.core.interfaces import Estimator, EstimatorOutput, Retriever
from latentrag.core.registry import Registry
from latentrag.core.types import Candidates
from latentrag.testing import checks
from latentrag.toy.corpus import toy_corpus

#: the smallest config of each builtin component (tiny random models, few candidates)
TINY = {
    ("retriever", "bm25"): {},
    ("retriever", "bow"): {},
    ("retriever", "dpr"): {"model": "tiny-random"},
    ("reranker", "cross-encoder"): {"model": "tiny-random"},
    ("reranker", "gumbel"): {"inner": {"name": "cross-encoder", "model": "tiny-random"}},
    ("generator", "hf-causal-lm"): {"model": "tiny-llama"},
    ("estimator", "topk"): {"k": 4},
    ("estimator", "topk-token"): {"k": 4},
    ("estimator", "vrag"): {"k": 4},
    ("estimator", "jsa"): {"k": 4},
}
CHECKS = {
    "retriever": checks.check_retriever,
    "reranker": checks.check_reranker,
    "generator": checks.check_generator,
    "estimator": checks.check_estimator,
}
# G-Rerank's estimator needs a reranker and a joint generator: tests/test_gumbel_rerank.py
SKIP = {("estimator", "gumbel")}

REGISTRY = Registry().load(entry_points=False)
BUILTINS = [(s.kind, s.name) for s in REGISTRY.components() if (s.kind, s.name) not in SKIP]


def test_every_builtin_component_has_a_tiny_config():
    assert sorted(set(BUILTINS) - set(TINY)) == []


def factory_for(kind: str, name: str, **extra):
    spec = REGISTRY.get(kind, name)
    config = spec.config_model.model_validate({**TINY[(kind, name)], **extra})
    return lambda: spec.build(config)


@pytest.mark.parametrize(("kind", "name"), BUILTINS, ids=[f"{k}-{n}" for k, n in BUILTINS])
def test_builtin_component_conforms(kind, name):
    spec = REGISTRY.get(kind, name)
    checks.check_config_round_trip(spec.config_model.model_validate(TINY[(kind, name)]))
    CHECKS[kind](factory_for(kind, name))


def test_topk_over_the_corpus_matches_the_exact_gradient():
    checks.check_estimator(
        factory_for("estimator", "topk", candidates="corpus"), exact_cosine=0.9999, seeds=2
    )


# -- deliberately broken components --------------------------------------------------------


class WrongShape(Retriever):
    def index(self, corpus):
        self.n = len(corpus)

    def retrieve(self, queries, k):
        rows = torch.arange(k + 1).expand(len(queries), -1)
        return Candidates(rows.clone(), -rows.float())


class Restless(WrongShape):
    """Scores from an unseeded source: they change from instance to instance."""

    def retrieve(self, queries, k):
        noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        scores = torch.rand(len(queries), self.n, generator=noise)
        top = torch.topk(scores, k)
        return Candidates(top.indices, top.values)


class Detached(Estimator):
    trains = ("retriever", "generator")

    def loss(self, batch, model):
        cand = model.candidates(batch, "prior", 3)
        value = -model.prior_logprobs(batch, cand, 1.0).detach().mean()
        return EstimatorOutput(loss=value.requires_grad_())


def test_wrong_shape_is_named():
    with pytest.raises(checks.ConformanceError, match=r"indices has shape \(4, 4\), expected"):
        checks.check_retriever(WrongShape, corpus=toy_corpus())


def test_non_determinism_is_named():
    with pytest.raises(checks.ConformanceError, match="not deterministic"):
        checks.check_retriever(Restless)


def test_missing_gradient_is_named():
    with pytest.raises(checks.ConformanceError, match="trains 'retriever' but no gradient reaches"):
        checks.check_estimator(Detached)


def test_biased_estimator_fails_the_exact_check():
    biased = factory_for("estimator", "topk", k=2, candidates="prior")
    with pytest.raises(checks.ConformanceError, match="cosine"):
        checks.check_estimator(biased, exact_cosine=0.9999, seeds=2)
