"""G-Rerank: a reranker's scores become a stochastic document-wise top-k attention mask.

Seed paper: "Gumbel Reranking: Differentiable End-to-End Reranker Optimization" (Huang et
al., 2025). The reranker scores w [B,K] of the K candidates turn into a soft mask M [B,K];
the generator reads all K candidates at once with log M_i added to the attention towards
candidate i's tokens (`joint_attention.py`), and the language-modelling loss trains the
reranker through M. Inference uses the hard top-k mask.

This module holds the plugin's config models and hook (no torch); three pieces, one
concept each, hold the code:

- `masks`: pure functions, tensors in and out: `gumbel_topk_mask` (the paper's "max"
  relaxation), `successive_softmax_topk_mask` (relaxed subset sampling, sum M = k),
  `hard_topk_mask`, and their log-space twins, which stay finite (log 0 -> `LOG_ZERO`);
- `reranker.GumbelReranker`, ("reranker", "gumbel"): wraps an inner scoring reranker named
  in the config and adds `mask(scores, training)`;
- `estimator.GumbelEstimator`, ("estimator", "gumbel"): loss = -mean_b log p(y_b | x_b, all
  K candidates under log M_b). It owns tau, kappa, k_keep and relaxation for training; the
  reranker's own tau, kappa and k are what its `mask()` uses (hard top-k at inference).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from latentrag import hookimpl
from latentrag.core.config import RerankerRef, StrictModel
from latentrag.plugins.estimators.config import EstimatorConfig

Relaxation = Literal["max", "successive"]


class GumbelRerankConfig(StrictModel):
    """The wrapped reranker (a `[reranker.inner]` section: its registry name and options,
    checked by that reranker's own model) and the mask's parameters."""

    inner: RerankerRef = Field(
        default_factory=lambda: RerankerRef(name="cross-encoder"),
        description="the scoring reranker, e.g. { name = 'cross-encoder', model = 'minilm' }",
    )
    tau: float = Field(0.5, gt=0, description="softmax temperature of the relaxed mask")
    kappa: float = Field(1.0, gt=0, description="scale of the scores before the noise")
    k: int = Field(4, ge=1, description="passages kept (hard top-k at inference)")
    relaxation: Relaxation = "max"
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _old_inner_form(cls, data: Any) -> Any:
        """Before 0.2 the inner reranker was `inner = "name"` plus `inner_config = {...}`."""
        if isinstance(data, dict) and (
            isinstance(data.get("inner"), str) or "inner_config" in data
        ):
            warnings.warn(
                "reranker.inner_config is deprecated: write the inner reranker as a section, "
                "inner = { name = 'cross-encoder', ... }",
                DeprecationWarning,
                stacklevel=2,
            )
            data = dict(data)
            name = data.pop("inner", "cross-encoder")
            data["inner"] = {"name": name, **data.pop("inner_config", {})}
        return data

    @model_validator(mode="after")
    def _inner_scores(self) -> GumbelRerankConfig:
        if self.inner.name == "gumbel":
            raise ValueError("inner = 'gumbel': the inner reranker must score, not mask")
        return self


class GumbelEstimatorConfig(EstimatorConfig):
    """k candidates from the prior; the mask keeps about k_keep of them (training only)."""

    k_keep: int = Field(4, ge=1, description="k of the relaxed top-k mask")
    tau: float = Field(0.5, gt=0, description="softmax temperature of the relaxed mask")
    kappa: float = Field(1.0, gt=0, description="scale of the reranker scores")
    relaxation: Relaxation = "max"
    loglik: Literal["sum"] = Field("sum", description="joint reading scores the sequence only")
    train_generator: bool = Field(False, description="also train the generator")
    seed: int = 0

    requires: ClassVar[tuple[str, ...]] = ("retriever", "reranker", "generator")


@hookimpl
def register_components(register) -> None:
    register(
        "reranker",
        "gumbel",
        "latentrag.plugins.gumbel_rerank.reranker:GumbelReranker",
        GumbelRerankConfig,
        "G-Rerank: Gumbel-relaxed top-k attention mask over a wrapped reranker's scores",
    )
    register(
        "estimator",
        "gumbel",
        "latentrag.plugins.gumbel_rerank.estimator:GumbelEstimator",
        GumbelEstimatorConfig,
        "G-Rerank training: the reranker learns from the generator's LM loss",
    )
