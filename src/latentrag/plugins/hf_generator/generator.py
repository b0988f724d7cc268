"""The `hf-causal-lm` generator: any transformers causal LM as p(y | x, h).

The prompt is `prompt_template` filled with the question and the (truncated) passage; the
target is " " + answer followed by the end-of-sequence token. Prompt and target are
tokenised separately and concatenated, so the target's tokens are the same whatever the
prompt: every candidate passage k of example b scores the same T target tokens, which is
what RAG-Token needs to marginalise per token.

When the template puts the passage before the question (the default), the prompt is
tokenized in two pieces, start-of-text tokens + "...{passage}" and "{question}...", so
that the passage's tokens never depend on the question (for SmolLM2 and the default
template this equals tokenizing the whole prompt; see benchmarks/README.md).

Scoring runs one right-padded forward per micro-batch of the flattened B*K sequences
(sorted by length to limit padding). Logits are computed only at the positions that
predict target tokens (`logits_to_keep` with per-row positions), so the vocabulary-sized
tensor is [n, T, V], never [n, L, V].

Frozen generator (no parameter requires grad, model in eval mode) with `passage_cache_mb`
> 0: each passage's key/value states are computed once and kept in a memory-bounded LRU
cache (`passage_cache.PassageCache`), for per-passage scoring and for the joint reader
alike; only the question and answer tokens run. The cache empties itself when the weights
change. Gradient still reaches a joint reading's document mask (the cached states are
constants).

G-Rerank inference (`generate_joint`) reads the K passages in parallel under the hard
top-k mask as `loglik_joint` does, with a key/value cache: passages and question are read
once, then each new token runs alone. `gradient_checkpointing` recomputes the layers in
backward whenever gradients pass through the model (forwards over the passage cache's
key/value states excepted).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from latentrag.plugins.encoders import native_bf16
from latentrag.plugins.hf_generator import TINY_MODELS, HFGeneratorConfig, LoraSettings, smollm2
from latentrag.plugins.hf_generator.passage_cache import PassageCache
from latentrag.plugins.hf_model_base import HFGeneratorBase, load_error
from latentrag.plugins.hub_models import local_model_dir
from latentrag.plugins.joint_attention import (
    JointPrompt,
    PassageStates,
    joint_generate,
    joint_loglik,
    joint_loglik_cached,
    passage_states,
    pick_target_logprobs,
    read_after_passages,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(config: HFGeneratorConfig) -> str:
    """`config.dtype`, with "auto" made bfloat16 where benchmarks/precision.py found it
    faster at the same loss: a pretrained model (not a tiny test model) that is frozen or
    trained through LoRA (full fine-tuning in bfloat16 weights would lose AdamW steps below
    bfloat16's resolution), on a CPU with native bfloat16; float32 otherwise."""
    if config.dtype != "auto":
        return config.dtype
    pretrained = config.model not in TINY_MODELS
    fast = pretrained and (config.freeze or config.lora is not None) and native_bf16()
    return "bfloat16" if fast else "float32"


def load_model_and_tokenizer(config: HFGeneratorConfig):
    """The (model, tokenizer) pair `config.model` names, in its dtype (`resolve_dtype`)."""
    dtype = DTYPES[resolve_dtype(config)]
    if config.model in TINY_MODELS:
        from latentrag.toy.tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

        build = tiny_llama if config.model == "tiny-llama" else tiny_gpt2
        tokenizer = tiny_tokenizer()
        model = build(tokenizer, seed=config.seed, attn_implementation=config.attn_implementation)
        return model.to(dtype), tokenizer
    if config.model == "smollm2":
        directory = smollm2.converted_dir(config.cache_dir)
    else:  # a folder, or a Hugging Face id's cached snapshot
        directory = local_model_dir(config.model) or Path(config.model).expanduser()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=config.attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise load_error(directory, exc) from exc
    return model.eval(), tokenizer


def add_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap `model` with LoRA adapters (deterministic init for `seed`)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`: not the user's doing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [n, L] and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids [n, L] and their attention mask (for generation)."""
    ids, mask = pad_right([list(reversed(r)) for r in rows], pad_id)
    return ids.flip(1), mask.flip(1)


class HFCausalLMGenerator(HFGeneratorBase):
    """A transformers causal LM scoring and generating answers given passages."""

    def __init__(self, config: HFGeneratorConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config or HFGeneratorConfig()
        model, tokenizer = load_model_and_tokenizer(self.config)
        # architectures without it get full logits, sliced afterwards (more memory)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if self.config.lora is not None:
            model = add_lora(model, self.config.lora, self.config.seed)
        self._init_model(model, tokenizer, self.config)
        self._truncated: dict[str, str] = {}
        self._pieces = _split_template(self.config.prompt_template)
        self._prefixes: dict[str, list[int]] = {}
        self.passage_cache: PassageCache | None = None
        if self.config.passage_cache_mb > 0:
            storage = torch.bfloat16 if self.config.passage_cache_dtype == "bfloat16" else None
            budget = int(self.config.passage_cache_mb * 2**20)
            self.passage_cache = PassageCache(budget, storage)

    # -- tokenisation ----------------------------------------------------------------

    def _truncate(self, passages: Sequence[str]) -> list[str]:
        """Passages cut to `max_passage_tokens` tokens (cached per text)."""
        new = [p for p in dict.fromkeys(passages) if p not in self._truncated]
        if new:
            limit = self.config.max_passage_tokens
            encoded = self.tokenizer(new, add_special_tokens=False)["input_ids"]
            for text, ids in zip(new, encoded):
                short = len(ids) <= limit
                self._truncated[text] = text if short else self.tokenizer.decode(ids[:limit])
        return [self._truncated[p] for p in passages]

    def prompt(self, question: str, passages: Sequence[str]) -> str:
        """The filled template; several passages are joined by newlines into one context."""
        context = "\n".join(self._truncate(passages))
        return self.config.prompt_template.format(question=question, passage=context)

    def _prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(prompts))["input_ids"]  # with BOS where the tokenizer adds one
        # the first target token must be predicted from something
        return [row or [self.tokenizer.eos_token_id] for row in ids]

    def _prefix_ids(self, passages: Sequence[str]) -> list[list[int]]:
        """Start-of-text tokens + the template up to and with the passage (cached per text)."""
        new = [p for p in dict.fromkeys(passages) if p not in self._prefixes]
        if new:
            start = self.tokenizer("")["input_ids"]
            texts = [self._pieces[0].format(passage=p) for p in self._truncate(new)]
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            self._prefixes.update({p: start + ids for p, ids in zip(new, encoded)})
        return [self._prefixes[p] for p in passages]

    def _split_prompt_ids(
        self, queries: Sequence[str], passages: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Each pair's prompt as (passage part, question part) token ids."""
        texts = [self._pieces[1].format(question=q) for q in queries]
        rests = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self._prefix_ids(passages), rests

    def _target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        texts = [" " + t for t in targets]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row + [self.tokenizer.eos_token_id] for row in ids]

    # -- scoring ---------------------------------------------------------------------

    def _pair_logprobs(
        self, queries: list[str], passages: list[str], target_ids: list[list[int]]
    ) -> Tensor:
        """log p(target token | prompt of (query, passage), earlier target tokens) [n, T]."""
        if self._pieces is None:  # question before passage: one piece, never cached
            prompts = self._prompt_ids([self.prompt(q, [p]) for q, p in zip(queries, passages)])
            return self._sequence_logprobs(prompts, target_ids)
        prefixes, rests = self._split_prompt_ids(queries, passages)
        if self.cache_active and all(rests):
            return self._cached_logprobs(prefixes, rests, target_ids)
        prompts = [(a + b) or [self.tokenizer.eos_token_id] for a, b in zip(prefixes, rests)]
        return self._sequence_logprobs(prompts, target_ids)

    def _sequence_logprobs(
        self, prompt_ids: list[list[int]], target_ids: list[list[int]]
    ) -> Tensor:
        """log p(target token | prompt, earlier target tokens) [n, T], 0 past each target."""
        return self._in_batches(
            [len(p) + len(t) for p, t in zip(prompt_ids, target_ids)],
            max(len(t) for t in target_ids),
            lambda rows: self._score_chunk(
                [prompt_ids[i] for i in rows], [target_ids[i] for i in rows]
            ),
        )

    def _cached_logprobs(
        self, prefixes: list[list[int]], rests: list[list[int]], target_ids: list[list[int]]
    ) -> Tensor:
        """`_sequence_logprobs` of prefix + rest, the prefixes' states from the cache."""
        states = self._cached_states(prefixes)
        return self._in_batches(
            [len(a) + len(b) + len(t) for a, b, t in zip(prefixes, rests, target_ids)],
            max(len(t) for t in target_ids),
            lambda rows: read_after_passages(
                self.model,
                [[states[i]] for i in rows],
                [rests[i] for i in rows],
                [target_ids[i] for i in rows],
                pad_id=self.pad_id,
            ),
        )

    def _in_batches(
        self, lengths: list[int], width: int, score: Callable[[list[int]], Tensor]
    ) -> Tensor:
        """score(rows) -> [len(rows), <=width] over batches of rows of similar lengths,
        put back in row order and padded to `width` [n, width]."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        chunks = []
        for start in range(0, len(order), self.config.batch_size):
            chunk = score(order[start : start + self.config.batch_size])
            chunks.append(nn.functional.pad(chunk, (0, width - chunk.shape[1])))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(chunks)[inverse.to(self.device)]

    # -- the passage cache ---------------------------------------------------------------

    @property
    def cache_active(self) -> bool:
        """Whether passage states are cached now: a cache is configured, the model is in
        eval mode (no dropout) and none of its parameters requires grad."""
        return (
            self.passage_cache is not None
            and not self.model.training
            and not any(p.requires_grad for p in self.model.parameters())
        )

    def _compute_states(self, rows: list[list[int]]) -> list[PassageStates]:
        return passage_states(self.model, rows, self.pad_id, self.config.batch_size)

    def _cached_states(self, rows: list[list[int]]) -> list[PassageStates]:
        assert self.passage_cache is not None
        return self.passage_cache.states(self.model, rows, self._compute_states)

    def _score_chunk(self, prompts: list[list[int]], targets: list[list[int]]) -> Tensor:
        """One right-padded forward; logits only where a target token is predicted."""
        # the last target token is never an input: nothing after it is scored
        ids, attention = pad_right([p + t[:-1] for p, t in zip(prompts, targets)], self.pad_id)
        target, target_mask = pad_right(targets, 0)
        steps = torch.arange(target.shape[1])
        lengths = torch.tensor([len(t) for t in targets])
        # the logit at position len(prompt)-1+j predicts target token j; clamp the padding
        starts = torch.tensor([len(p) - 1 for p in prompts])
        positions = starts[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)
        device = self.device
        logits = self._logits_at(ids.to(device), attention.to(device), positions.to(device))
        return pick_target_logprobs(logits, target.to(device), target_mask.bool().to(device))

    def _logits_at(self, ids: Tensor, attention: Tensor, positions: Tensor) -> Tensor:
        """Logits [n, T, V] at positions [n, T] of each row."""
        if self._keeps_logits:
            return self.model(
                input_ids=ids, attention_mask=attention, logits_to_keep=positions, use_cache=False
            ).logits
        logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        return logits.take_along_dim(positions[..., None], dim=1)

    # -- generation ------------------------------------------------------------------

    def _stop_ids(self) -> list[int]:
        stops = [self.tokenizer.eos_token_id]
        newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1:
            stops.append(newline[0])
        return stops

    def loglik_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        doc_log_mask: Tensor,
    ) -> Tensor:
        """All K passages read at once, passage k's attention biased by doc_log_mask[:, k]
        (parallel encoding; see `joint_attention`)."""
        prompt = JointPrompt.from_template(
            self.config.prompt_template, self.config.max_passage_tokens
        )
        if self.cache_active:
            return joint_loglik_cached(
                self.model,
                self.tokenizer,
                queries,
                passages,
                targets,
                doc_log_mask,
                prompt,
                states_of=self._cached_states,
            )
        return joint_loglik(
            self.model, self.tokenizer, queries, passages, targets, doc_log_mask, prompt
        )

    @torch.no_grad()
    def generate(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy answers; stops at eos or a newline; prompt and special tokens stripped."""
        prompts = self._prompt_ids([self.prompt(q, ps) for q, ps in zip(queries, passages)])
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens or self.config.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self._stop_ids(),
        )
        answers: list[str] = []
        with self._evaluating():
            for start in range(0, len(prompts), self.config.batch_size):
                chunk = prompts[start : start + self.config.batch_size]
                answers.extend(self._generate_chunk(chunk, settings))
        return answers

    def generate_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        doc_log_mask: Tensor | None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy answers reading all K passages in parallel as `loglik_joint` does,
        passage k biased by doc_log_mask[:, k] (G-Rerank inference: the hard top-k mask)."""
        prompt = JointPrompt.from_template(
            self.config.prompt_template, self.config.max_passage_tokens
        )
        answers: list[str] = []
        with self._evaluating():
            for batch in self._joint_batches(queries, passages, doc_log_mask):
                answers += joint_generate(
                    self.model,
                    self.tokenizer,
                    *batch,
                    prompt,
                    max_new_tokens or self.config.max_new_tokens,
                    self._stop_ids(),
                )
        return answers

    def _generate_chunk(self, prompts: list[list[int]], settings: GenerationConfig) -> list[str]:
        ids, attention = pad_left(prompts, self.pad_id)
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=settings,
        )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [text.split("\n", 1)[0].strip() for text in texts]


def _split_template(template: str) -> tuple[str, str] | None:
    """(up to and with "{passage}", the rest) when the passage comes before the question."""
    cut = template.find("{passage}") + len("{passage}")
    return (template[:cut], template[cut:]) if template.find("{question}") >= cut else None
