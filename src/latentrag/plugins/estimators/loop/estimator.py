"""LOOP: the retriever is fitted to how much the LM loss rises when a passage is left out.

Atlas (Izacard et al. 2022, "leave-one-out perplexity distillation"): for each of the
top-K passages h_k, log p(y | x, top-K without h_k) is computed under stop-gradient; the
target is softmax(-log p(y|x, S∖h_k)/β) = softmax((log p(y|x,S) - log p(y|x,S∖h_k))/β)
(the full-set term is the same for every k), and the retriever's softmax(s/γ) over the
top-K is fitted to it by KL(target || retriever), as in PDist.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Estimator, EstimatorOutput, LatentModel
from latentrag.core.types import Batch, Candidates
from latentrag.plugins.estimators.common import generator_forwards, sanitise, valid_mask
from latentrag.plugins.estimators.loop import LoopConfig
from latentrag.plugins.estimators.pdist.estimator import distillation, target_logprobs
from latentrag.plugins.joint_attention import LOG_ZERO


def mixture_leave_one_out(
    loglik: Tensor, log_weights: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """For a mixture reader p(y|x,S) = Σ_{j∈S} w_j p(y|x,h_j) / Σ_{j∈S} w_j: log p(y|x,S) [B]
    over the valid candidates and log p(y|x,S∖h_k) [B,K] for every k (weights renormalised
    over S∖h_k). A set left empty (one valid candidate) gives NaN, handled by the caller."""
    minus_inf = torch.full_like(loglik, float("-inf"))
    log_w = torch.where(valid, log_weights, minus_inf)
    joint = log_w + sanitise(loglik, valid)
    full = torch.logsumexp(joint, dim=-1) - torch.logsumexp(log_w, dim=-1)
    left_out = torch.eye(loglik.shape[-1], dtype=torch.bool, device=loglik.device)
    without_joint = joint.unsqueeze(1).masked_fill(left_out, float("-inf"))  # [B, k, j]
    without_w = log_w.unsqueeze(1).masked_fill(left_out, float("-inf"))
    return full, torch.logsumexp(without_joint, -1) - torch.logsumexp(without_w, -1)


def loss_rise(full: Tensor | None, without: Tensor, valid: Tensor) -> Tensor:
    """log p(y|x,S) - log p(y|x,S∖h_k) [B,K]: how much the LM loss rises without h_k.

    Without the full-set term (the joint reader) the rise is known up to a shift per example,
    which the target's softmax ignores. Slots with nothing left to read count 0."""
    rise = -without if full is None else full.unsqueeze(-1) - without
    return torch.where(valid & torch.isfinite(rise), rise, torch.zeros_like(rise))


class LoopEstimator(Estimator):
    """loss = mean_b KL(softmax(rise/β) || softmax(s/γ)) over the top-K candidates, with
    rise_k = log p(y|x,S) - log p(y|x,S∖h_k) computed under stop-gradient.

    reader = "mixture": one generator forward per candidate (the leave-one-out sets are
    mixtures of the per-passage likelihoods), weights uniform by default (Atlas's reader
    does not see the retriever's scores) or the retriever's own (stopped). reader = "joint":
    K forwards of the generator reading K-1 passages at once (doc_log_mask = LOG_ZERO for the
    left-out one), as Atlas's Fusion-in-Decoder reader. Only the retriever learns; biased
    by design (it does not follow the marginal-likelihood gradient).
    """

    trains = ("retriever",)
    requires = ("retriever", "generator")
    exact = False

    def __init__(self, config: LoopConfig) -> None:
        self.config = config

    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        cfg = self.config
        start = generator_forwards(model)
        cand = model.candidates(batch, cfg.candidates, cfg.k)
        log_retriever = model.prior_logprobs(batch, cand, cfg.temperature)
        valid = valid_mask(log_retriever, cand.mask)
        diagnostics: dict[str, float] = {}
        if cfg.reader == "mixture":
            loglik = model.loglik(batch, cand, cfg.loglik, grad=False).detach()
            log_weights = self._mixture_weights(log_retriever)
            full, without = mixture_leave_one_out(loglik, log_weights, valid)
            diagnostics["log_marginal"] = float(full.mean())
        else:
            full, without = None, joint_leave_one_out(batch, model, cand, valid)
        log_target = target_logprobs(loss_rise(full, without, valid) / cfg.beta, valid)
        parts = distillation(log_retriever, log_target, valid)
        diagnostics.update({key: float(value.detach().mean()) for key, value in parts.items()})
        return EstimatorOutput(
            loss=parts["kl"].mean(),
            diagnostics=diagnostics,
            generator_forwards=generator_forwards(model) - start,
            generator_backwards=0,
        )

    def _mixture_weights(self, log_retriever: Tensor) -> Tensor:
        if self.config.weights == "prior":
            return log_retriever.detach()
        return torch.zeros_like(log_retriever)


def joint_leave_one_out(
    batch: Batch, model: LatentModel, cand: Candidates, valid: Tensor
) -> Tensor:
    """log p(y|x,S∖h_k) [B,K] from K joint readings, passage k (and padding) masked out."""
    width = cand.indices.shape[-1]
    base = torch.where(valid, 0.0, LOG_ZERO).to(torch.get_default_dtype())
    columns = []
    with torch.no_grad():
        for k in range(width):
            doc_log_mask = base.clone()
            doc_log_mask[:, k] = LOG_ZERO
            try:
                columns.append(model.joint_loglik(batch, cand, doc_log_mask).detach())
            except NotImplementedError as exc:
                raise ConfigError(
                    f"estimator loop: reader = 'joint' needs a generator that reads passages "
                    f"jointly ({exc}); use reader = 'mixture'"
                ) from None
    return torch.stack(columns, dim=-1)
