"""Every builtin component passes the conformance checks; broken ones fail them clearly."""

from __future__ import annotations

import os

import pytest
import torch

from latentrag.core.interfaces import Estimator, EstimatorOutput, Retriever
from latentrag.core.registry import Registry
from latentrag.core.types import Batch, Candidates
from latentrag.testing import checks
from latentrag.toy.corpus import toy_corpus

#: the smallest config of each builtin component (tiny random models, few candidates)
TINY = {
    ("retriever", "bm25"): {},
    ("retriever", "bow"): {},
    ("retriever", "dpr"): {"model": "tiny-random"},
    ("retriever", "hybrid"): {"retrievers": [{"name": "bm25"}, {"name": "dpr", "model": "tiny-random"}]},  # noqa: E501
    ("reranker", "cross-encoder"): {"model": "tiny-random"},
    ("reranker", "gumbel"): {"inner": {"name": "cross-encoder", "model": "tiny-random"}},
    ("generator", "hf-causal-lm"): {"model": "tiny-llama"},
    ("generator", "hf-seq2seq"): {"model": "tiny-t5"},
    ("estimator", "topk"): {"k": 4},
    ("estimator", "topk-token"): {"k": 4},
    ("estimator", "vrag"): {"k": 4},
    ("estimator", "jsa"): {"k": 4},
    ("estimator", "pdist"): {"k": 4},
    ("estimator", "loop"): {"k": 4},
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


#: settings that take other code paths (sampling, padded unions, per-token, generator terms)
VARIANTS = [
    ("topk", {"candidates": "union"}),
    ("topk-token", {"candidates": "union", "loglik": "mean"}),
    ("vrag", {"sampled": True}),
    ("vrag", {"candidates": "union"}),
    ("jsa", {"chain": "fresh", "samples": 2}),
    ("pdist", {"train_generator": "marginal"}),
    ("pdist", {"train_generator": "per-passage"}),
    ("loop", {"weights": "prior"}),
]


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=[f"{n}-{e}" for n, e in VARIANTS])
def test_builtin_estimator_variants_conform(name, extra):
    checks.check_estimator(factory_for("estimator", name, **extra))


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


class Leaky(Estimator):
    """Top-K marginal likelihood whose retriever-only claim is false: the generator's
    log-likelihoods are not detached, so the generator gets a gradient it should not."""

    trains = ("retriever",)

    def loss(self, batch, model):
        cand = model.candidates(batch, "prior", 4)
        log_prior = model.prior_logprobs(batch, cand, 1.0)
        loglik = model.loglik(batch, cand)  # should be grad=False
        return EstimatorOutput(loss=-torch.logsumexp(log_prior + loglik, -1).mean())


class Unmasked(Estimator):
    """An ELBO-style expectation Σ_h p(h) (log p(h) + log p(y|h)) that multiplies by the
    log-probabilities without masking: 0 * -inf = NaN at every padded slot."""

    trains = ("retriever", "generator")

    def loss(self, batch, model):
        cand = model.candidates(batch, "prior", 4)
        log_prior = model.prior_logprobs(batch, cand, 1.0)
        loglik = model.loglik(batch, cand)
        return EstimatorOutput(loss=-(log_prior.exp() * (log_prior + loglik)).sum(-1).mean())


class PeeksAtPadding(Estimator):
    """Finite everywhere, but reads the retriever's scores of every slot, padded or not."""

    trains = ("retriever", "generator")

    def loss(self, batch, model):
        cand = model.candidates(batch, "prior", 4)
        log_prior = model.prior_logprobs(batch, cand, 1.0)
        loglik = model.loglik(batch, cand)
        marginal = torch.logsumexp(log_prior + loglik, -1)
        return EstimatorOutput(loss=-marginal.mean() + 1e-3 * cand.scores.float().mean())


def test_gradient_into_an_untrained_role_is_named():
    with pytest.raises(checks.ConformanceError) as info:
        checks.check_estimator(Leaky)
    assert str(info.value) == (
        "Leaky: gradient reaches 'generator', which it does not train (trains = "
        "('retriever',)): detach what flows into it, or declare it in `trains`"
    )


def test_leaky_estimator_passes_once_it_detaches():
    class Fixed(Leaky):
        def loss(self, batch, model):
            cand = model.candidates(batch, "prior", 4)
            log_prior = model.prior_logprobs(batch, cand, 1.0)
            loglik = model.loglik(batch, cand, grad=False)
            return EstimatorOutput(loss=-torch.logsumexp(log_prior + loglik, -1).mean())

    checks.check_estimator(Fixed)


def test_nan_on_padded_candidates_is_named():
    with pytest.raises(checks.ConformanceError, match="^Unmasked: loss is not finite on padded"):
        checks.check_estimator(Unmasked)


def test_reading_padded_slots_is_named():
    with pytest.raises(checks.ConformanceError, match="depends on what padded candidate slots"):
        checks.check_estimator(PeeksAtPadding)


def test_padded_model_pads_every_row_and_shortens_every_second():
    pipeline, examples = checks.toy_pipeline()
    batch = Batch(list(examples[:4]))
    found = checks.PaddedModel(pipeline, filler=7, filler_score=9.0).candidates(batch, "prior", 3)
    assert found.mask.sum(-1).tolist() == [3, 2, 3, 2]
    assert found.indices.shape == (4, 3 + checks.PADDING)
    assert (found.indices[~found.mask] == 7).all() and (found.scores[~found.mask] == 9.0).all()
    plain = pipeline.candidates(batch, "prior", 3)
    assert torch.equal(found.indices[0, :3], plain.indices[0])


def test_config_that_changes_in_a_round_trip_is_named():
    from pydantic import field_validator

    from latentrag.core.config import StrictModel

    class Doubling(StrictModel):
        k: int = 1

        @field_validator("k")
        @classmethod
        def _double(cls, k: int) -> int:
            return 2 * k

    with pytest.raises(checks.ConformanceError, match="Doubling: config changes in a dump"):
        checks.check_config_round_trip(Doubling())
