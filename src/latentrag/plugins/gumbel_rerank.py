"""G-Rerank: a reranker's scores become a stochastic document-wise top-k attention mask.

Seed paper: "Gumbel Reranking: Differentiable End-to-End Reranker Optimization" (Huang et
al., 2025). The reranker scores w [B,K] of the K candidates turn into a soft mask M [B,K];
the generator reads all K candidates at once with log M_i added to the attention towards
candidate i's tokens (`joint_attention.py`), and the language-modelling loss trains the
reranker through M. Inference uses the hard top-k mask.

Three pieces, one concept each:

- the masks (pure functions, tensors in and out): `gumbel_topk_mask` (the paper's
  "max" relaxation), `successive_softmax_topk_mask` (relaxed subset sampling, sum M = k),
  `hard_topk_mask`, and their log-space twins, which stay finite (log 0 -> `LOG_ZERO`);
- `GumbelReranker`, ("reranker", "gumbel"): wraps an inner scoring reranker named in the
  config and adds `mask(scores, training)`;
- `GumbelEstimator`, ("estimator", "gumbel"): loss = -mean_b log p(y_b | x_b, all K
  candidates under log M_b). It owns tau, kappa, k_keep and relaxation for training; the
  reranker's own tau, kappa and k are what its `mask()` uses (hard top-k at inference).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentrag import hookimpl
from latentrag.core.config import BuildContext, RerankerRef, StrictModel
from latentrag.core.interfaces import EstimatorOutput, LatentModel, Reranker
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch
from latentrag.plugins.estimators.common import EstimatorConfig, SeededEstimator, generator_forwards
from latentrag.plugins.joint_attention import LOG_ZERO

Relaxation = Literal["max", "successive"]

# -- the masks -------------------------------------------------------------------------


def gumbel_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, like: Tensor | None = None
) -> Tensor:
    """Standard Gumbel noise -log(-log u), u ~ U(0,1), drawn on the CPU (reproducible with a
    CPU generator) and moved to `like`'s device and dtype."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(tuple(shape), generator=generator).clamp(tiny, 1.0 - 1e-7)
    noise = -torch.log(-torch.log(u))
    if like is not None:
        noise = noise.to(like.device, like.dtype)
    return noise


