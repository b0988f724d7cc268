"""Joint stochastic approximation (JSA, arXiv 2508.18168): MIS E-step, supervised M-step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentrag.core.interfaces import EstimatorOutput, LatentModel
from latentrag.core.pipeline import pad_rows
from latentrag.core.types import Batch, Candidates
from latentrag.plugins.estimators.common import (
    SeededEstimator,
    entropy,
    generator_forwards,
    valid_mask,
    weighted_sum,
)
from latentrag.plugins.estimators.jsa import JsaConfig

#: chain state index meaning "the state the chain started in" (not one of the proposals)
INITIAL = -1


@dataclass
class ChainRun:
    """The result of `metropolis_independence` for a batch of chains.

    states [B,n]: after proposal i the chain is at proposal states[b,i], or INITIAL;
    accepted [B,n]: whether proposal i passed its Metropolis test;
    tested [B,n]: whether proposal i had a test (a chain without an initial state takes its
    first proposal unconditionally).
    """

    states: Tensor
    accepted: Tensor
    tested: Tensor


def metropolis_independence(
    log_w: Tensor, log_w_initial: Tensor, has_initial: Tensor, uniforms: Tensor
) -> ChainRun:
    """Run B Metropolis independence chains through their n proposals, in order.

    log_w [B,n]: log importance weights log p(h|x) + log p(y|x,h) - log q(h|x,y) of the
    proposals; log_w_initial [B] / has_initial [B]: the starting state's weight, where there
    is one; uniforms [B,n] in [0,1). Proposal i is accepted when u_i < w(h_i) / w(current).
    """
    batch, n = log_w.shape
    states = torch.full((batch, n), INITIAL, dtype=torch.long)
    accepted = torch.zeros(batch, n, dtype=torch.bool)
    tested = torch.ones(batch, n, dtype=torch.bool)
    tested[:, 0] = has_initial
    current = log_w_initial.clone()
    state = torch.full((batch,), INITIAL, dtype=torch.long)
    for i in range(n):
        ratio = log_w[:, i] - torch.where(tested[:, i], current, 0.0)
        accept = ~tested[:, i] | (torch.log(uniforms[:, i]) < ratio)
        current = torch.where(accept, log_w[:, i], current)
        state = torch.where(accept, i, state)
        states[:, i] = state
        accepted[:, i] = accept & tested[:, i]
    return ChainRun(states, accepted, tested)


class JsaEstimator(SeededEstimator):
    """JSA: Metropolis independence sampling from p(h|x,y) with proposal q(h|x,y), then
    supervised updates on the chain's states.

    p(h|x) and q(h|x,y) are softmax(score/temperature) normalised over the candidate set
    (temperature 0.1 by default, as the JSA-RAG released code). E-step: n proposals
    h' ~ q, weights w = p(h|x) p(y|x,h) / q(h|x,y) from one batched no-grad generator pass
    over the distinct proposals, accept with min(1, w(h')/w(h)). M-step: loss =
    mean_b Σ_h c_h [-log p(y|x,h) - log p(h|x) - log q(h|x,y)], c_h = visits of h among the
    n states / n; only distinct states get a generator backward. Biased: the chain targets
    the posterior over the candidate set, not the corpus, and a finite chain is not yet
    at stationarity (the persistent chain, carried across visits, removes most of that).
    """

    trains = ("retriever", "posterior", "generator")
    requires = JsaConfig.requires

    def __init__(self, config: JsaConfig) -> None:
        super().__init__(config.seed)
        self.config = config
        #: example id -> passage id of the chain's state at the example's last visit
        self.cache: dict[str, str] = {}

    @property
    def persistent(self) -> bool:
        return self.config.chain == "persistent"

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        cand, initial_slots = self._with_cached_states(batch, model, cand)
        log_prior = model.prior_logprobs(batch, cand, cfg.temperature)
        log_q = model.posterior_logprobs(batch, cand, cfg.temperature)
        run, state_slots = self._e_step(
            batch, model, cand, log_prior.detach(), log_q.detach(), initial_slots
        )
        self._remember(batch, model, cand, state_slots[:, -1])
        e_forwards = generator_forwards(model) - start
        loss = self._m_step(batch, model, cand, state_slots, log_prior, log_q)
        m_forwards = generator_forwards(model) - start - e_forwards
        return EstimatorOutput(
            loss=loss,
            diagnostics=self._diagnostics(run, state_slots, log_q, valid_mask(log_q, cand.mask)),
            generator_forwards=e_forwards + m_forwards,
            generator_backwards=m_forwards if torch.is_grad_enabled() else 0,
        )

    def _e_step(
        self,
        batch: Batch,
        model: LatentModel,
        cand: Candidates,
        log_prior: Tensor,
        log_q: Tensor,
        initial_slots: Tensor,
    ) -> tuple[ChainRun, Tensor]:
        """n proposals from q per example, weighted by one no-grad generator pass over the
        distinct proposals and initial states; returns the run and its states' slots [B,n]."""
        proposals = torch.multinomial(
            log_q.exp(), self.config.samples, replacement=True, generator=self.rng
        )
        has_initial = initial_slots >= 0
        # the chain's initial state joins the scored slots (a repeated proposal when none)
        initial_or_repeat = torch.where(has_initial, initial_slots, proposals[:, 0])
        scored = torch.cat([proposals, initial_or_repeat.unsqueeze(1)], dim=1)
        with torch.no_grad():
            rows = cand.indices.gather(1, scored)
            loglik = model.rows_loglik(batch, rows, self.config.loglik, False)
        log_w = log_prior.gather(1, scored) + loglik - log_q.gather(1, scored)
        uniforms = torch.rand(proposals.shape, generator=self.rng)
        run = metropolis_independence(log_w[:, :-1], log_w[:, -1], has_initial, uniforms)
        state_slots = torch.where(
            run.states == INITIAL,
            initial_slots.unsqueeze(1),
            proposals.gather(1, run.states.clamp(min=0)),
        )
        return run, state_slots

    def _m_step(
        self,
        batch: Batch,
        model: LatentModel,
        cand: Candidates,
        state_slots: Tensor,
        log_prior: Tensor,
        log_q: Tensor,
    ) -> Tensor:
        """mean_b Σ_h c_h [-log p(y|x,h) - log p(h|x) - log q(h|x,y)], c_h = visits / n."""
        share = torch.full(
            state_slots.shape, 1.0 / self.config.samples, dtype=log_q.dtype, device=log_q.device
        )  # log_q's dtype and device: bf16 under autocast, on train.device
        visits = torch.zeros_like(log_q).scatter_add(1, state_slots.to(log_q.device), share)
        # [B,n] rows: the pipeline scores each distinct (example, state) once
        state_rows = cand.indices.gather(1, state_slots)
        generator_term = -model.rows_loglik(batch, state_rows, self.config.loglik).mean(-1)
        retriever_term = -weighted_sum(visits, log_prior + log_q)
        return (generator_term + retriever_term).mean()

    def _with_cached_states(
        self, batch: Batch, model: LatentModel, cand: Candidates
    ) -> tuple[Candidates, Tensor]:
        """The candidates, each example's set extended by its cached state when missing,
        and the slot of that state per example (-1: no chain to continue)."""
        slots = torch.full((len(batch),), -1, dtype=torch.long)
        if not self.persistent:
            return cand, slots
        corpus = model.corpus
        rows = [
            [r for r, ok in zip(row, ok_row) if ok]
            for row, ok_row in zip(cand.indices.tolist(), cand.valid().tolist())
        ]
        extended = False
        for b, example in enumerate(batch.examples):
            passage_id = self.cache.get(example.id)
            if passage_id is None or passage_id not in corpus:
                continue  # first visit, or the passage left the corpus: start afresh
            row = corpus.index_of(passage_id)
            if row not in rows[b]:
                rows[b].append(row)
                extended = True
            slots[b] = rows[b].index(row)
        return (pad_rows(rows) if extended else cand), slots

    def _remember(self, batch: Batch, model: LatentModel, cand: Candidates, slots: Tensor) -> None:
        final_rows = cand.indices.gather(1, slots.unsqueeze(1)).squeeze(1).tolist()
        for example, row in zip(batch.examples, final_rows):
            self.cache[example.id] = model.corpus[row].id

    def _diagnostics(
        self, run: ChainRun, state_slots: Tensor, log_q: Tensor, valid: Tensor
    ) -> dict[str, float]:
        tests = int(run.tested.sum())
        distinct = [len(set(row)) for row in state_slots.tolist()]
        return {
            # over the Metropolis tests; a fresh chain of one proposal has none: every move taken
            "acceptance_rate": float(run.accepted.sum()) / tests if tests else 1.0,
            "distinct_states": sum(distinct) / len(distinct),
            "q_entropy": float(entropy(log_q.detach(), valid).mean()),
        }

    def extra_state(self) -> dict:
        return {"cache": dict(self.cache), "rng": self.rng_state()}

    def load_extra_state(self, state: dict) -> None:
        self.cache = dict(state.get("cache", {}))
        if "rng" in state:
            self.load_rng_state(state["rng"])
