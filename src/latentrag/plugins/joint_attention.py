"""Reading K passages at once with a decoder-only LM: parallel encoding under a 4-D mask.

The sequence of example b is ``[passage_1][passage_2]...[passage_K][question][answer]``,
left-padded to the batch's longest. Every passage is encoded as if it started the text
(its position ids restart at 0, it sees only itself, causally); the question and answer
continue from the longest passage's length and see themselves causally and every
passage token of passage i with the additive bias ``doc_log_mask[b, i]`` (= log m_i).
That bias is how G-Rerank's document-wise mask enters the generator. With log m_j =
LOG_ZERO passage j's text no longer matters, except through its length when it is the
longest passage (the question's positions start after the longest one).

transformers passes a 4-D float ``attention_mask`` [B,1,L,L] to the attention unchanged
(eager and sdpa alike), so the mask built here is added to the attention scores as is.

Encoder-decoder models (T5) read the passages Fusion-in-Decoder style instead (`fid_loglik`):
the encoder reads each "question + passage" alone, the decoder cross-attends to all K
encodings at once, with log m_k added through a float cross-attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: the log of a masked-out document: finite so that softmax and its gradient stay finite
LOG_ZERO = -1e4

PAD_SEGMENT = -1


@dataclass(frozen=True)
class JointPrompt:
    """How passages, question and answer become text; each piece is tokenized on its own.

    passage_bos: start every passage with the tokens the tokenizer puts at the start of a
    text (BOS for Llama, nothing for GPT-2): each passage is encoded as a text of its own.
    answer_eos: end the answer with EOS (scored like any answer token).
    max_passage_tokens: truncate each passage's text to this many tokens (None: no limit).
    """

    passage: str = "passage: {passage}\n"
    question: str = "question: {question}\nanswer:"
    answer: str = " {answer}"
    passage_bos: bool = True
    answer_eos: bool = True
    max_passage_tokens: int | None = None

    @classmethod
    def from_template(cls, template: str, max_passage_tokens: int | None = None) -> JointPrompt:
        """Split a one-passage prompt template (e.g. the hf-causal-lm generator's
        "Context: {passage}\nQuestion: {question}\nAnswer:") after its passage: what comes
        before and with the passage is repeated per passage, the rest is read once."""
        cut = template.find("{passage}") + len("{passage}")
        if cut < len("{passage}") or template.find("{question}") < cut:
            raise ValueError(f"template {template!r} needs {{passage}} before {{question}}")
        return cls(
            passage=template[:cut],
            question=template[cut:],
            max_passage_tokens=max_passage_tokens,
        )


@dataclass
class JointLayout:
    """The token layout of a batch: all [B,L], left-padded.

    segments: passage index k in [0,K) for passage tokens, K for question and answer
    tokens, -1 for padding. answer: True at answer tokens.
    """

    input_ids: Tensor
    position_ids: Tensor
    segments: Tensor
    answer: Tensor
    num_passages: int

    @property
    def answer_lengths(self) -> Tensor:
        return self.answer.sum(-1)

    def to(self, device: torch.device | str) -> JointLayout:
        tensors = (self.input_ids, self.position_ids, self.segments, self.answer)
        return JointLayout(*(t.to(device) for t in tensors), num_passages=self.num_passages)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _passage_tokens(tokenizer, text: str, prompt: JointPrompt) -> list[int]:
    if prompt.max_passage_tokens is not None:
        text = tokenizer.decode(_tokens(tokenizer, text)[: prompt.max_passage_tokens])
    ids = _tokens(tokenizer, prompt.passage.format(passage=text))
    if prompt.passage_bos:
        ids = tokenizer("")["input_ids"] + ids  # the start-of-text tokens, if any
    return ids


def _example_layout(
    tokenizer, query: str, passages: Sequence[str], target: str, prompt: JointPrompt
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Token ids, positions, segments and answer flags of one example (unpadded)."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for k, text in enumerate(passages):
        tokens = _passage_tokens(tokenizer, text, prompt)
        ids += tokens
        positions += range(len(tokens))
        segments += [k] * len(tokens)
    start = max((p + 1 for p in positions), default=0)  # the longest passage's length
    question = _tokens(tokenizer, prompt.question.format(question=query))
    answer = _tokens(tokenizer, prompt.answer.format(answer=target))
    if prompt.answer_eos and tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    tail = question + answer
    ids += tail
    positions += range(start, start + len(tail))
    segments += [len(passages)] * len(tail)
    is_answer = [False] * (len(ids) - len(answer)) + [True] * len(answer)
    return ids, positions, segments, is_answer


def build_layout(
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    targets: Sequence[str],
    prompt: JointPrompt = JointPrompt(),
) -> JointLayout:
    """Tokenize a batch into the joint layout (K passages per query, all rows the same K)."""
    counts = {len(row) for row in passages}
    if len(counts) != 1:
        raise ValueError(f"every query needs the same number of passages; got {sorted(counts)}")
    rows = [
        _example_layout(tokenizer, q, ps, t, prompt)
        for q, ps, t in zip(queries, passages, targets, strict=True)
    ]
    length = max(len(ids) for ids, *_ in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fills = ((pad_id, torch.long), (0, torch.long), (PAD_SEGMENT, torch.long), (False, torch.bool))
    columns = []
    for field_index, (fill, dtype) in enumerate(fills):
        padded = [[fill] * (length - len(row[0])) + row[field_index] for row in rows]
        columns.append(torch.tensor(padded, dtype=dtype))
    return JointLayout(*columns, num_passages=counts.pop())


def joint_attention_mask(
    layout: JointLayout, doc_log_mask: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The additive attention mask [B,1,L,L]: 0 where allowed, log m_i from the question and
    answer towards passage i, the dtype's minimum elsewhere. Padding rows see themselves
    only (a row with nothing to attend to would make softmax meaningless)."""
    seg = layout.segments
    batch, length = seg.shape
    tail = layout.num_passages
    device = seg.device
    if doc_log_mask is None:
        doc_log_mask = torch.zeros(batch, tail, device=device)
    query_seg, key_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    own_segment = (query_seg == key_seg) & causal & (key_seg != PAD_SEGMENT)
    padding_self = (query_seg == PAD_SEGMENT) & torch.eye(length, dtype=torch.bool, device=device)
    to_passage = (query_seg == tail) & (key_seg != PAD_SEGMENT) & (key_seg != tail)
    key_bias = doc_log_mask.to(device, dtype).gather(1, seg.clamp(0, tail - 1))  # [B,L]
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask = torch.where(to_passage, key_bias[:, None, :], blocked)
    allowed = torch.zeros((), dtype=dtype, device=device)
    mask = torch.where(own_segment | padding_self, allowed, mask)
    return mask.unsqueeze(1)


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def joint_forward(model, layout: JointLayout, doc_log_mask: Tensor | None, keep: int = 0):
    """Run the LM on a layout; `keep` > 0 computes logits for the last `keep` positions only."""
    layout = layout.to(_model_device(model))
    mask = joint_attention_mask(layout, doc_log_mask, _model_dtype(model))
    return model(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        attention_mask=mask,
        logits_to_keep=keep,
        use_cache=False,
    ).logits


