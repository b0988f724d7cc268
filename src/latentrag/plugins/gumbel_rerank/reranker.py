"""The `gumbel` reranker: scores with a wrapped reranker, masks with a relaxed top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from latentrag.core.config import BuildContext
from latentrag.core.interfaces import Reranker
from latentrag.core.registry import default_registry
from latentrag.plugins.gumbel_rerank import GumbelRerankConfig
from latentrag.plugins.gumbel_rerank.masks import (
    hard_topk_log_mask,
    hard_topk_mask,
    relaxed_log_mask,
)


class GumbelReranker(Reranker):
    """Scores with the inner reranker; masks with a relaxed top-k in training, the hard
    top-k at inference."""

    def __init__(self, config: GumbelRerankConfig, context: BuildContext | None = None) -> None:
        self.config = config
        context = context or BuildContext(default_registry())
        self.inner: Reranker = context.build(config.inner)
        self.rng = torch.Generator().manual_seed(config.seed)

    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        return self.inner.score(queries, passages)

    def log_mask(self, scores: Tensor, training: bool, valid: Tensor | None = None) -> Tensor:
        """log M [B,K]: relaxed and noisy when training, hard top-k (0 / LOG_ZERO) otherwise."""
        cfg = self.config
        if training:
            return relaxed_log_mask(
                cfg.relaxation, scores, cfg.k, cfg.tau, cfg.kappa, self.rng, valid
            )
        return hard_topk_log_mask(scores, cfg.k, valid)

    def mask(self, scores: Tensor, training: bool, valid: Tensor | None = None) -> Tensor:
        """M [B,K]: the stochastic soft mask when training, the hard top-k otherwise."""
        if not training:
            return hard_topk_mask(scores, self.config.k, valid)
        return self.log_mask(scores, True, valid).exp()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.inner.trainable_modules()
