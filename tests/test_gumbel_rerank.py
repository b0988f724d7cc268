"""G-Rerank: relaxed top-k masks, the "gumbel" reranker wrapper and the "gumbel" estimator."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import Tensor, nn

from latentrag import hookimpl
from latentrag.core.config import StrictModel, resolve
from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Reranker
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch, Candidates, Example
from latentrag.plugins.gumbel_rerank import GumbelEstimatorConfig, GumbelRerankConfig
from latentrag.plugins.gumbel_rerank.estimator import GumbelEstimator
from latentrag.plugins.gumbel_rerank.masks import (
    LOG_ZERO,
    gumbel_noise,
    gumbel_topk_log_mask,
    gumbel_topk_mask,
    hard_topk_log_mask,
    hard_topk_mask,
    successive_softmax_topk_mask,
)
from latentrag.plugins.gumbel_rerank.reranker import GumbelReranker
from latentrag.plugins.joint_attention import JointPrompt, joint_loglik
from latentrag.toy.corpus import toy_corpus, toy_examples
from latentrag.toy.tiny_models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scores_strategy(rows: int = 3, width: int = 6):
    values = st.floats(-5, 5, allow_nan=False, width=32)
    return st.lists(values, min_size=rows * width, max_size=rows * width).map(
        lambda xs: torch.tensor(xs).view(rows, width)
    )


# -- the masks -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(scores_strategy(), st.integers(1, 6), st.sampled_from([0.05, 0.5, 2.0]), st.integers(0, 99))
def test_max_relaxation_lies_in_the_unit_interval(scores, k, tau, seed):
    mask = gumbel_topk_mask(scores, k, tau, generator=torch.Generator().manual_seed(seed))
    assert mask.min() >= 0 and mask.max() <= 1 + 1e-6
    # the max of k samples covers at least one unit and at most k units of mass
    assert torch.all(mask.sum(-1) >= 1 - 1e-5) and torch.all(mask.sum(-1) <= k + 1e-5)


@settings(max_examples=40, deadline=None)
@given(scores_strategy(), st.integers(1, 6), st.sampled_from([0.05, 0.5, 2.0]), st.integers(0, 99))
def test_successive_relaxation_spends_exactly_k_units(scores, k, tau, seed):
    mask = successive_softmax_topk_mask(
        scores, k, tau, generator=torch.Generator().manual_seed(seed)
    )
    assert mask.min() >= 0
    torch.testing.assert_close(mask.sum(-1), torch.full((3,), float(k)), atol=1e-4, rtol=0)


def test_successive_relaxation_exceeds_one_only_near_ties():
    # scores 1 apart, tau 0.1: every M_i <= 1
    spread = torch.randperm(8, generator=torch.Generator().manual_seed(0)).float()[None]
    assert successive_softmax_topk_mask(spread, 3, 0.1, noise=False).max() <= 1 + 1e-5
    # two near-tied leaders share round one; the rest of their mass spills into later rounds
    tied = torch.tensor([[2.31, 2.28, 0.13, -0.74]])
    mask = successive_softmax_topk_mask(tied, 3, 0.1, noise=False)
    assert mask[0, 0] > 1.5 and mask[0, 2] < 1e-4


def test_without_noise_max_relaxation_tends_to_the_top1_one_hot():
    # the k draws are identical without noise: M = softmax(kappa*w/tau) for every k
    scores = torch.tensor([[0.3, 2.0, -1.0, 1.1, 0.5], [1.0, -0.5, 0.2, 0.9, 3.0]])
    for k in (1, 3):
        mask = gumbel_topk_mask(scores, k, tau=1e-3, noise=False)
        assert (mask - hard_topk_mask(scores, 1)).abs().max() < 1e-3


def test_without_noise_successive_relaxation_tends_to_the_hard_topk():
    scores = torch.tensor([[0.3, 2.0, -1.0, 1.1, 0.5], [1.0, -0.5, 0.2, 0.9, 3.0]])
    for k in (1, 2, 3, 5):
        mask = successive_softmax_topk_mask(scores, k, tau=1e-3, noise=False)
        assert (mask - hard_topk_mask(scores, k)).abs().max() < 1e-3


def test_with_noise_and_small_tau_max_relaxation_marks_the_perturbed_winners():
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    k, kappa = 3, 2.0
    mask = gumbel_topk_mask(scores, k, 1e-4, kappa, generator=torch.Generator().manual_seed(7))
    noise = gumbel_noise((k, 4, 6), torch.Generator().manual_seed(7))  # the same draws
    winners = (kappa * scores + noise).argmax(-1)  # [k, B]
    expected = torch.zeros(4, 6)
    for j in range(k):
        expected[torch.arange(4), winners[j]] = 1.0
    assert (mask - expected).abs().max() < 1e-3


def test_hard_topk_mask_and_its_finite_log():
    scores = torch.tensor([[0.1, 0.9, 0.5, -2.0], [3.0, 2.0, 1.0, 0.0]])
    assert hard_topk_mask(scores, 2).tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]
    log_mask = hard_topk_log_mask(scores, 2)
    assert log_mask.tolist() == [[LOG_ZERO, 0, 0, LOG_ZERO], [0, 0, LOG_ZERO, LOG_ZERO]]
    assert hard_topk_mask(scores, 9).tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_padded_candidates_are_never_kept():
    scores = torch.tensor([[5.0, 0.0, 1.0, 9.0]])
    valid = torch.tensor([[True, True, True, False]])
    assert hard_topk_mask(scores, 2, valid).tolist() == [[1, 0, 1, 0]]
    log_mask = gumbel_topk_log_mask(scores, 2, 0.5, generator=torch.Generator(), valid=valid)
    assert log_mask[0, 3] == LOG_ZERO and torch.isfinite(log_mask).all()


def test_mask_gradient_flows_to_the_scores_and_stays_finite():
    scores = torch.tensor([[0.0, 50.0, -50.0, 1.0]], requires_grad=True)
    for relaxation in (gumbel_topk_log_mask, successive_softmax_topk_mask):
        scores.grad = None
        out = relaxation(scores, 2, 0.5, generator=torch.Generator().manual_seed(0))
        (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


# -- the reranker wrapper --------------------------------------------------------------


class BowConfig(StrictModel):
    dim: int = 16
    seed: int = 0


class BowReranker(Reranker, nn.Module):
    """score = <sum of query word vectors, sum of passage word vectors> (a test double)."""

    def __init__(self, config: BowConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.vocab: dict[str, int] = {}
        seeded = torch.Generator().manual_seed(config.seed)
        self.query_vectors = nn.Parameter(0.1 * torch.randn(256, config.dim, generator=seeded))
        self.passage_vectors = nn.Parameter(0.1 * torch.randn(256, config.dim, generator=seeded))

    def _encode(self, texts: Sequence[str], table: Tensor) -> Tensor:
        rows = []
        for text in texts:
            ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
            rows.append(table[torch.tensor(ids, dtype=torch.long)].sum(0))
        return torch.stack(rows)

    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        width = len(passages[0])
        flat = [p for row in passages for p in row]
        passage_vecs = self._encode(flat, self.passage_vectors).view(len(queries), width, -1)
        return (self._encode(queries, self.query_vectors)[:, None] * passage_vecs).sum(-1)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"bow": self}


class BowPlugin:
    @hookimpl
    def register_components(self, register):
        register("reranker", "test-bow", BowReranker, BowConfig, "test double")


@pytest.fixture
def bow_registered():
    with default_registry().registered(BowPlugin(), "test-gumbel-bow"):
        yield


def test_wrapper_scores_with_the_inner_reranker_and_masks(bow_registered):
    reranker = GumbelReranker(GumbelRerankConfig(inner={"name": "test-bow", "dim": 8}, k=2))
    assert isinstance(reranker.inner, BowReranker) and reranker.inner.config.dim == 8
    scores = reranker.score(["a b", "c"], [["a", "b", "x"], ["c", "y", "z"]])
    torch.testing.assert_close(
        scores, reranker.inner.score(["a b", "c"], [["a", "b", "x"], ["c", "y", "z"]])
    )
    assert torch.equal(reranker.mask(scores, training=False), hard_topk_mask(scores, 2))
    first, second = reranker.mask(scores, training=True), reranker.mask(scores, training=True)
    assert not torch.equal(first, second)  # stochastic
    again = GumbelReranker(GumbelRerankConfig(inner={"name": "test-bow", "dim": 8}, k=2))
    torch.testing.assert_close(again.mask(scores, training=True), first)  # seeded
    assert reranker.trainable_modules() == reranker.inner.trainable_modules()


def test_inner_section_is_checked_by_the_inner_components_model(bow_registered):
    base = {"retriever": {"name": "bm25"}}
    with pytest.raises(ConfigError, match=r"run.toml: reranker\.inner\.colour: unknown key"):
        resolve(
            {**base, "reranker": {"name": "gumbel", "inner": {"name": "test-bow", "colour": 1}}},
            "run.toml",
        )
    with pytest.raises(ConfigError, match=r"reranker\.inner\.name: .*did you mean 'test-bow'"):
        resolve({**base, "reranker": {"name": "gumbel", "inner": {"name": "test-bov"}}})
    with pytest.raises(ValidationError, match="must score"):
        GumbelRerankConfig(inner={"name": "gumbel"})


def test_the_old_inner_config_form_still_works_with_a_deprecation_warning(bow_registered):
    with pytest.warns(DeprecationWarning, match="inner_config is deprecated"):
        config = GumbelRerankConfig(inner="test-bow", inner_config={"dim": 8}, k=2)
    assert config.inner.name == "test-bow" and config.inner.options() == {"dim": 8}
    assert isinstance(GumbelReranker(config).inner, BowReranker)


def test_a_config_file_names_the_bad_inner_key(bow_registered):
    data = {
        "retriever": {"name": "bm25"},
        "reranker": {"name": "gumbel", "inner": {"name": "test-bow", "dimm": 4}},
    }
    with pytest.raises(ConfigError, match=r"^run.toml: reranker\.inner\.dimm: unknown key$"):
        resolve(data, "run.toml")
    data["reranker"]["inner"] = {"name": "test-bow", "dim": 4}
    resolved = resolve(data, "run.toml")
    spec, config = resolved.component("reranker")
    assert spec.build(config, resolved.build_context()).inner.config.dim == 4
    assert resolved.to_dict()["reranker"]["inner"] == {"name": "test-bow", "dim": 4, "seed": 0}


def test_gradients_reach_the_cross_encoder_through_the_mask():
    config = GumbelRerankConfig(
        inner={"name": "cross-encoder", "model": "tiny-random", "max_length": 32}, k=2
    )
    reranker = GumbelReranker(config)
    scores = reranker.score(["who wrote it"], [["the city", "a river", "the war"]])
    mask = reranker.mask(scores, training=True)
    (mask * torch.tensor([[1.0, -1.0, 2.0]])).sum().backward()
    grads = {name: p.grad for name, p in reranker.inner.named_parameters()}
    assert grads["head.weight"] is not None and grads["head.weight"].abs().sum() > 0
    encoder = [g for name, g in grads.items() if name.startswith("encoder.") and g is not None]
    assert encoder and sum(float(g.abs().sum()) for g in encoder) > 0


# -- the estimator ---------------------------------------------------------------------


def test_estimator_trains_the_reranker_and_optionally_the_generator():
    assert GumbelEstimator(GumbelEstimatorConfig()).trains == ("reranker",)
    both = GumbelEstimator(GumbelEstimatorConfig(train_generator=True))
    assert both.trains == ("reranker", "generator")
    with pytest.raises(ValidationError):
        GumbelEstimatorConfig(loglik="mean")


def test_estimator_noise_stream_resumes_from_its_checkpoint_state():
    estimator = GumbelEstimator(GumbelEstimatorConfig(seed=3))
    scores = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    estimator.log_mask(scores)
    state = estimator.extra_state()
    first = estimator.log_mask(scores)
    resumed = GumbelEstimator(GumbelEstimatorConfig(seed=3))
    resumed.load_extra_state(state)
    assert torch.equal(resumed.log_mask(scores), first)
    assert not torch.equal(estimator.log_mask(scores), first)


class KeyCodeTask:
    """Each example: K passages "key <k> code <c>"; the question names one key; the answer
    is its code. Only the gold passage tells the code, and codes are drawn per example."""

    KEYS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()  # noqa: SIM905
    CODES = "red blue green black white pink brown grey gold silver orange purple".split()  # noqa: SIM905

    def __init__(self, k: int = 4) -> None:
        self.k = k
        self.passages: list[str] = []
        self.rows: dict[str, tuple[list[int], int]] = {}

    def batch(self, rng: random.Random, size: int) -> Batch:
        examples = []
        for _ in range(size):
            keys = rng.sample(self.KEYS, self.k)
            codes = [rng.choice(self.CODES) for _ in keys]
            gold = rng.randrange(self.k)
            rows = []
            for key, code in zip(keys, codes):
                rows.append(len(self.passages))
                self.passages.append(f"{key} code {code}")
            example = Example(str(len(self.rows)), keys[gold], (codes[gold],))
            self.rows[example.id] = (rows, gold)
            examples.append(example)
        return Batch(examples)

    def gold(self, batch: Batch) -> Tensor:
        return torch.tensor([self.rows[e.id][1] for e in batch.examples])


class KeyCodeModel:
    """The part of `LatentModel` the estimator uses, over a frozen tiny generator."""

    PROMPT = JointPrompt(
        passage="key {passage}", question=" question {question} answer", answer_eos=False
    )

    def __init__(self, task: KeyCodeTask, reranker, generator, tokenizer) -> None:
        self.task, self.reranker = task, reranker
        self.generator, self.tokenizer = generator, tokenizer
        self.generator_forwards = 0

    def candidates(self, batch: Batch, source: str, k: int) -> Candidates:
        rows = torch.tensor([self.task.rows[e.id][0][:k] for e in batch.examples])
        return Candidates(rows, torch.zeros(rows.shape))

    def passages(self, candidates: Candidates) -> list[list[str]]:
        return [[self.task.passages[r] for r in row] for row in candidates.indices.tolist()]

    def rerank_scores(self, batch: Batch, candidates: Candidates) -> Tensor:
        return self.reranker.score(batch.questions, self.passages(candidates))

    def joint_loglik(self, batch: Batch, candidates: Candidates, doc_log_mask: Tensor) -> Tensor:
        self.generator_forwards += len(batch)
        return joint_loglik(
            self.generator,
            self.tokenizer,
            batch.questions,
            self.passages(candidates),
            batch.targets,
            doc_log_mask,
            self.PROMPT,
        )


def pretrain_copying_generator(task: KeyCodeTask, tokenizer, steps: int = 120):
    """A tiny Llama that copies the code of the one passage it can see (gold only)."""
    generator = tiny_llama(tokenizer, hidden=64, layers=2, heads=4, seed=0).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=3e-3)
    rng = random.Random(0)
    oracle = KeyCodeModel(task, None, generator, tokenizer)
    for _ in range(steps):
        batch = task.batch(rng, 16)
        log_mask = torch.full((16, task.k), LOG_ZERO)
        log_mask[torch.arange(16), task.gold(batch)] = 0.0
        loss = -oracle.joint_loglik(batch, oracle.candidates(batch, "prior", task.k), log_mask)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    generator.zero_grad(set_to_none=True)
    return generator.eval().requires_grad_(False)


def recall_at_1(model: KeyCodeModel, batch: Batch) -> float:
    with torch.no_grad():
        scores = model.rerank_scores(batch, model.candidates(batch, "prior", model.task.k))
    return float((scores.argmax(-1) == model.task.gold(batch)).float().mean())


def test_grerank_learns_to_find_the_gold_passage_from_the_lm_loss_alone(bow_registered):
    task = KeyCodeTask(k=4)
    tokenizer = tiny_tokenizer([*task.KEYS, *task.CODES, "key", "code"])
    generator = pretrain_copying_generator(task, tokenizer)
    reranker = GumbelReranker(GumbelRerankConfig(inner="test-bow", k=1))
    model = KeyCodeModel(task, reranker, generator, tokenizer)
    held_out = task.batch(random.Random(123), 200)
    before = recall_at_1(model, held_out)
    assert before < 0.45  # about 1/K

    estimator = GumbelEstimator(GumbelEstimatorConfig(k=4, k_keep=1, tau=0.5, seed=0))
    params = [p for m in reranker.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    rng = random.Random(1)
    for _ in range(60):
        out = estimator.loss(task.batch(rng, 16), model)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert not any(p.grad is not None for p in generator.parameters())  # frozen
    after = recall_at_1(model, held_out)
    print(f"G-Rerank key-code task: recall@1 before {before:.3f}, after {after:.3f}")
    assert after >= 0.9
    assert set(out.diagnostics) == {"mask_entropy", "mask_max", "joint_loglik"}
    assert out.diagnostics["mask_max"] > 0.5 and out.generator_forwards == 16


# -- through the pipeline ------------------------------------------------------------------


def build(kind: str, name: str, **options):
    spec = default_registry().get(kind, name)
    return spec.build(spec.config_model.model_validate(options))


def test_estimator_through_the_pipeline_trains_only_the_reranker():
    generator = build("generator", "hf-causal-lm", model="tiny-llama", freeze=True)
    reranker = build("reranker", "gumbel", inner_config={"model": "tiny-random", "max_length": 48})
    estimator = build("estimator", "gumbel", k=4, k_keep=2)
    pipeline = Pipeline(
        toy_corpus(), build("retriever", "bm25"), generator, reranker=reranker, estimator=estimator
    )
    pipeline.index()
    batch = Batch(toy_examples()[:3])
    out = estimator.loss(batch, pipeline)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    out.loss.backward()
    head = reranker.inner.head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert all(p.grad is None for p in generator.model.parameters())
    assert out.generator_forwards == 3
    assert 0 < out.diagnostics["mask_max"] <= 1
    assert 0 <= out.diagnostics["mask_entropy"] <= np.log(4) + 1e-6


def test_joint_reading_of_one_passage_equals_the_generators_own_loglik():
    generator = build("generator", "hf-causal-lm", model="tiny-llama")
    examples = toy_examples()[:3]
    corpus = toy_corpus()
    passages = [[corpus[i].text] for i in range(3)]
    queries, targets = [e.question for e in examples], [e.target for e in examples]
    expected = generator.loglik(queries, passages, targets)[:, 0]
    got = generator.loglik_joint(queries, passages, targets, torch.zeros(3, 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