def joint_logits(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    targets: Sequence[str],
    doc_log_mask: Tensor | None = None,
    prompt: JointPrompt = JointPrompt(),
) -> tuple[Tensor, JointLayout]:
    """Logits [B,L,V] at every position of the joint layout, and the layout."""
    layout = build_layout(tokenizer, queries, passages, targets, prompt)
    return joint_forward(model, layout, doc_log_mask), layout


def joint_loglik(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    targets: Sequence[str],
    doc_log_mask: Tensor | None = None,
    prompt: JointPrompt = JointPrompt(),
) -> Tensor:
    """Teacher-forced log p(answer_b | question_b, all K passages) summed over the answer
    tokens: [B]. Differentiable in `doc_log_mask` [B,K] (and in the model's parameters)."""
    layout = build_layout(tokenizer, queries, passages, targets, prompt)
    # left padding puts every answer at the end: only the last T+1 positions need logits
    answer_len = int(layout.answer_lengths.max())
    logits = joint_forward(model, layout, doc_log_mask, keep=answer_len + 1)
    # at least float32 (bfloat16 log-probs are too coarse); float64 stays for gradchecks
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    layout = layout.to(logprobs.device)
    target_ids = layout.input_ids[:, -answer_len:]
    scored = logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    is_answer = layout.answer[:, -answer_len:]
    return torch.where(is_answer, scored, torch.zeros_like(scored)).sum(-1)


