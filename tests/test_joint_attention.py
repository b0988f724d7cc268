"""Reading K passages at once: the decoder-only joint forward (parallel-encoded passages
under a 4-D additive mask) and Fusion-in-Decoder for encoder-decoder models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from latentrag.plugins.joint_attention import (
    FID_TEMPLATE,
    LOG_ZERO,
    PAD_SEGMENT,
    JointPrompt,
    _fid_encoder_inputs,
    _fid_labels,
    build_layout,
    fid_loglik,
    joint_attention_mask,
    joint_forward,
    joint_logits,
    joint_loglik,
)
from latentrag.toy.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

WORDS = ["cats", "dogs", "birds", "fish", "sleep", "bark", "sing", "swim", "red", "blue", "green"]
PROMPT = JointPrompt(passage="passage {passage}", question=" question {question} answer")
IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(WORDS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(tokenizer, impl="sdpa", dtype=torch.float32):
    return tiny_llama(tokenizer, hidden=32, layers=2, attn_implementation=impl).to(dtype)


QUERIES = ["what do cats do", "which fish swim"]
PASSAGES = [
    ["cats sleep", "dogs bark at the birds", "red fish"],
    ["birds sing", "fish swim in the blue", "green"],
]
TARGETS = ["sleep", "fish swim"]


def naive_mask(layout, doc_log_mask):
    """The mask of the module docstring, entry by entry (reference for the vectorised one)."""
    batch, length = layout.segments.shape
    tail = layout.num_passages
    blocked = torch.finfo(torch.float32).min
    mask = torch.full((batch, 1, length, length), blocked)
    for b in range(batch):
        seg = layout.segments[b].tolist()
        for i in range(length):
            for j in range(length):
                if seg[i] == PAD_SEGMENT:
                    mask[b, 0, i, j] = 0.0 if i == j else blocked
                elif seg[j] == PAD_SEGMENT:
                    continue
                elif seg[i] == seg[j] and j <= i:
                    mask[b, 0, i, j] = 0.0
                elif seg[i] == tail and seg[j] != tail:
                    mask[b, 0, i, j] = doc_log_mask[b, seg[j]]
    return mask


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_one_passage_equals_the_plain_causal_forward(tokenizer, impl, build):
    model = build(tokenizer, attn_implementation=impl)
    logits, layout = joint_logits(
        model, tokenizer, ["what do cats do"], [["cats sleep"]], ["sleep"]
    )
    plain = model(input_ids=layout.input_ids).logits
    assert layout.position_ids.tolist() == [list(range(layout.input_ids.shape[1]))]
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_unit_mask_equals_the_structural_mask_without_bias(tokenizer, impl):
    model = llama(tokenizer, impl)
    layout = build_layout(tokenizer, QUERIES, PASSAGES, TARGETS, PROMPT)
    zeros = torch.zeros(2, 3)
    built = joint_attention_mask(layout, zeros)
    assert torch.equal(built, naive_mask(layout, zeros))
    with_unit_mask = joint_forward(model, layout, zeros)
    reference = model(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        attention_mask=naive_mask(layout, zeros),
    ).logits
    torch.testing.assert_close(with_unit_mask, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(joint_forward(model, layout, None), reference, atol=1e-5, rtol=0)


def test_mask_entries_carry_the_document_bias(tokenizer):
    layout = build_layout(tokenizer, QUERIES, PASSAGES, TARGETS, PROMPT)
    bias = torch.tensor([[-0.5, -1.0, -2.0], [-3.0, -4.0, -5.0]])
    assert torch.equal(joint_attention_mask(layout, bias), naive_mask(layout, bias))
    seg = layout.segments[0]
    last = layout.input_ids.shape[1] - 1  # an answer token of example 0
    row = joint_attention_mask(layout, bias)[0, 0, last]
    for k in range(3):
        assert torch.all(row[seg == k] == bias[0, k])
    assert torch.all(row[seg == 3] == 0.0)


def test_passages_are_encoded_in_parallel_from_position_zero(tokenizer):
    model = llama(tokenizer)
    logits, layout = joint_logits(model, tokenizer, QUERIES, PASSAGES, TARGETS, prompt=PROMPT)
    for b in range(2):
        for k, text in enumerate(PASSAGES[b]):
            alone, alone_layout = joint_logits(
                model,
                tokenizer,
                [""],
                [[text]],
                [""],
                prompt=JointPrompt(passage="passage {passage}"),
            )
            where = layout.segments[b] == k
            length = int(where.sum())
            assert layout.position_ids[b, where].tolist() == list(range(length))
            torch.testing.assert_close(logits[b, where], alone[0, :length], atol=1e-5, rtol=0)


def test_question_continues_from_the_longest_passage(tokenizer):
    layout = build_layout(tokenizer, QUERIES, PASSAGES, TARGETS, PROMPT)
    for b in range(2):
        seg, pos = layout.segments[b], layout.position_ids[b]
        longest = max(int((seg == k).sum()) for k in range(3))
        assert pos[seg == 3].tolist() == list(range(longest, longest + int((seg == 3).sum())))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_masked_passage_text_does_not_matter(tokenizer, impl):
    model = llama(tokenizer, impl)
    log_mask = torch.tensor([[0.0, LOG_ZERO, 0.0]])
    query, target = ["what do cats do"], ["sleep"]
    base = ["cats sleep in the sun", "dogs bark", "birds sing"]
    variants = [
        ["cats sleep in the sun", "fish swim", "birds sing"],  # same length
        ["cats sleep in the sun", "red", "birds sing"],  # shorter
        ["cats sleep in the sun", "green fish swim in blue", "birds sing"],  # longer, not longest
    ]
    reference = joint_loglik(model, tokenizer, query, [base], target, log_mask, PROMPT)
    for passages in variants:
        changed = joint_loglik(model, tokenizer, query, [passages], target, log_mask, PROMPT)
        torch.testing.assert_close(changed, reference, atol=1e-4, rtol=0)
        # the same change is visible when the passage is not masked out
        open_mask = torch.zeros(1, 3)
        seen = joint_loglik(model, tokenizer, query, [passages], target, open_mask, PROMPT)
        unseen = joint_loglik(model, tokenizer, query, [base], target, open_mask, PROMPT)
        assert abs(float((seen - unseen).detach())) > 1e-4
    # a masked passage that becomes the longest still moves the question's positions
    longest = ["cats sleep in the sun", "dogs bark at red and blue and green birds", "birds sing"]
    moved = joint_loglik(model, tokenizer, query, [longest], target, log_mask, PROMPT)
    assert abs(float((moved - reference).detach())) > 1e-6


def test_batch_equals_one_example_at_a_time(tokenizer):
    model = llama(tokenizer)
    log_mask = torch.tensor([[0.0, -1.0, -3.0], [-0.2, 0.0, LOG_ZERO]])
    batched = joint_loglik(model, tokenizer, QUERIES, PASSAGES, TARGETS, log_mask, PROMPT)
    for b in range(2):
        alone = joint_loglik(
            model,
            tokenizer,
            QUERIES[b : b + 1],
            PASSAGES[b : b + 1],
            TARGETS[b : b + 1],
            log_mask[b : b + 1],
            PROMPT,
        )
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=0)


def test_loglik_is_the_sum_of_the_answer_token_logprobs(tokenizer):
    model = llama(tokenizer)
    logits, layout = joint_logits(model, tokenizer, QUERIES, PASSAGES, TARGETS, prompt=PROMPT)
    logprobs = torch.log_softmax(logits, -1)
    expected = []
    for b in range(2):
        positions = layout.answer[b].nonzero().flatten().tolist()
        ids = layout.input_ids[b]
        expected.append(sum(logprobs[b, t - 1, ids[t]].item() for t in positions))
    got = joint_loglik(model, tokenizer, QUERIES, PASSAGES, TARGETS, None, PROMPT)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    eos = tokenizer.eos_token_id
    assert layout.input_ids[0, -1] == eos and int(layout.answer[0].sum()) == 2  # "sleep" </s>


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradient_in_the_log_mask_matches_finite_differences(tokenizer, impl):
    # GPT-2 in float64 (Llama's RMSNorm and eager softmax compute in float32 whatever the dtype)
    model = tiny_gpt2(tokenizer, attn_implementation=impl).double()
    log_mask = torch.tensor([[-0.3, -1.2, 0.0], [-2.0, -0.1, -0.7]], dtype=torch.float64)
    log_mask.requires_grad_(True)

    def loglik(mask):
        return joint_loglik(model, tokenizer, QUERIES, PASSAGES, TARGETS, mask, PROMPT)

    assert torch.autograd.gradcheck(loglik, (log_mask,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_llama_gradient_in_the_log_mask_matches_central_differences(tokenizer, impl):
    model = llama(tokenizer, impl)
    log_mask = torch.tensor([[-0.3, -1.2, 0.0], [-2.0, -0.1, -0.7]], requires_grad=True)

    def total(mask):
        return joint_loglik(model, tokenizer, QUERIES, PASSAGES, TARGETS, mask, PROMPT).sum()

    total(log_mask).backward()
    eps = 1e-2
    numeric = torch.zeros_like(log_mask)
    with torch.no_grad():
        for index in np.ndindex(*log_mask.shape):
            step = torch.zeros_like(log_mask)
            step[index] = eps
            numeric[index] = (total(log_mask + step) - total(log_mask - step)) / (2 * eps)
    assert log_mask.grad.abs().max() > 1e-3  # the check below is not vacuous
    torch.testing.assert_close(log_mask.grad, numeric, atol=2e-4, rtol=2e-2)


def test_eager_and_sdpa_agree_in_value_and_gradient(tokenizer):
    results = []
    for impl in IMPLEMENTATIONS:
        log_mask = torch.tensor([[-0.3, -1.2, 0.0], [-2.0, -0.1, -0.7]], requires_grad=True)
        value = joint_loglik(
            llama(tokenizer, impl), tokenizer, QUERIES, PASSAGES, TARGETS, log_mask, PROMPT
        )
        value.sum().backward()
        results.append((value.detach(), log_mask.grad))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_prompt_from_a_generator_template():
    prompt = JointPrompt.from_template("Context: {passage}\nQuestion: {question}\nAnswer:", 7)
    assert prompt.passage == "Context: {passage}"
    assert prompt.question == "\nQuestion: {question}\nAnswer:"
    assert prompt.max_passage_tokens == 7
    with pytest.raises(ValueError, match="before"):
        JointPrompt.from_template("Question: {question} Context: {passage}")


def test_passages_are_truncated_to_max_passage_tokens(tokenizer):
    prompt = JointPrompt(passage="{passage}", max_passage_tokens=2, passage_bos=False)
    layout = build_layout(tokenizer, ["q"], [["cats sleep in the sun", "dogs"]], ["a"], prompt)
    seg = layout.segments[0]
    assert int((seg == 0).sum()) == 2 and int((seg == 1).sum()) == 1


def test_unequal_passage_counts_are_refused(tokenizer):
    with pytest.raises(ValueError, match="same number of passages"):
        build_layout(tokenizer, ["a", "b"], [["x"], ["y", "z"]], ["1", "2"])


# -- Fusion-in-Decoder (encoder-decoder models) -----------------------------------------


@pytest.fixture(scope="module")
def tiny_t5(tokenizer):
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T5ForConditionalGeneration(config).eval()


FID_PASSAGES = [["cats sleep", "dogs bark at the birds"], ["fish swim", "red"]]


def reference_fid_loglik(model, tokenizer, queries, passages, targets):
    """FiD by hand with the model's own 0/1 encoder mask (no document bias)."""
    ids, mask = _fid_encoder_inputs(tokenizer, queries, passages, FID_TEMPLATE, None)
    batch, k, width = ids.shape
    encoded = model.get_encoder()(
        input_ids=ids.view(batch * k, width), attention_mask=mask.view(batch * k, width)
    ).last_hidden_state
    labels = _fid_labels(tokenizer, targets)
    logits = model(
        encoder_outputs=(encoded.reshape(batch, k * width, -1),),
        attention_mask=mask.view(batch, k * width),
        labels=labels,
    ).logits
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return torch.where(labels >= 0, picked, 0.0).sum(-1)


