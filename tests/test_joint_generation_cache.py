"""G-Rerank inference with a key/value cache. Decoder-only joint generation: the same greedy
tokens as recomputing the whole joint layout for every new token (computed here by hand,
one example at a time), with the model run on one new token per step. Fusion-in-Decoder:
every step's logits equal the uncached decoder's over the same tokens."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.plugins.hf_generator import HFGeneratorConfig
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.plugins.joint_attention import (
    FID_TEMPLATE,
    LOG_ZERO,
    JointLayout,
    JointPrompt,
    example_pieces,
    fid_cross_attention_mask,
    fid_encode,
    fid_generate,
    joint_forward,
    joint_generate_ids,
)
from latentrag.testing import toy_corpus, toy_examples
from latentrag.toy.tiny_models import tiny_t5, tiny_tokenizer

MASKS = {
    "all": [[0.0, 0.0, 0.0]] * 3,
    "top-1": [[0.0, LOG_ZERO, LOG_ZERO], [LOG_ZERO, 0.0, LOG_ZERO], [LOG_ZERO, LOG_ZERO, 0.0]],
    "top-2": [[0.0, 0.0, LOG_ZERO], [LOG_ZERO, 0.0, 0.0], [0.0, LOG_ZERO, 0.0]],
    "soft": [[0.0, -1.0, -3.0], [-0.5, 0.0, -2.0], [-4.0, -0.2, 0.0]],
}


@pytest.fixture(scope="module")
def generator():
    config = HFGeneratorConfig(model="tiny-llama", max_passage_tokens=24)
    return HFCausalLMGenerator(config)


def batch():
    """3 questions x K=3 passages of different lengths (so the rows are padded)."""
    corpus, examples = toy_corpus(), [toy_examples()[i] for i in (0, 6, 9)]
    passages = [[corpus[i].text, corpus[i + 4].text, "short"] for i in range(3)]
    return [e.question for e in examples], passages


def prompt_of(generator) -> JointPrompt:
    return JointPrompt.from_template(
        generator.config.prompt_template, generator.config.max_passage_tokens
    )


def recomputed_answer(generator, query, passages, log_mask, steps: int, stops) -> list[int]:
    """Greedy tokens of one example, the whole unpadded joint layout (passages from position
    0 each, question and answer after the longest) run again for every new token."""
    bare = JointPrompt(**{**prompt_of(generator).__dict__, "answer": "", "answer_eos": False})
    pieces = example_pieces(generator.tokenizer, query, passages, "", bare)
    answer: list[int] = []
    for _ in range(steps):
        ids, positions, segments = [], [], []
        for k, tokens in enumerate(pieces.passages):
            ids += tokens
            positions += range(len(tokens))
            segments += [k] * len(tokens)
        start = max(len(t) for t in pieces.passages)
        tail = pieces.question + answer
        ids += tail
        positions += range(start, start + len(tail))
        segments += [len(passages)] * len(tail)
        layout = JointLayout(
            torch.tensor([ids]),
            torch.tensor([positions]),
            torch.tensor([segments]),
            torch.zeros(1, len(ids), dtype=torch.bool),
            num_passages=len(passages),
        )
        with torch.no_grad():
            logits = joint_forward(generator.model, layout, log_mask[None], keep=1)
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        answer.append(token)
    return answer


def cached_answers(generator, queries, passages, log_mask, steps: int, stops):
    return joint_generate_ids(
        generator.model,
        generator.tokenizer,
        queries,
        passages,
        log_mask,
        prompt_of(generator),
        steps,
        stops,
    )


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_cached_generation_equals_recomputing_every_token(generator, mask, one_thread):
    queries, passages = batch()
    log_mask = torch.tensor(MASKS[mask])
    stops = [generator.tokenizer.eos_token_id]
    cached = cached_answers(generator, queries, passages, log_mask, 8, stops)
    for b in range(3):
        expected = recomputed_answer(generator, queries[b], passages[b], log_mask[b], 8, stops)
        assert len(expected) >= 6  # long enough for the cache to matter
        assert cached[b] == expected, (mask, b)


def test_rows_that_stop_early_leave_the_others_unchanged(generator, one_thread):
    queries, passages = batch()
    log_mask = torch.tensor(MASKS["top-1"])
    eos = generator.tokenizer.eos_token_id
    first = recomputed_answer(generator, queries[0], passages[0], log_mask[0], 8, [eos])
    stops = [eos, first[3]]  # row 0 stops after 3 tokens
    cached = cached_answers(generator, queries, passages, log_mask, 8, stops)
    expected = [
        recomputed_answer(generator, queries[b], passages[b], log_mask[b], 8, stops)
        for b in range(3)
    ]
    assert cached == expected
    assert len(cached[0]) == 3 and max(len(a) for a in cached) >= 6


def test_masks_change_the_answers(generator, one_thread):
    """The comparison above is not vacuous: the mask decides what is generated."""
    queries, passages = batch()
    stops = [generator.tokenizer.eos_token_id]
    answers = {
        name: cached_answers(generator, queries, passages, torch.tensor(m), 8, stops)
        for name, m in MASKS.items()
    }
    assert len({str(a) for a in answers.values()}) == len(MASKS)


def forward_lengths(model) -> tuple[list[int], object]:
    """A record of the input length of every forward of `model`, and the hook's handle."""
    lengths: list[int] = []

    def spy(module, args, kwargs):
        lengths.append(int(kwargs["input_ids"].shape[1]))

    return lengths, model.register_forward_pre_hook(spy, with_kwargs=True)