# -- encoder-decoder models: Fusion-in-Decoder -----------------------------------------

FID_TEMPLATE = "question: {question} context: {passage}"


def _fid_encoder_inputs(
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    template: str,
    max_passage_tokens: int | None,
) -> tuple[Tensor, Tensor]:
    """Right-padded ids and 0/1 mask [B,K,Lp] of "question + passage k", one text per pair."""
    texts = []
    for query, row in zip(queries, passages, strict=True):
        for text in row:
            if max_passage_tokens is not None:
                text = tokenizer.decode(_tokens(tokenizer, text)[:max_passage_tokens])
            texts.append(template.format(question=query, passage=text))
    rows = tokenizer(texts)["input_ids"]
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    shape = (len(queries), len(passages[0]), width)
    return ids.view(shape), mask.view(shape)


def fid_cross_attention_mask(
    encoder_mask: Tensor, doc_log_mask: Tensor | None, decoder_length: int, dtype: torch.dtype
) -> Tensor:
    """The decoder's additive cross-attention mask [B,1,T,K*Lp]: log m_k on passage k's
    tokens, the dtype's minimum on padding."""
    batch, k, width = encoder_mask.shape
    if doc_log_mask is None:
        doc_log_mask = torch.zeros(batch, k, device=encoder_mask.device)
    bias = doc_log_mask.to(encoder_mask.device, dtype)[:, :, None].expand(batch, k, width)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=encoder_mask.device)
    mask = torch.where(encoder_mask.bool(), bias, blocked).reshape(batch, 1, 1, k * width)
    return mask.expand(batch, 1, decoder_length, k * width)


def fid_loglik(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    targets: Sequence[str],
    doc_log_mask: Tensor | None = None,
    template: str = FID_TEMPLATE,
    max_passage_tokens: int | None = None,
) -> Tensor:
    """Fusion-in-Decoder log p(answer_b | question_b, all K passages) [B] for a seq2seq model
    (T5 and the like): the encoder reads each "question + passage" on its own, the decoder
    cross-attends to all K encodings at once with log m_k added towards passage k."""
    device = _model_device(model)
    ids, mask = _fid_encoder_inputs(tokenizer, queries, passages, template, max_passage_tokens)
    batch, k, width = ids.shape
    encoded = model.get_encoder()(
        input_ids=ids.view(batch * k, width).to(device),
        attention_mask=mask.view(batch * k, width).to(device),
    ).last_hidden_state
    fused = encoded.reshape(batch, k * width, -1)
    labels = _fid_labels(tokenizer, targets).to(device)
    cross = fid_cross_attention_mask(mask.to(device), doc_log_mask, labels.shape[1], fused.dtype)
    logits = model(
        encoder_outputs=(fused,), attention_mask=cross, labels=labels, use_cache=False
    ).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    scored = logprobs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels >= 0, scored, torch.zeros_like(scored)).sum(-1)


def _fid_labels(tokenizer, targets: Sequence[str]) -> Tensor:
    """Answer tokens + EOS, right-padded with -100 (ignored)."""
    rows = [_tokens(tokenizer, t) + [tokenizer.eos_token_id] for t in targets]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (width - len(r)) for r in rows])
