"""The frozen generator's passage key/value cache: the same scores and gradients as reading
every passage afresh, invalidated by a weight change, bounded by its memory budget."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.plugins.hf_generator import HFGeneratorConfig
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.plugins.hf_generator.passage_cache import PassageCache
from latentrag.plugins.joint_attention import PassageStates
from latentrag.testing import toy_corpus, toy_examples

IMPLEMENTATIONS = ["eager", "sdpa"]
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frozen(impl: str = "sdpa", **options) -> HFCausalLMGenerator:
    options = {"batch_size": 3, "freeze": True, **options}
    config = HFGeneratorConfig(model="tiny-llama", attn_implementation=impl, **options)
    return HFCausalLMGenerator(config)


def batch():
    """3 questions x 3 passages of different lengths; passage 0 is shared by all rows."""
    corpus, examples = toy_corpus(), toy_examples()
    chosen = [examples[i] for i in (0, 6, 9)]
    shared = corpus[0].text
    passages = [[shared, corpus[i + 1].text, "short"] for i in range(3)]
    passages[2][1] = " ".join(p.text for p in corpus[:3])
    return [e.question for e in chosen], passages, [e.target for e in chosen]


def uncached(gen: HFCausalLMGenerator, method: str, *args):
    """`method` with the cache switched off."""
    cache, gen.passage_cache = gen.passage_cache, None
    try:
        return getattr(gen, method)(*args)
    finally:
        gen.passage_cache = cache


def reference_loglik(gen: HFCausalLMGenerator, question: str, passage: str, target: str) -> float:
    """log p(target | whole prompt) from one unpadded forward, computed by hand."""
    prompt = gen.tokenizer(gen.prompt(question, [passage]))["input_ids"]
    answer = gen.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    answer = answer + [gen.tokenizer.eos_token_id]
    with torch.no_grad():
        logits = gen.model(input_ids=torch.tensor([prompt + answer])).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)
    return sum(logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(answer))


# -- per-passage reading -------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cached_token_logprobs_equal_uncached(impl):
    gen = frozen(impl)
    queries, passages, targets = batch()
    expected, mask = uncached(gen, "token_logprobs", queries, passages, targets)
    assert len(gen.passage_cache) == 0
    first, first_mask = gen.token_logprobs(queries, passages, targets)
    distinct = len({p for row in passages for p in row})
    assert gen.passage_cache.stats()["misses"] == 9 and len(gen.passage_cache) == distinct
    again, _ = gen.token_logprobs(queries, passages, targets)
    assert gen.passage_cache.hits == 9  # the second call reads no passage
    assert torch.equal(first_mask, mask)
    torch.testing.assert_close(first, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cached_loglik_equals_a_hand_computed_forward(impl):
    gen = frozen(impl)
    queries, passages, targets = batch()
    gen.loglik(queries, passages, targets)  # fill the cache
    got = gen.loglik(queries, passages, targets)
    for b, row in enumerate(passages):
        for k, passage in enumerate(row):
            want = reference_loglik(gen, queries[b], passage, targets[b])
            assert got[b, k].item() == pytest.approx(want, abs=1e-4)


def test_a_question_first_template_is_never_cached():
    gen = frozen(prompt_template="Question: {question}\nContext: {passage}\nAnswer:")
    queries, passages, targets = batch()
    got = gen.loglik(queries, passages, targets)
    assert len(gen.passage_cache) == 0
    want = reference_loglik(gen, queries[1], passages[1][2], targets[1])
    assert got[1, 2].item() == pytest.approx(want, abs=1e-4)


def test_a_trainable_generator_is_never_cached():
    gen = frozen(freeze=False)
    queries, passages, targets = batch()
    gen.loglik(queries, passages, targets).sum().backward()
    assert not gen.cache_active and len(gen.passage_cache) == 0
    assert gen.model.lm_head.weight.grad is not None


def test_passage_cache_mb_zero_switches_it_off():
    gen = frozen(passage_cache_mb=0)
    assert gen.passage_cache is None and not gen.cache_active


# -- joint reading (G-Rerank) --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cached_joint_reading_equals_uncached_in_value_and_gradient(impl):
    gen = frozen(impl)
    queries, passages, targets = batch()
    torch.manual_seed(0)
    log_mask = torch.randn(3, 3).clamp_max(0).requires_grad_()
    expected = uncached(gen, "loglik_joint", queries, passages, targets, log_mask)
    (want,) = torch.autograd.grad(expected.sum(), log_mask)
    for _ in range(2):  # cold, then every passage from the cache
        got = gen.loglik_joint(queries, passages, targets, log_mask)
        (grad,) = torch.autograd.grad(got.sum(), log_mask)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-4)
    assert gen.passage_cache.hits == 9
    assert want.abs().min() > 0  # every passage's bias matters


def test_per_passage_and_joint_reading_share_entries():
    gen = frozen()
    queries, passages, targets = batch()
    gen.loglik(queries, passages, targets)
    misses = gen.passage_cache.misses
    gen.loglik_joint(queries, passages, targets, torch.zeros(3, 3))
    assert gen.passage_cache.misses == misses


# -- invalidation and budget ---------------------------------------------------------


def test_a_weight_change_invalidates_the_cache():
    gen = frozen()
    queries, passages, targets = batch()
    before = gen.loglik(queries, passages, targets)
    torch.manual_seed(0)
    with torch.no_grad():  # in place, as an optimizer step would: new passage values
        for layer in gen.model.model.layers:
            layer.self_attn.v_proj.weight.normal_(0, 1)
    after = gen.loglik(queries, passages, targets)
    assert gen.passage_cache.invalidations == 1
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, uncached(gen, "loglik", queries, passages, targets))


def test_loading_weights_invalidates_the_cache():
    gen, other = frozen(), frozen(seed=1)
    queries, passages, targets = batch()
    gen.loglik(queries, passages, targets)
    gen.model.load_state_dict(other.model.state_dict())
    got = gen.loglik(queries, passages, targets)
    assert gen.passage_cache.invalidations == 1
    torch.testing.assert_close(got, other.loglik(queries, passages, targets), atol=TOL, rtol=0)


def fake_states(tokens: int) -> PassageStates:
    """One layer, one head, head_dim 4, float32: 32 bytes per token."""
    return PassageStates((torch.zeros(1, tokens, 4),), (torch.zeros(1, tokens, 4),))


def test_lru_budget_evicts_the_least_recently_used():
    model = torch.nn.Linear(2, 2)
    cache = PassageCache(budget_bytes=32 * 25)  # 25 tokens
    computed: list[list[int]] = []

    def compute(rows):
        computed.extend(rows)
        return [fake_states(len(r)) for r in rows]

    a, b, c = [1] * 10, [2] * 10, [3] * 10
    cache.states(model, [a, b], compute)
    cache.states(model, [a], compute)  # a is now the most recently used
    got = cache.states(model, [c, c], compute)  # c computed once, evicts b
    assert [len(s.keys[0][0]) for s in got] == [10, 10]
    assert a in cache and c in cache and b not in cache
    assert cache.evictions == 1 and cache.bytes == 32 * 20 <= cache.budget_bytes
    assert computed == [a, b, c]
    assert len(cache.states(model, [[4] * 30], compute)) == 1  # too big: served, not kept
    assert [4] * 30 not in cache and cache.bytes == 32 * 20


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_small_budget_still_scores_exactly(impl):
    gen = frozen(impl, passage_cache_mb=0.01)  # ~10 kB: two or three tiny passages
    queries, passages, targets = batch()
    expected = uncached(gen, "loglik_joint", queries, passages, targets, torch.zeros(3, 3))
    for _ in range(2):
        got = gen.loglik_joint(queries, passages, targets, torch.zeros(3, 3))
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert gen.passage_cache.evictions > 0
    assert gen.passage_cache.bytes <= gen.passage_cache.budget_bytes


def test_bfloat16_storage_halves_memory_and_stays_close():
    exact, half = frozen(), frozen(passage_cache_dtype="bfloat16")
    queries, passages, targets = batch()
    want = exact.loglik(queries, passages, targets)
    got = half.loglik(queries, passages, targets)
    assert half.passage_cache.bytes * 2 == exact.passage_cache.bytes
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)