def _masked(scores: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return scores
    return scores.masked_fill(~valid, float("-inf"))


def _finite_log(log_mask: Tensor, valid: Tensor | None) -> Tensor:
    """Clamp to LOG_ZERO (padding slots get exactly LOG_ZERO)."""
    log_mask = log_mask.clamp_min(LOG_ZERO)
    if valid is not None:
        log_mask = log_mask.masked_fill(~valid, LOG_ZERO)
    return log_mask


def gumbel_topk_log_mask(
    scores: Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """log M for the "max" relaxation: M = max_j softmax((kappa*w + G^(j)) / tau), j = 1..k.

    Computed as max_j log_softmax(...), finite everywhere (>= LOG_ZERO).
    """
    logits = _masked(kappa * scores, valid)
    draws = logits.unsqueeze(0).expand(k, *scores.shape)
    if noise:
        draws = draws + gumbel_noise(draws.shape, generator, like=scores)
    log_samples = torch.log_softmax(draws / tau, dim=-1)
    return _finite_log(log_samples.max(dim=0).values, valid)


def gumbel_topk_mask(
    scores: Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """The paper's stochastic top-k mask M [B,K] in [0,1]: k independent Gumbel-softmax
    samples, elementwise max.

    Without noise the k draws coincide, so M = softmax(kappa*w/tau), which tends to the
    one-hot of the top-1 candidate (not the top-k) as tau -> 0; with noise, M tends to the
    indicator of the (at most k) distinct winners of the k perturbed argmaxes.
    """
    return gumbel_topk_log_mask(scores, k, tau, kappa, generator, noise, valid).exp()


def _log1mexp(log_a: Tensor) -> Tensor:
    """log(1 - exp(log_a)) for log_a <= 0, kept finite (about -69 at a = 1)."""
    return torch.log((-torch.expm1(log_a)).clamp_min(1e-30))


def successive_softmax_topk_log_mask(
    scores: Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """log M for relaxed subset sampling (Xie & Ermon 2019): s = kappa*w + G; k rounds of
    a_j = softmax(s/tau), s <- s + log(1 - a_j); M = sum_j a_j, so sum_i M_i = k exactly."""
    k = min(k, scores.shape[-1])  # more rounds than candidates would push M_i above 1
    s = _masked(kappa * scores, valid)
    if noise:
        s = s + gumbel_noise(s.shape, generator, like=scores)
    rounds = []
    for _ in range(k):
        log_a = torch.log_softmax(s / tau, dim=-1)
        rounds.append(log_a)
        s = s + _log1mexp(log_a)
    return _finite_log(torch.logsumexp(torch.stack(rounds), dim=0), valid)


def successive_softmax_topk_mask(
    scores: Tensor,
    k: int,
    tau: float,
    kappa: float = 1.0,
    generator: torch.Generator | None = None,
    noise: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """Relaxed top-k mask M [B,K] with sum M = k (k <= number of valid candidates).

    Tends to the hard top-k indicator of kappa*w (+ noise) as tau -> 0 when the perturbed
    scores are distinct. M_i >= 0 always, but M_i <= 1 is not guaranteed: leaders closer
    than about tau share the first rounds and the rest of their mass spills into later
    rounds (scores (2.31, 2.28, 0.13), k = 3, tau = 0.1 give M_1 = 1.64), and at a large tau
    one leader far ahead collects more than one unit. The "max" relaxation stays in [0,1].
    """
    return successive_softmax_topk_log_mask(scores, k, tau, kappa, generator, noise, valid).exp()


def hard_topk_mask(scores: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """1.0 for the k highest scores of each row (valid slots only), 0.0 elsewhere."""
    ranked = _masked(scores.detach(), valid)
    top = ranked.topk(min(k, scores.shape[-1]), dim=-1).indices
    mask = torch.zeros_like(scores).scatter(-1, top, 1.0)
    if valid is not None:
        mask = mask.masked_fill(~valid, 0.0)
    return mask


def hard_topk_log_mask(scores: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """0 for the top k, LOG_ZERO (not -inf, so that softmax stays finite) elsewhere."""
    mask = hard_topk_mask(scores, k, valid)
    return torch.where(mask > 0, torch.zeros_like(mask), torch.full_like(mask, LOG_ZERO))


RELAXATIONS = {"max": gumbel_topk_log_mask, "successive": successive_softmax_topk_log_mask}


def relaxed_log_mask(
    relaxation: Relaxation,
    scores: Tensor,
    k: int,
    tau: float,
    kappa: float,
    generator: torch.Generator | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The training-time log mask of the named relaxation (Gumbel noise on)."""
    return RELAXATIONS[relaxation](scores, k, tau, kappa, generator, True, valid)


# -- the reranker ----------------------------------------------------------------------


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


# -- the estimator ---------------------------------------------------------------------


class GumbelEstimatorConfig(EstimatorConfig):
    """k candidates from the prior; the mask keeps about k_keep of them (training only)."""

    k_keep: int = Field(4, ge=1, description="k of the relaxed top-k mask")
    tau: float = Field(0.5, gt=0, description="softmax temperature of the relaxed mask")
    kappa: float = Field(1.0, gt=0, description="scale of the reranker scores")
    relaxation: Relaxation = "max"
    loglik: Literal["sum"] = Field("sum", description="joint reading scores the sequence only")
    train_generator: bool = Field(False, description="also train the generator")
    seed: int = 0


class GumbelEstimator(SeededEstimator):
    """G-Rerank: loss = -mean_b log p(y_b | x_b, candidates_b, log M_b) with
    M = relaxed top-k mask of the reranker's scores; only the reranker learns by default.

    `temperature` (of the shared estimator keys) is unused: the reranker's scores enter
    the mask through kappa and tau. The Gumbel noise comes from the estimator's own
    seeded stream, checkpointed with it.
    """

    requires = ("retriever", "reranker", "generator")

    def __init__(self, config: GumbelEstimatorConfig) -> None:
        super().__init__(config.seed)
        self.config = config
        self.trains = ("reranker", "generator") if config.train_generator else ("reranker",)

    def extra_state(self) -> dict:
        return {"rng": self.rng_state()}

    def load_extra_state(self, state: dict) -> None:
        if "rng" in state:
            self.load_rng_state(state["rng"])

    def log_mask(self, scores: Tensor, valid: Tensor | None = None) -> Tensor:
        cfg = self.config
        return relaxed_log_mask(
            cfg.relaxation, scores, cfg.k_keep, cfg.tau, cfg.kappa, self.rng, valid
        )

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        start = generator_forwards(model)
        cand = model.candidates(batch, self.config.candidates, self.config.k)
        scores = model.rerank_scores(batch, cand)
        log_mask = self.log_mask(scores, cand.mask)
        loglik = model.joint_loglik(batch, cand, log_mask)
        forwards = generator_forwards(model) - start
        diagnostics = mask_diagnostics(log_mask.detach(), cand.mask)
        diagnostics["joint_loglik"] = float(loglik.detach().mean())
        return EstimatorOutput(
            loss=-loglik.mean(),
            diagnostics=diagnostics,
            generator_forwards=forwards,
            generator_backwards=forwards if torch.is_grad_enabled() else 0,
        )


def mask_diagnostics(log_mask: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Mean entropy of the normalised mask M / sum M (nats) and mean of max_i M_i."""
    mask = log_mask.exp()
    if valid is not None:
        mask = mask * valid
    share = mask / mask.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(-1)
    return {"mask_entropy": float(entropy.mean()), "mask_max": float(mask.max(-1).values.mean())}


@hookimpl
def register_components(register):
    register(
        "reranker",
        "gumbel",
        GumbelReranker,
        GumbelRerankConfig,
        "G-Rerank: Gumbel-relaxed top-k attention mask over a wrapped reranker's scores",
    )
    register(
        "estimator",
        "gumbel",
        GumbelEstimator,
        GumbelEstimatorConfig,
        "G-Rerank training: the reranker learns from the generator's LM loss",
    )