def test_fid_with_a_unit_mask_equals_the_plain_fid_forward(tokenizer, tiny_t5):
    got = fid_loglik(tiny_t5, tokenizer, QUERIES, FID_PASSAGES, TARGETS, torch.zeros(2, 2))
    expected = reference_fid_loglik(tiny_t5, tokenizer, QUERIES, FID_PASSAGES, TARGETS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fid_masked_passage_text_does_not_matter(tokenizer, tiny_t5):
    log_mask = torch.tensor([[0.0, LOG_ZERO], [0.0, LOG_ZERO]])
    changed = [["cats sleep", "fish"], ["fish swim", "green birds sing in the blue"]]
    base = fid_loglik(tiny_t5, tokenizer, QUERIES, FID_PASSAGES, TARGETS, log_mask)
    other = fid_loglik(tiny_t5, tokenizer, QUERIES, changed, TARGETS, log_mask)
    torch.testing.assert_close(other, base, atol=1e-4, rtol=0)
    seen = fid_loglik(tiny_t5, tokenizer, QUERIES, changed, TARGETS, torch.zeros(2, 2))
    assert (seen - base).abs().min() > 1e-4


def test_fid_gradient_in_the_log_mask_matches_central_differences(tokenizer, tiny_t5):
    log_mask = torch.tensor([[-0.3, -1.2], [-2.0, -0.1]], requires_grad=True)

    def total(mask):
        return fid_loglik(tiny_t5, tokenizer, QUERIES, FID_PASSAGES, TARGETS, mask).sum()

    total(log_mask).backward()
    eps = 1e-2
    numeric = torch.zeros_like(log_mask)
    with torch.no_grad():
        for index in np.ndindex(*log_mask.shape):
            step = torch.zeros_like(log_mask)
            step[index] = eps
            numeric[index] = (total(log_mask + step) - total(log_mask - step)) / (2 * eps)
    assert log_mask.grad.abs().max() > 1e-3
    torch.testing.assert_close(log_mask.grad, numeric, atol=2e-4, rtol=2e-2)
