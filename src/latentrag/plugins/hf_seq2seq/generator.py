"""The `hf-seq2seq` generator: an encoder-decoder LM (T5, BART, Flan-T5) as p(y | x, h).

Per passage (RAG-Sequence / RAG-Token, as in HF RAG): the encoder reads `template` filled
with the question and one passage, the decoder scores the answer's tokens + EOS; every
passage of a query scores the same target tokens, so RAG-Token can marginalise per token.
Jointly (G-Rerank): Fusion-in-Decoder, `joint_attention.fid_loglik`, the decoder reading
all K encodings with log m_k added towards passage k. Generation is FiD greedy decoding
over the given passages (one passage: the plain encoder-decoder answer), the passages
encoded once and the decoder stepping one token at a time over its key/value cache.
`gradient_checkpointing` recomputes the encoder's and decoder's layers in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from latentrag.plugins.hf_model_base import HFGeneratorBase, load_error
from latentrag.plugins.hf_seq2seq import TINY_MODELS, HFSeq2SeqConfig
from latentrag.plugins.hub_models import local_model_dir
from latentrag.plugins.joint_attention import (
    LOG_ZERO,
    fid_generate,
    fid_loglik,
    pick_target_logprobs,
)


def load_model_and_tokenizer(config: HFSeq2SeqConfig):
    """The (model, tokenizer) pair `config.model` names, in eval mode."""
    if config.model in TINY_MODELS:
        from latentrag.toy.tiny_models import tiny_t5, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_t5(tokenizer, seed=config.seed), tokenizer
    # a folder, or a Hugging Face id's cached snapshot
    directory = local_model_dir(config.model) or Path(config.model).expanduser()
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise load_error(directory, exc) from exc
    return model.eval(), tokenizer


class HFSeq2SeqGenerator(HFGeneratorBase):
    """A transformers encoder-decoder LM scoring and generating answers given passages."""

    def __init__(self, config: HFSeq2SeqConfig | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config or HFSeq2SeqConfig()
        self._init_model(*load_model_and_tokenizer(self.config), self.config)

    # -- tokenisation ----------------------------------------------------------------

    def _encoder_texts(self, queries: Sequence[str], passages: Sequence[str]) -> list[str]:
        limit = self.config.max_passage_tokens
        encoded = self.tokenizer(list(passages), add_special_tokens=False)["input_ids"]
        cut = [
            text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])
            for text, ids in zip(passages, encoded, strict=True)
        ]
        return [self.config.template.format(question=q, passage=p) for q, p in zip(queries, cut)]

    def _target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Answer tokens + EOS: the same tokens `fid_loglik` scores."""
        ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        return [row + [self.tokenizer.eos_token_id] for row in ids]

    # -- scoring ---------------------------------------------------------------------

    def _pair_logprobs(
        self, queries: list[str], passages: list[str], target_ids: list[list[int]]
    ) -> Tensor:
        texts = self._encoder_texts(queries, passages)
        width = max(len(t) for t in target_ids)
        chunks = []
        for start in range(0, len(texts), self.config.batch_size):
            end = start + self.config.batch_size
            chunk = self._score_chunk(texts[start:end], target_ids[start:end])
            chunks.append(nn.functional.pad(chunk, (0, width - chunk.shape[1])))
        return torch.cat(chunks)

    def _score_chunk(self, texts: list[str], targets: list[list[int]]) -> Tensor:
        """log p(target token | encoder text, earlier target tokens) [n, T], 0 past each."""
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        width = max(len(t) for t in targets)
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        device = self.device
        logits = self.model(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            labels=labels.to(device),
            use_cache=False,
        ).logits
        labels = labels.to(device)
        return pick_target_logprobs(logits, labels.clamp_min(0), labels >= 0)

    def loglik_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        doc_log_mask: Tensor,
    ) -> Tensor:
        """Fusion-in-Decoder over all K passages, passage k's cross-attention biased by
        doc_log_mask[:, k] (G-Rerank)."""
        return fid_loglik(
            self.model,
            self.tokenizer,
            queries,
            passages,
            targets,
            doc_log_mask,
            self.config.template,
            self.config.max_passage_tokens,
        )

    # -- generation ------------------------------------------------------------------

    def generate(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy FiD answers over each query's passages (rows may differ in length: the
        missing ones are masked out)."""
        width = max(1, max(len(row) for row in passages))
        rows = [list(row) + [""] * (width - len(row)) for row in passages]
        mask = torch.tensor([[0.0] * len(r) + [LOG_ZERO] * (width - len(r)) for r in passages])
        return self.generate_joint(queries, rows, mask, max_new_tokens)

    def generate_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        doc_log_mask: Tensor | None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Greedy answers reading all K passages as `loglik_joint` does, passage k biased
        by doc_log_mask[:, k] (G-Rerank inference: the hard top-k mask)."""
        answers: list[str] = []
        with self._evaluating():
            for batch in self._joint_batches(queries, passages, doc_log_mask):
                answers += fid_generate(
                    self.model,
                    self.tokenizer,
                    *batch,
                    max_new_tokens or self.config.max_new_tokens,
                    self.config.template,
                    self.config.max_passage_tokens,
                )
        return answers
