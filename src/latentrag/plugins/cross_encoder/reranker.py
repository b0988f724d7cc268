"""Cross-encoder reranker: a BERT reads "[CLS] query [SEP] passage [SEP]" and a linear head
turns its pooled state into a score.

The encoder is the packaged all-MiniLM-L6-v2's BertModel by default (trained as a bi-encoder,
so the head and usually the encoder need training before its scores mean much); the head is
new, initialised under `seed`. With `freeze_encoder` only the head learns.

A checkpoint with a sequence-classification head (e.g. an MS MARCO cross-encoder) is loaded
whole through `AutoModelForSequenceClassification`: its score is the head's one logit, the
score `sentence_transformers.CrossEncoder.predict` gives before its activation (sigmoid).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Reranker
from latentrag.plugins.cross_encoder import CrossEncoderConfig
from latentrag.plugins.encoders import (
    MINILM,
    TINY_RANDOM,
    check_max_length,
    load_transformer,
    model_dir,
    pool,
    resolve_precision,
    set_precision,
)


def classification_dir(model: str) -> Path | None:
    """The directory of `model` when its checkpoint has a sequence-classification head,
    None for a bare encoder (a head with more than one label: ConfigError)."""
    if model in (MINILM, TINY_RANDOM):
        return None
    directory = model_dir(model)
    config = json.loads((directory / "config.json").read_text("utf-8"))
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return None
    labels = len(config.get("id2label") or {"0": "LABEL_0"})
    if labels != 1:
        raise ConfigError(
            f"reranker.model {model!r}: its classification head has {labels} labels; "
            "a reranker needs one score"
        )
    return directory


class CrossEncoderReranker(Reranker, nn.Module):
    """Scores (query, passage) pairs jointly with a transformer and a linear head."""

    def __init__(self, config: CrossEncoderConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config or CrossEncoderConfig()
        cfg = self.config
        directory = classification_dir(cfg.model)
        self.head: nn.Module
        if directory is not None:  # encoder and head come with the checkpoint
            self.encoder = AutoModelForSequenceClassification.from_pretrained(
                directory, local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            set_precision(self.encoder, resolve_precision(cfg.precision, cfg.model))
            self.head = _classification_layer(self.encoder)
        else:
            self.encoder, self.tokenizer = load_transformer(cfg.model, cfg.seed, cfg.precision)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.head = nn.Linear(self.encoder.config.hidden_size, 1)
        self.has_pretrained_head = directory is not None
        check_max_length(self.encoder, cfg.max_length)
        self.encoder.requires_grad_(not cfg.freeze_encoder)
        self.head.requires_grad_(True)
        self.eval()  # like a loaded pretrained model; the trainer switches to train mode

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.config.freeze_encoder:
            return {"head": self.head}
        if self.has_pretrained_head:  # the head is part of the encoder's module
            return {"encoder": self.encoder}
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
        if self.has_pretrained_head:
            return self.encoder(**batch).logits[:, 0].float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            hidden = self.encoder(**batch).last_hidden_state
        pooled = pool(hidden, batch["attention_mask"], self.config.pooling)
        return self.head(pooled).squeeze(-1)


def _classification_layer(model: nn.Module) -> nn.Module:
    """The final scoring layer of a sequence-classification model (BERT's `classifier`,
    RoBERTa's `classifier.out_proj`, others' `score`)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    head = getattr(head, "out_proj", head)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"cannot find the classification layer of {type(model).__name__}")
    return head
