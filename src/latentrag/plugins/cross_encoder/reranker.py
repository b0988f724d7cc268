"""Cross-encoder reranker: a BERT reads "[CLS] query [SEP] passage [SEP]" and a linear head
turns its pooled state into a score.

The encoder is the packaged all-MiniLM-L6-v2's BertModel by default (trained as a bi-encoder,
so the head and usually the encoder need training before its scores mean much); the head is
new, initialised under `seed`. With `freeze_encoder` only the head learns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from latentrag.core.interfaces import Reranker
from latentrag.plugins.cross_encoder import CrossEncoderConfig
from latentrag.plugins.encoders import check_max_length, load_transformer, pool


class CrossEncoderReranker(Reranker, nn.Module):
    """Scores (query, passage) pairs jointly with a transformer and a linear head."""

    def __init__(self, config: CrossEncoderConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config or CrossEncoderConfig()
        cfg = self.config
        self.encoder, self.tokenizer = load_transformer(cfg.model, cfg.seed, cfg.precision)
        check_max_length(self.encoder, cfg.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        self.encoder.requires_grad_(not cfg.freeze_encoder)
        self.eval()  # like a loaded pretrained model; the trainer switches to train mode

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.config.freeze_encoder:
            return {"head": self.head}
        return {"encoder": self.encoder, "head": self.head}

    def train(self, mode: bool = True) -> CrossEncoderReranker:
        super().train(mode)
        if self.config.freeze_encoder:  # a frozen encoder never uses dropout
            self.encoder.eval()
        return self

    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        """Scores [B,K] for passages[b][k] given queries[b], differentiable in head (and
        encoder unless frozen)."""
        if len(passages) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passage lists")
        width = len(passages[0]) if passages else 0
        if any(len(row) != width for row in passages):
            raise ValueError("every query needs the same number of passages (pad with '')")
        pairs = [(q, p) for q, row in zip(queries, passages) for p in row]
        size = self.config.batch_size
        chunks = [self._score_pairs(pairs[i : i + size]) for i in range(0, len(pairs), size)]
        flat = torch.cat(chunks) if chunks else torch.zeros(0, device=self.head.weight.device)
        return flat.view(len(queries), width)

    def _score_pairs(self, pairs: list[tuple[str, str]]) -> Tensor:
        batch = self.tokenizer(
            [q for q, _ in pairs],
            [p for _, p in pairs],
            padding=True,
            truncation="longest_first",
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.head.weight.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            hidden = self.encoder(**batch).last_hidden_state
        pooled = pool(hidden, batch["attention_mask"], self.config.pooling)
        return self.head(pooled).squeeze(-1)
