"""JSA: the Metropolis independence sampler alone, its stationary distribution, the Fisher
identity of its M-step, the persistent cache and the distinct-forwards guarantee."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Batch, Example
from latentrag.experiments.gradcheck import checked_parameters, exact_gradient
from latentrag.plugins.estimators.jsa import JsaConfig
from latentrag.plugins.estimators.jsa.estimator import (
    INITIAL,
    JsaEstimator,
    metropolis_independence,
)
from latentrag.testing import toy_corpus, toy_examples
from latentrag.toy.components import TableGenerator, TableRetriever, posterior_query

T = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def table_pipeline(
    examples: list[Example], posterior_scale: float = 0.1, generator_scale: float = 1.0
) -> Pipeline:
    corpus = toy_corpus()
    pipeline = Pipeline(
        corpus,
        TableRetriever.from_examples(examples, corpus, seed=1, scale=0.1),
        TableGenerator.from_examples(examples, corpus, seed=3, scale=generator_scale),
        TableRetriever.from_examples(
            examples, corpus, posterior=True, seed=2, scale=posterior_scale
        ),
    )
    pipeline.index()
    return pipeline


def exact_posterior(pipeline: Pipeline, batch: Batch) -> torch.Tensor:
    cand = pipeline.candidates(batch, "corpus", 0)
    with torch.no_grad():
        joint = pipeline.prior_logprobs(batch, cand, T) + pipeline.loglik(batch, cand)
    return torch.softmax(joint, -1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# -- the pure sampler -------------------------------------------------------------------


def test_sampler_follows_the_metropolis_rule_step_by_step():
    log_w = torch.log(torch.tensor([[1.0, 0.5, 2.0, 0.1]]))
    uniforms = torch.tensor([[0.99, 0.6, 0.9, 0.01]])
    fresh = metropolis_independence(log_w, torch.zeros(1), torch.tensor([False]), uniforms)
    # first proposal taken unconditionally; 0.5/1 < 0.6 rejected; 2/1 accepted; 0.1/2 > 0.01
    assert fresh.states.tolist() == [[0, 0, 2, 3]]
    assert fresh.accepted.tolist() == [[False, False, True, True]]
    assert fresh.tested.tolist() == [[False, True, True, True]]

    started = metropolis_independence(
        log_w, torch.log(torch.tensor([10.0])), torch.tensor([True]), uniforms
    )
    # from w=10: 1/10 < 0.99, 0.5/10 < 0.6, 2/10 < 0.9 rejected; 0.1/10 = 0.01 is not < 0.01
    assert started.states.tolist() == [[INITIAL] * 4]
    assert not started.accepted.any() and started.tested.all()


def test_sampler_chain_converges_to_the_target_under_a_poor_proposal():
    gen = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(10, generator=gen), 0)
    proposal = torch.full((10,), 0.4 / 9)
    proposal[int(target.argmin())] = 0.6  # peaked on the least likely state, full support
    log_ratio = target.log() - proposal.log()
    counts = torch.zeros(10)
    state, has_state = torch.zeros(1, dtype=torch.long), torch.tensor([False])
    for _ in range(20):  # 20 x 1000 transitions, the chain carried across calls
        draws = torch.multinomial(proposal, 1000, replacement=True, generator=gen).unsqueeze(0)
        run = metropolis_independence(
            log_ratio[draws], log_ratio[state], has_state, torch.rand(1, 1000, generator=gen)
        )
        visited = torch.where(
            run.states == INITIAL, state.unsqueeze(1), draws.gather(1, run.states.clamp(min=0))
        )
        counts += torch.bincount(visited.flatten(), minlength=10)
        state, has_state = visited[:, -1], torch.tensor([True])
    assert total_variation(counts / counts.sum(), target) < 0.05
    assert total_variation(proposal, target) > 0.3  # the proposal really is far


# -- the estimator ----------------------------------------------------------------------


def repeated_question(copies: int) -> list[Example]:
    base = toy_examples()[0]
    return [Example(f"copy-{i}", base.question, base.answers) for i in range(copies)]


def test_persistent_chain_samples_the_exact_posterior_with_frozen_parameters():
    examples = repeated_question(8)
    pipeline, batch = table_pipeline(examples), Batch(examples)
    posterior = exact_posterior(pipeline, batch)[0]
    far = torch.full((12,), 0.5 / 11)
    far[int(posterior.argmin())] = 0.5
    pipeline.posterior.set_scores(posterior_query(examples[0]), T * far.log())
    estimator = JsaEstimator(JsaConfig(candidates="corpus", samples=16, seed=0))
    counts = count_chain_states(pipeline)
    with torch.no_grad():
        for _ in range(160):  # 8 chains x 16 x 160 = 20480 transitions
            estimator.loss(batch, pipeline)
    assert total_variation(counts / counts.sum(), posterior) < 0.05
    assert total_variation(far, posterior) > 0.3


def count_chain_states(pipeline: Pipeline) -> torch.Tensor:
    """Counts of the corpus rows of every chain state, read from the M-step's generator call
    (the one with grad=True: its rows are the n states of each example's chain)."""
    counts = torch.zeros(len(pipeline.corpus))
    rows_loglik = pipeline.rows_loglik

    def spy(batch, rows, reduce="sum", grad=True):
        if grad:
            counts.add_(torch.bincount(rows.flatten(), minlength=len(counts)).float())
        return rows_loglik(batch, rows, reduce, grad)

    pipeline.rows_loglik = spy
    return counts


def test_m_step_gradient_averages_to_the_exact_gradient_fisher_identity():
    examples = toy_examples()[:4]
    pipeline, batch = table_pipeline(examples, generator_scale=3.0), Batch(examples)
    estimator = JsaEstimator(JsaConfig(candidates="corpus", samples=64, seed=1))
    params = checked_parameters(pipeline)
    with torch.no_grad():
        estimator.loss(batch, pipeline)  # burn-in
    total = torch.zeros(sum(p.numel() for p in params))
    steps = 120
    for _ in range(steps):
        grads = torch.autograd.grad(estimator.loss(batch, pipeline).loss, params)
        total += torch.cat([g.flatten() for g in grads])
    exact = exact_gradient(pipeline, batch, T)
    assert float(torch.nn.functional.cosine_similarity(total / steps, exact, dim=0)) > 0.99


def test_acceptance_is_certain_when_the_proposal_is_the_posterior():
    examples = toy_examples()[:3]
    pipeline, batch = table_pipeline(examples), Batch(examples)
    for example, post in zip(examples, exact_posterior(pipeline, batch)):
        pipeline.posterior.set_scores(posterior_query(example), T * post.log())
    estimator = JsaEstimator(JsaConfig(candidates="corpus", samples=8))
    estimator.loss(batch, pipeline)  # first visit: the first proposal is not tested
    output = estimator.loss(batch, pipeline)
    assert output.diagnostics["acceptance_rate"] == pytest.approx(1.0)
    assert output.diagnostics["q_entropy"] == pytest.approx(
        float(
            -(exact_posterior(pipeline, batch).log() * exact_posterior(pipeline, batch))
            .sum(-1)
            .mean()
        ),
        abs=1e-4,
    )


def test_persistent_cache_round_trips_through_extra_state():
    examples = toy_examples()[:4]
    pipeline, batch = table_pipeline(examples, posterior_scale=0.3), Batch(examples)
    first = JsaEstimator(JsaConfig(k=4, samples=3, seed=5))
    for _ in range(3):
        first.loss(batch, pipeline)
    state = json.loads(json.dumps(first.extra_state()))
    assert set(state["cache"]) == {e.id for e in examples}
    assert all(pid in pipeline.corpus for pid in state["cache"].values())

    second = JsaEstimator(JsaConfig(k=4, samples=3, seed=99))
    second.load_extra_state(state)
    a, b = first.loss(batch, pipeline), second.loss(batch, pipeline)
    assert a.loss.item() == b.loss.item()
    assert a.diagnostics == b.diagnostics
    assert first.cache == second.cache


def test_a_cached_passage_outside_the_candidates_joins_the_set():
    examples = toy_examples()[:2]
    pipeline, batch = table_pipeline(examples), Batch(examples)
    top = pipeline.candidates(batch, "union", 2)
    outside = next(r for r in range(12) if r not in top.indices[0].tolist())
    estimator = JsaEstimator(JsaConfig(k=2, samples=2))
    estimator.load_extra_state(
        {"cache": {examples[0].id: pipeline.corpus[outside].id, examples[1].id: "gone"}}
    )
    seen = []
    prior_logprobs = pipeline.prior_logprobs
    pipeline.prior_logprobs = lambda b, cand, t: seen.append(cand) or prior_logprobs(b, cand, t)
    output = estimator.loss(batch, pipeline)
    cand = seen[0]
    assert outside in cand.indices[0][cand.valid()[0]].tolist()
    assert outside not in cand.indices[1][cand.valid()[1]].tolist()  # "gone" is ignored
    assert math.isfinite(output.loss.item())


class CountingTableGenerator(TableGenerator):
    """Counts the (query, passage) pairs it actually scores."""

    pairs = 0

    def loglik(self, queries, passages, targets, reduce="sum"):
        self.pairs += sum(len(p) for p in passages)
        return super().loglik(queries, passages, targets, reduce)


def test_generator_runs_once_per_distinct_proposal_and_state():
    examples = toy_examples()[:3]
    corpus = toy_corpus()
    generator = CountingTableGenerator.from_examples(examples, corpus, seed=3)
    pipeline = Pipeline(
        corpus,
        TableRetriever.from_examples(examples, corpus, seed=1, scale=0.1),
        generator,
        TableRetriever.from_examples(examples, corpus, posterior=True, seed=2, scale=0.3),
    )
    pipeline.index()
    calls = []
    rows_loglik = pipeline.rows_loglik

    def spy(batch, rows, reduce="sum", grad=True):
        calls.append((rows.clone(), grad))
        return rows_loglik(batch, rows, reduce, grad)

    pipeline.rows_loglik = spy
    estimator = JsaEstimator(JsaConfig(k=4, samples=8))
    batch = Batch(examples)
    for _ in range(2):
        calls.clear()
        before, pairs_before = pipeline.generator_forwards, generator.pairs
        output = estimator.loss(batch, pipeline)
        (proposals, e_grad), (states, m_grad) = calls
        assert (e_grad, m_grad) == (False, True)
        distinct_proposals = sum(len(set(row)) for row in proposals.tolist())
        distinct_states = sum(len(set(row)) for row in states.tolist())
        assert distinct_proposals < 3 * 8  # duplicates were drawn, and scored once
        forwards = pipeline.generator_forwards - before
        assert forwards == generator.pairs - pairs_before == distinct_proposals + distinct_states
        assert output.generator_forwards == forwards
        assert output.generator_backwards == distinct_states
