"""A tiny trainable dual encoder over hashed bags of words (tests and gradcheck).

Text -> lowercase `\\w+` tokens -> crc32 buckets -> mean of learned embeddings. Scores are
dot products of the query and passage vectors; retrieval is brute force over the corpus.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Retriever
from latentrag.core.types import Candidates, Corpus
from latentrag.plugins.bow import BowConfig

_WORD = re.compile(r"\w+")


def bucket_ids(text: str, buckets: int) -> list[int]:
    """Stable hashed token ids of a text (crc32, identical across processes)."""
    return [zlib.crc32(word.encode("utf-8")) % buckets for word in _WORD.findall(text.lower())]


class BagEncoder(nn.Module):
    """Mean of the embeddings of a text's hashed tokens (zeros for a text without words)."""

    def __init__(self, buckets: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        nn.init.normal_(self.bag.weight, generator=generator)

    def forward(self, token_lists: Sequence[Sequence[int]]) -> Tensor:
        device = self.bag.weight.device  # train.device
        ids = [t for tokens in token_lists for t in tokens]
        flat = torch.tensor(ids, dtype=torch.long, device=device)
        lengths = torch.tensor([0] + [len(tokens) for tokens in token_lists[:-1]], device=device)
        return self.bag(flat, torch.cumsum(lengths, 0))

    def encode(self, texts: Sequence[str]) -> Tensor:
        return self([bucket_ids(text, self.buckets) for text in texts])


class BowRetriever(nn.Module, Retriever):
    """Trainable bag-of-embeddings retriever: score(x, h) = enc_q(x) · enc_p(h)."""

    def __init__(self, config: BowConfig) -> None:
        super().__init__()
        self.config = config
        seeded = torch.Generator().manual_seed(config.seed)  # weights depend on the seed only
        # attribute names are the trainable_modules() names, so both state_dicts agree
        if config.shared:
            self.encoder = BagEncoder(config.buckets, config.dim, seeded)
        else:
            self.query_encoder = BagEncoder(config.buckets, config.dim, seeded)
            self.passage_encoder = BagEncoder(config.buckets, config.dim, seeded)
        self._passage_tokens: list[list[int]] = []

    def encoders(self) -> tuple[BagEncoder, BagEncoder]:
        """(query encoder, passage encoder); the same module when shared."""
        if self.config.shared:
            return self.encoder, self.encoder
        return self.query_encoder, self.passage_encoder

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.config.shared:
            return {"encoder": self.encoder}
        return {"query_encoder": self.query_encoder, "passage_encoder": self.passage_encoder}

    def index(self, corpus: Corpus) -> None:
        self._passage_tokens = [bucket_ids(text, self.config.buckets) for text in corpus.texts()]

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        size = len(self._passage_tokens)
        if k > size:
            raise LatentragError(f"bow retriever: k={k} exceeds the corpus size {size}")
        query_encoder, passage_encoder = self.encoders()
        with torch.no_grad():
            scores = query_encoder.encode(queries) @ passage_encoder(self._passage_tokens).T
            top = torch.topk(scores, k, dim=-1)
        return Candidates(top.indices, top.values)

    def score(self, queries: Sequence[str], passage_rows: Tensor) -> Tensor:
        """Dot products [B,K], differentiable to both encoders; each distinct row encoded once."""
        query_encoder, passage_encoder = self.encoders()
        distinct, inverse = torch.unique(passage_rows, return_inverse=True)
        passages = passage_encoder([self._passage_tokens[r] for r in distinct.tolist()])
        queries_vec = query_encoder.encode(queries)
        return torch.einsum("bd,bkd->bk", queries_vec, passages[inverse])