def test_each_step_runs_one_new_token(generator, one_thread):
    queries, passages = batch()
    log_mask = torch.tensor(MASKS["top-2"])
    lengths, handle = forward_lengths(generator.model)
    try:
        answers = cached_answers(generator, queries, passages, log_mask, 12, [])
    finally:
        handle.remove()
    longest = max(len(a) for a in answers)
    assert longest == 12  # no stop token: 12 tokens, the last from the 12th forward
    assert len(lengths) == 12
    assert lengths[0] > 40  # the passages and the question, once
    assert lengths[1:] == [1] * 11


def test_generate_joint_uses_the_cache_and_restores_the_mode(generator, one_thread):
    queries, passages = batch()
    generator.model.train()
    lengths, handle = forward_lengths(generator.model)
    try:
        texts = generator.generate_joint(queries, passages, torch.tensor(MASKS["top-1"]), 6)
    finally:
        handle.remove()
        training = generator.model.training
        generator.model.eval()
    assert training and len(texts) == 3
    assert lengths[1:] == [1] * (len(lengths) - 1)


# -- Fusion-in-Decoder (encoder-decoder) generation ------------------------------------------


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_fid_cached_decoding_equals_the_full_decoder_at_every_step(mask, one_thread):
    """Each step's logits (the whole distribution, not only its argmax) equal those of one
    uncached decoder pass over all the tokens fed so far; each step feeds one token."""
    tokenizer = tiny_tokenizer()
    model = tiny_t5(tokenizer, seed=2)
    queries, passages = batch()
    log_mask = torch.tensor(MASKS[mask])
    fed, logits = [], []

    def before(module, args, kwargs):
        fed.append(kwargs["decoder_input_ids"])

    def after(module, args, kwargs, output):
        logits.append(output.logits[:, -1])

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        answers = fid_generate(model, tokenizer, queries, passages, log_mask, 8, FID_TEMPLATE)
    finally:
        for handle in handles:
            handle.remove()
    assert len(fed) == 8 and all(step.shape == (3, 1) for step in fed)
    assert len(answers) == 3
    fused, encoder_mask = fid_encode(model, tokenizer, queries, passages, FID_TEMPLATE)
    decoder_ids = torch.cat(fed, dim=1)  # [start, t1, ..., t7]
    cross = fid_cross_attention_mask(encoder_mask, log_mask, 8, fused.dtype)
    with torch.no_grad():
        full = model(
            encoder_outputs=(fused,),
            attention_mask=cross,
            decoder_input_ids=decoder_ids,
            use_cache=False,
        ).logits
    torch.testing.assert_close(torch.stack(logits, dim=1), full, rtol=1e-5, atol=1e-5)
    assert torch.equal(full[:, :-1].argmax(-1), decoder_ids[:, 1:])  # greedy, fed back
