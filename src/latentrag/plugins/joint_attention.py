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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class ExamplePieces:
    """One example's tokens, each piece tokenized on its own: the K passages (each with its
    start-of-text tokens), the question part of the prompt and the answer (EOS included)."""

    passages: list[list[int]]
    question: list[int]
    answer: list[int]


def example_pieces(
    tokenizer, query: str, passages: Sequence[str], target: str, prompt: JointPrompt
) -> ExamplePieces:
    """The token pieces of one example (what both the joint layout and a passage-state
    cache read, so that they see the same tokens)."""
    answer = _tokens(tokenizer, prompt.answer.format(answer=target))
    if prompt.answer_eos and tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return ExamplePieces(
        passages=[_passage_tokens(tokenizer, text, prompt) for text in passages],
        question=_tokens(tokenizer, prompt.question.format(question=query)),
        answer=answer,
    )


def _example_layout(
    tokenizer, query: str, passages: Sequence[str], target: str, prompt: JointPrompt
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Token ids, positions, segments and answer flags of one example (unpadded)."""
    pieces = example_pieces(tokenizer, query, passages, target, prompt)
    ids: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for k, tokens in enumerate(pieces.passages):
        ids += tokens
        positions += range(len(tokens))
        segments += [k] * len(tokens)
    start = max((p + 1 for p in positions), default=0)  # the longest passage's length
    tail = pieces.question + pieces.answer
    ids += tail
    positions += range(start, start + len(tail))
    segments += [len(passages)] * len(tail)
    is_answer = [False] * (len(ids) - len(pieces.answer)) + [True] * len(pieces.answer)
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


# -- reading after precomputed passage states ------------------------------------------


@dataclass(frozen=True)
class PassageStates:
    """The key/value states of one passage read alone from position 0: keys[l] and
    values[l] [heads, P, head_dim] for each layer l. Under causal attention nothing after
    the passage changes them, so a frozen model can reuse them for any question."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, dtype: torch.dtype) -> PassageStates:
        return PassageStates(
            tuple(t.to(dtype) for t in self.keys), tuple(t.to(dtype) for t in self.values)
        )


#: rows of token ids -> their PassageStates (a cache, or `passage_states` itself)
StatesFn = Callable[[list[list[int]]], list[PassageStates]]


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return set(inspect.signature(base.forward).parameters)


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep`."""
    return "logits_to_keep" in _forward_parameters(model)


def _cache_keyword(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _cache_layers(output) -> list[tuple[Tensor, Tensor]]:
    cache = getattr(output, "cache", None) or output.past_key_values
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def passage_states(
    model, rows: Sequence[Sequence[int]], pad_id: int = 0, batch_size: int = 16
) -> list[PassageStates]:
    """The states of each non-empty row of token ids read alone from position 0, in
    right-padded batches of similar lengths (padding after a row cannot change it)."""
    if any(len(row) == 0 for row in rows):
        raise ValueError("passage_states: every row needs at least one token")
    device = _model_device(model)
    extra = {"logits_to_keep": 1} if keeps_logits(model) else {}
    found: list[PassageStates | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **extra
        )
        layers = _cache_layers(out)
        for j, i in enumerate(chunk):
            n = len(rows[i])  # clone: a slice would keep the whole batch's tensor alive
            keys = tuple(k[j, :, :n].clone() for k, _ in layers)
            found[i] = PassageStates(keys, tuple(v[j, :, :n].clone() for _, v in layers))
    return found  # type: ignore[return-value]


def _stack_past(
    states: Sequence[Sequence[PassageStates]], dtype: torch.dtype, device: torch.device
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Per layer (keys, values) [n, heads, W, head_dim]: each row's passages one after the
    other, left-padded to the longest row; and the key segments [n, W] (passage k, or
    PAD_SEGMENT on padding)."""
    lengths = [sum(s.length for s in row) for row in states]
    width = max(lengths)
    segments = torch.full((len(states), width), PAD_SEGMENT, dtype=torch.long)
    for r, (row, n) in enumerate(zip(states, lengths)):
        sizes = torch.tensor([s.length for s in row])
        segments[r, width - n :] = torch.repeat_interleave(torch.arange(len(row)), sizes)
    past = []
    for layer in range(len(states[0][0].keys)):
        pair = []
        for field in ("keys", "values"):
            heads, _, dim = getattr(states[0][0], field)[layer].shape
            out = torch.zeros((len(states), heads, width, dim), dtype=dtype, device=device)
            for r, (row, n) in enumerate(zip(states, lengths)):
                offset = width - n
                for s in row:
                    out[r, :, offset : offset + s.length] = getattr(s, field)[layer]
                    offset += s.length
            pair.append(out)
        past.append((pair[0], pair[1]))
    return past, segments.to(device)


def _tail_mask(
    segments: Tensor, doc_log_mask: Tensor | None, tail: int, dtype: torch.dtype
) -> Tensor:
    """The additive mask [n,1,S,W+S] of S tail tokens over W cached passage keys then the
    tail itself: log m_k towards passage k (0 without a mask), causal within the tail, the
    dtype's minimum on padding and the future."""
    device = segments.device
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    if doc_log_mask is None:
        bias = torch.zeros(segments.shape, dtype=dtype, device=device)
    else:
        last = doc_log_mask.shape[1] - 1
        bias = doc_log_mask.to(device, dtype).gather(1, segments.clamp(0, last))
    past = torch.where(segments >= 0, bias, blocked)[:, None, None, :]
    causal = torch.ones(tail, tail, dtype=torch.bool, device=device).tril()
    own = torch.where(causal, torch.zeros((), dtype=dtype, device=device), blocked)
    batch = segments.shape[0]
    return torch.cat([past.expand(batch, 1, tail, -1), own.expand(batch, 1, tail, tail)], dim=-1)


def pick_target_logprobs(logits: Tensor, target: Tensor, target_mask: Tensor) -> Tensor:
    """log p of each target token [n, T] from the logits predicting it [n, T, V]; 0 on
    padding. At least float32 (bfloat16 log-probs are too coarse); float64 is kept."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, target[..., None]).squeeze(-1)
    return picked.masked_fill(~target_mask, 0.0)


def read_after_passages(
    model,
    states: Sequence[Sequence[PassageStates]],
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    doc_log_mask: Tensor | None = None,
    pad_id: int = 0,
) -> Tensor:
    """log p(target token | passages, prompt, earlier target tokens) [n, T], 0 past each
    target, for rows whose passages are given as cached states: the prompt and target
    tokens continue from the longest passage's length (positions restart per passage, as
    in the joint layout) and see every passage k with the bias doc_log_mask[:, k].

    Only the prompt and target tokens are computed; the states are constants, so the
    gradient reaches `doc_log_mask` (and the model's parameters through the tail)."""
    from transformers import DynamicCache

    if any(not p for p in prompts) or any(not t for t in targets):
        raise ValueError("read_after_passages: every prompt and target needs a token")
    device, dtype = _model_device(model), _model_dtype(model)
    past, segments = _stack_past(states, dtype, device)
    tails = [list(p) + list(t[:-1]) for p, t in zip(prompts, targets, strict=True)]
    width = max(len(t) for t in tails)
    ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
    for r, row in enumerate(tails):
        ids[r, : len(row)] = torch.tensor(row)
    starts = torch.tensor([max(s.length for s in row) for row in states])
    positions = starts[:, None] + torch.arange(width)[None, :]
    t_width = max(len(t) for t in targets)
    target = torch.zeros((len(targets), t_width), dtype=torch.long)
    for r, row in enumerate(targets):
        target[r, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(t) for t in targets])
    steps = torch.minimum(torch.arange(t_width)[None, :], lengths[:, None] - 1)
    keep = torch.tensor([len(p) - 1 for p in prompts])[:, None] + steps  # [n, T]
    mask = _tail_mask(segments, doc_log_mask, width, dtype)
    common = dict(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        attention_mask=mask,
        use_cache=True,
    )
    common[_cache_keyword(model)] = DynamicCache(ddp_cache_data=past)
    if keeps_logits(model):
        logits = model(**common, logits_to_keep=keep.to(device)).logits
    else:
        logits = model(**common).logits.take_along_dim(keep.to(device)[..., None], dim=1)
    target_mask = torch.arange(t_width)[None, :] < lengths[:, None]
    return pick_target_logprobs(logits, target.to(device), target_mask.to(device))


def joint_loglik_cached(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    targets: Sequence[str],
    doc_log_mask: Tensor | None = None,
    prompt: JointPrompt = JointPrompt(),
    states_of: StatesFn | None = None,
) -> Tensor:
    """`joint_loglik` with each passage's states taken from `states_of` (e.g. a cache of
    a frozen model's; default: computed here) and only the question and answer tokens run:
    equal to `joint_loglik` within float tolerance, in value and in gradient to
    `doc_log_mask`. Falls back to `joint_loglik` when a question or answer has no token."""
    counts = {len(row) for row in passages}
    if len(counts) != 1:
        raise ValueError(f"every query needs the same number of passages; got {sorted(counts)}")
    pieces = [
        example_pieces(tokenizer, q, ps, t, prompt)
        for q, ps, t in zip(queries, passages, targets, strict=True)
    ]
    if any(not p.question or not p.answer or not all(p.passages) for p in pieces):
        return joint_loglik(model, tokenizer, queries, passages, targets, doc_log_mask, prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if states_of is None:
        states_of = lambda rows: passage_states(model, rows, pad_id)  # noqa: E731
    k = counts.pop()
    flat = states_of([ids for p in pieces for ids in p.passages])
    rows = [flat[b * k : (b + 1) * k] for b in range(len(pieces))]
    logprobs = read_after_passages(
        model, rows, [p.question for p in pieces], [p.answer for p in pieces], doc_log_mask, pad_id
    )
    return logprobs.sum(-1)


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


def fid_encode(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    template: str = FID_TEMPLATE,
    max_passage_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The K encodings of each query fused side by side [B, K*Lp, H], and the 0/1 encoder
    mask [B,K,Lp] (on the model's device)."""
    device = _model_device(model)
    ids, mask = _fid_encoder_inputs(tokenizer, queries, passages, template, max_passage_tokens)
    batch, k, width = ids.shape
    encoded = model.get_encoder()(
        input_ids=ids.view(batch * k, width).to(device),
        attention_mask=mask.view(batch * k, width).to(device),
    ).last_hidden_state
    return encoded.reshape(batch, k * width, -1), mask.to(device)


@torch.no_grad()
def fid_generate(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    doc_log_mask: Tensor | None = None,
    max_new_tokens: int = 16,
    template: str = FID_TEMPLATE,
    max_passage_tokens: int | None = None,
) -> list[str]:
    """Greedy Fusion-in-Decoder answers: the decoder reads all K encodings with log m_k
    added towards passage k (the hard top-k mask at inference: 0 or LOG_ZERO), as
    `fid_loglik` scores them. The passages are encoded once and the decoder keeps its
    key/value cache: each step runs the new token alone. Stops at EOS; special tokens
    stripped."""
    fused, mask = fid_encode(model, tokenizer, queries, passages, template, max_passage_tokens)
    cross = fid_cross_attention_mask(mask, doc_log_mask, 1, fused.dtype)  # one row per step
    eos = tokenizer.eos_token_id
    batch = len(queries)
    step = torch.full((batch,), model.config.decoder_start_token_id, device=fused.device)
    out: list[Tensor] = []
    done = torch.zeros(batch, dtype=torch.bool, device=fused.device)
    cache: dict[str, object] = {}
    for _ in range(max_new_tokens):
        output = model(
            encoder_outputs=(fused,),
            attention_mask=cross,
            decoder_input_ids=step[:, None],
            use_cache=True,
            **cache,
        )
        cache = {_cache_keyword(model): _output_cache(output)}
        step = output.logits[:, -1].argmax(-1).masked_fill(done, eos)
        out.append(step)
        done |= step == eos
        if bool(done.all()):
            break
    texts = tokenizer.batch_decode(torch.stack(out, dim=1), skip_special_tokens=True)
    return [text.strip() for text in texts]


def _answer_row(layout: JointLayout, doc_log_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The additive mask [B, L] of an answer token over the layout's keys: log m_k towards
    passage k, 0 towards the question, the dtype's minimum on padding (the row of
    `joint_attention_mask` for a question or answer token, past the whole layout)."""
    seg, tail = layout.segments, layout.num_passages
    if doc_log_mask is None:
        doc_log_mask = torch.zeros(seg.shape[0], tail, device=seg.device)
    bias = doc_log_mask.to(seg.device, dtype).gather(1, seg.clamp(0, tail - 1))
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=seg.device)
    row = torch.where((seg >= 0) & (seg < tail), bias, blocked)
    return row.masked_fill(seg == tail, 0.0)


def _output_cache(output):
    """The key/value cache a forward returned (transformers 5.x: `cache`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def joint_generate_ids(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    doc_log_mask: Tensor | None = None,
    prompt: JointPrompt = JointPrompt(),
    max_new_tokens: int = 16,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy answer token ids (stop token excluded) of a decoder-only LM reading the K
    passages in parallel, as `joint_loglik` scores them: the answer continues the
    question and sees passage k with the bias doc_log_mask[:, k] (at inference the hard
    top-k mask: 0 or LOG_ZERO).

    The passages and the question are read once under `joint_attention_mask`, keeping
    their keys and values; each step then runs the new token alone over that cache, with
    the question's mask row (passage k: log m_k; question and earlier answer tokens: 0)."""
    stops = set(stop_ids) | {tokenizer.eos_token_id}
    bare = replace(prompt, answer="", answer_eos=False)  # the answer is generated here
    layout = build_layout(tokenizer, queries, passages, [""] * len(queries), bare)
    device, dtype = _model_device(model), _model_dtype(model)
    layout = layout.to(device)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    output = model(
        input_ids=layout.input_ids,
        position_ids=layout.position_ids,
        attention_mask=joint_attention_mask(layout, doc_log_mask, dtype),
        use_cache=True,
        **keep,
    )
    row = _answer_row(layout, doc_log_mask, dtype)  # grows by one 0 per generated token
    position = layout.position_ids[:, -1:] + 1
    answers: list[list[int]] = [[] for _ in queries]
    done = [False] * len(queries)
    for step in range(max_new_tokens):
        tokens = output.logits[:, -1].argmax(-1)
        for b, token in enumerate(tokens.tolist()):
            done[b] = done[b] or token in stops
            if not done[b]:
                answers[b].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        row = torch.cat([row, row.new_zeros(row.shape[0], 1)], dim=1)
        cache = {_cache_keyword(model): _output_cache(output)}
        output = model(
            input_ids=tokens[:, None],
            position_ids=position,
            attention_mask=row[:, None, None, :],
            use_cache=True,
            **cache,
            **keep,
        )
        position = position + 1
    return answers


def joint_generate(
    model,
    tokenizer,
    queries: Sequence[str],
    passages: Sequence[Sequence[str]],
    doc_log_mask: Tensor | None = None,
    prompt: JointPrompt = JointPrompt(),
    max_new_tokens: int = 16,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """`joint_generate_ids` decoded: special tokens stripped, cut at the first newline."""
    answers = joint_generate_ids(
        model, tokenizer, queries, passages, doc_log_mask, prompt, max_new_tokens, stop_ids
    )
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return [text.split("\n", 1)[0].strip() for text in texts]
