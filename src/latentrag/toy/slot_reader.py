"""A tiny differentiable reader that can learn to copy an answer out of its passage.

p(y_t = v | x, h) = softmax over the output words v of
``b[t, v] + Σ_j W[t, j] · [the j-th word from the end of h is v]``:
a learnable weight per (answer position, passage slot) for copying the word found there,
plus a learnable bias per answer position. It ignores the question: what it knows of the
answer must come from the passage, so the task cannot be solved without retrieval. W starts
at `copy_init` everywhere (it copies any output word the passage holds, into every answer
position, weakly); training teaches it which slot feeds which position.

Scoring a (question, passage) pair costs one small matrix product, so the exact marginal
over a few hundred passages is cheap. It implements the whole `Generator` interface,
including `loglik_joint` (several passages read at once: the copy features are mixed with
weights softmax(doc_log_mask), so a hard mask on one passage reads that passage alone).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from latentrag.core.config import StrictModel
from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Generator, Reduce

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The reader's tokens: lowercase `\\w+` words."""
    return _WORD.findall(text.lower())


class SlotReaderConfig(StrictModel):
    outputs: list[str] = Field(description="the words the reader can emit (answer vocabulary)")
    positions: int = Field(2, ge=1, description="answer length in words (what generate emits)")
    window: int = Field(8, ge=1, description="passage words, counted from its end, it can copy")
    copy_init: float = Field(1.0, description="initial copy weight of every slot")

    @field_validator("outputs")
    @classmethod
    def _distinct(cls, outputs: list[str]) -> list[str]:
        lowered = [w.lower() for w in outputs]
        if len(set(lowered)) < 2 or len(set(lowered)) != len(lowered):
            raise ValueError("needs at least two distinct output words (case-insensitive)")
        if any(words(w) != [w] for w in lowered):
            raise ValueError("each output must be a single word (letters, digits, _)")
        return lowered


class SlotReader(nn.Module, Generator):
    """See the module docstring. Answers are whitespace-separated words of `outputs`."""

    def __init__(self, config: SlotReaderConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = {word: i for i, word in enumerate(config.outputs)}
        self.copy = nn.Parameter(torch.full((config.positions, config.window), config.copy_init))
        self.bias = nn.Parameter(torch.zeros(config.positions, len(config.outputs)))
        # passage text -> row of the feature bank (features depend on the text alone)
        self._rows: dict[str, int] = {}
        self._pending: list[Tensor] = []
        self._bank = torch.zeros(0, len(self.vocab), config.window)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"reader": self}

    # -- features --------------------------------------------------------------------------

    def passage_features(self, text: str) -> Tensor:
        """[V, window] indicators: output word v is the j-th word from the passage's end."""
        features = torch.zeros(len(self.vocab), self.config.window)
        tail = words(text)[::-1][: self.config.window]
        for j, word in enumerate(tail):
            if word in self.vocab:
                features[self.vocab[word], j] = 1.0
        return features

    def _stack(self, passages: Sequence[Sequence[str]]) -> Tensor:
        """[B, K, V, window] features of every passage (each distinct text computed once)."""
        rows = []
        for row in passages:
            for text in row:
                if text not in self._rows:
                    self._rows[text] = len(self._rows)
                    self._pending.append(self.passage_features(text))
                rows.append(self._rows[text])
        if self._pending:
            self._bank = torch.cat([self._bank, torch.stack(self._pending)])
            self._pending = []
        index = torch.tensor(rows, dtype=torch.long)
        return self._bank[index].view(len(passages), -1, *self._bank.shape[1:])

    def _targets(self, targets: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Target word ids [B, T] (0 at padding) and their mask [B, T]."""
        positions = self.config.positions
        ids = torch.zeros(len(targets), positions, dtype=torch.long)
        mask = torch.zeros(len(targets), positions, dtype=torch.bool)
        for b, target in enumerate(targets):
            answer = words(target)
            if not answer or len(answer) > positions:
                raise LatentragError(
                    f"slot reader: answer {target!r} must have 1 to {positions} words"
                )
            for t, word in enumerate(answer):
                if word not in self.vocab:
                    raise LatentragError(f"slot reader: {word!r} is not one of its outputs")
                ids[b, t], mask[b, t] = self.vocab[word], True
        return ids, mask

    def _log_probs(self, features: Tensor) -> Tensor:
        """log p(v | passage) per answer position: [..., V, window] -> [..., T, V]."""
        logits = torch.einsum("...vj,tj->...tv", features, self.copy) + self.bias
        return torch.log_softmax(logits, dim=-1)

    # -- Generator -------------------------------------------------------------------------

    def token_logprobs(
        self, queries: Sequence[str], passages: Sequence[Sequence[str]], targets: Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        ids, mask = self._targets(targets)
        log_probs = self._log_probs(self._stack(passages))  # [B, K, T, V]
        index = ids[:, None, :, None].expand(-1, log_probs.shape[1], -1, 1)
        per_token = log_probs.gather(-1, index).squeeze(-1)
        return per_token.masked_fill(~mask[:, None, :], 0.0), mask

    def loglik(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        reduce: Reduce = "sum",
    ) -> Tensor:
        per_token, mask = self.token_logprobs(queries, passages, targets)
        total = per_token.sum(-1)
        if reduce == "mean":
            total = total / mask.sum(-1, keepdim=True)
        return total

    def loglik_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        doc_log_mask: Tensor,
    ) -> Tensor:
        ids, mask = self._targets(targets)
        weights = torch.softmax(doc_log_mask, dim=-1)  # [B, K]
        mixed = torch.einsum("bk,bkvj->bvj", weights, self._stack(passages))
        log_probs = self._log_probs(mixed)  # [B, T, V]
        per_token = log_probs.gather(-1, ids[..., None]).squeeze(-1)
        return per_token.masked_fill(~mask, 0.0).sum(-1)

    @torch.no_grad()
    def generate(
        self, queries: Sequence[str], passages: Sequence[Sequence[str]], max_new_tokens: int = 16
    ) -> list[str]:
        """The most probable word at each answer position, given each query's first passage."""
        log_probs = self._log_probs(self._stack([row[:1] for row in passages]))[:, 0]
        best = log_probs[:, : max(1, max_new_tokens)].argmax(-1)
        return [" ".join(self.config.outputs[i] for i in row) for row in best.tolist()]
