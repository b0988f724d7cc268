"""G-Rerank's masks: a reranker's scores [B,K] in, a (log) mask over the candidates out.

Pure functions: `gumbel_topk_mask` (the paper's "max" relaxation),
`successive_softmax_topk_mask` (relaxed subset sampling, sum M = k), `hard_topk_mask`, and
their log-space twins, which stay finite (log 0 -> `LOG_ZERO`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from latentrag.plugins.gumbel_rerank import Relaxation
from latentrag.plugins.joint_attention import LOG_ZERO

__all__ = [
    "LOG_ZERO",
    "gumbel_noise",
    "gumbel_topk_log_mask",
    "gumbel_topk_mask",
    "hard_topk_log_mask",
    "hard_topk_mask",
    "relaxed_log_mask",
    "successive_softmax_topk_log_mask",
    "successive_softmax_topk_mask",
]


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
