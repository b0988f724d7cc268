"""What the transformers generators (`hf-causal-lm`, `hf-seq2seq`) share: the trainable
state, the device and padding id, the eval-mode switch for generation, the batch-shape
check, `loglik` from `token_logprobs`, and activation (gradient) checkpointing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from types import MethodType

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Generator, Reduce

#: keyword arguments through which a layer reads or extends a key/value cache
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute `model`'s layer activations in backward instead of keeping them.

    Non-reentrant checkpointing: gradients reach every input of a layer, including the
    float attention masks that carry G-Rerank's document mask and the hidden states of
    frozen embeddings under LoRA, with no need for `enable_input_require_grads`.
    transformers checkpoints only in training mode; a frozen (eval-mode) reader whose
    document mask is trained is checkpointed too (`_checkpointed_in_eval`). Forwards
    without gradients (generation, evaluation) or over a key/value cache (the passage
    cache's question-and-answer tail) are never checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    settings = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.forward = MethodType(_checkpointed_in_eval, module)


def _checkpointed_in_eval(layer: nn.Module, *args, **kwargs):
    """A layer's forward, checkpointed also in eval mode (dropout off) while gradients are
    recorded; training mode is left to transformers' own checkpointing."""
    forward = partial(type(layer).forward, layer)
    caching = kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in _CACHE_KEYWORDS)
    if layer.training or caching or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(partial(forward, **kwargs), *args, use_reentrant=False)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any layer of `model` recomputes its activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def load_error(directory: object, exc: Exception) -> ConfigError:
    """The one-line error for a model folder transformers cannot load."""
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"generator.model: cannot load {str(directory)!r}: {first_line}")


def common_width(passages: Sequence[Sequence[str]]) -> int:
    """K, the number of passages every query has (ValueError when they differ or K = 0)."""
    widths = {len(row) for row in passages}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"every query needs the same number K>=1 of passages, got {widths}")
    return widths.pop()


class HFGeneratorBase(Generator, nn.Module):
    """A generator wrapping one transformers model `self.model` and `self.tokenizer`.

    Its state is the model's trainable parameters under "lm." (all weights, or just the
    LoRA adapters); subclasses set `config` (with `freeze`), `model` and `tokenizer`."""

    config: object
    model: nn.Module

    def _init_model(self, model: nn.Module, tokenizer, config) -> None:
        """Check the tokenizer, apply `freeze` / `gradient_checkpointing` and keep both;
        the wrapper starts in eval mode (like from_pretrained)."""
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"generator.model {config.model!r}: tokenizer has no eos token")
        if config.freeze:
            model.requires_grad_(False)
        if config.gradient_checkpointing:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
            enable_gradient_checkpointing(base)
        self.tokenizer = tokenizer
        self.model = model
        self.train(False)

    # -- Component -------------------------------------------------------------------

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {} if self.config.freeze else {"lm": self.model}  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Tensor]:  # type: ignore[override]
        """The trainable parameters only (all weights, or just the LoRA adapters)."""
        return {
            f"lm.{name}": param.detach()
            for name, param in self.model.named_parameters()
            if param.requires_grad
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # type: ignore[override]
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"generator checkpoint mismatch: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        own = {key.removeprefix("lm."): value for key, value in state.items()}
        self.model.load_state_dict(own, strict=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the model recomputes activations in backward (while it trains)."""
        return is_checkpointing(self.model)

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """The model in eval mode for the block, its mode restored after (the trainer
        toggles the model, not this wrapper)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _joint_batches(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        doc_log_mask: Tensor | None,
    ) -> Iterator[tuple[Sequence[str], Sequence[Sequence[str]], Tensor | None]]:
        """(queries, passages, doc_log_mask) in slices of `config.batch_size` questions."""
        for start in range(0, len(queries), self.config.batch_size):
            end = start + self.config.batch_size
            mask = None if doc_log_mask is None else doc_log_mask[start:end]
            yield queries[start:end], passages[start:end], mask

    # -- scoring ---------------------------------------------------------------------

    def token_logprobs(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
    ) -> tuple[Tensor, Tensor]:
        """log p(y_t | x, h, y_<t) [B,K,T] for every (query, passage) pair and the target
        mask [B,T]; the pairs are scored by the subclass's `_pair_logprobs`."""
        if not len(queries) == len(passages) == len(targets):
            raise ValueError("queries, passages and targets must have the same length")
        k = common_width(passages)
        target_ids = self._target_ids(targets)
        logprobs = self._pair_logprobs(
            [q for q, row in zip(queries, passages) for _ in row],
            [p for row in passages for p in row],
            [target_ids[b] for b in range(len(queries)) for _ in range(k)],
        )  # [B*K, T]
        lengths = torch.tensor([len(t) for t in target_ids])
        mask = torch.arange(logprobs.shape[1]) < lengths[:, None]
        return logprobs.view(len(queries), k, -1), mask.to(logprobs.device)

    def _target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Each target's token ids, as the model scores them."""
        raise NotImplementedError

    def _pair_logprobs(
        self, queries: list[str], passages: list[str], target_ids: list[list[int]]
    ) -> Tensor:
        """log p(target token | query, passage, earlier target tokens) [n, T] for n pairs,
        0 past each target (T: the longest target)."""
        raise NotImplementedError

    def loglik(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        reduce: Reduce = "sum",
    ) -> Tensor:
        logprobs, mask = self.token_logprobs(queries, passages, targets)
        total = logprobs.sum(-1)  # padded target slots hold 0
        if reduce == "sum":
            return total
        if reduce == "mean":
            return total / mask.sum(-1, keepdim=True)
        raise ValueError(f"reduce must be 'sum' or 'mean', not {reduce!r}")
