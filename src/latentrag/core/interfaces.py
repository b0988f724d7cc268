"""The contracts every component implements.

The core knows these four abstract kinds and nothing concrete. Trainable components are
also `torch.nn.Module`s (a concrete class inherits from both); the trainer collects their
parameters through `trainable_modules()`.

Shapes: B questions in a batch, K candidate passages per question, T answer tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor, nn

    from latentrag.core.types import Batch, Candidates, Corpus

Reduce = Literal["sum", "mean"]


class Component:
    """What every component shares: its validated config and optional persistence."""

    config: object = None

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Named modules whose parameters the trainer may update; empty when frozen."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint (by default those of the trainable modules)."""
        state: dict[str, Tensor] = {}
        for prefix, module in self.trainable_modules().items():
            for key, value in module.state_dict().items():
                state[f"{prefix}.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for prefix, module in self.trainable_modules().items():
            own = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(own)


class Retriever(Component, ABC):
    """Finds candidate passages for a query; when trainable, scores them differentiably.

    Used as the prior p(h|x) it is given questions; used as the posterior q(h|x,y) it is
    given question and answer joined into one query string (see `Pipeline`).
    """

    #: re-encode the corpus every this many training steps (0: use train.refresh_index_every)
    refresh_every: int = 0

    @abstractmethod
    def index(self, corpus: Corpus) -> None:
        """Prepare to search `corpus`: load the index saved for it, or build one."""

    def build(self, corpus: Corpus) -> None:
        """Build the index from scratch, replacing any saved one (`latentrag index build`)."""
        self.index(corpus)

    @abstractmethod
    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        """The k best passages per query, best first: indices [B,k], scores [B,k]."""

    def score(self, queries: Sequence[str], passage_rows: Tensor) -> Tensor:
        """Scores [B,K] of the given corpus rows [B,K], differentiable when trainable."""
        raise NotImplementedError(f"{type(self).__name__} cannot score arbitrary passages")

    def refresh(self) -> None:
        """Re-encode the corpus after the encoders changed (dense retrievers); default no-op."""

    def save(self, directory: Path) -> None:
        """Persist the index (not the trainable weights, which go to checkpoints)."""

    def load(self, directory: Path, corpus: Corpus | None = None) -> None:
        """Load an index written by `save` for `corpus` (default: the one last indexed);
        refuse one built for another corpus or model."""


class Reranker(Component, ABC):
    """Rescores a retriever's candidates; scores are differentiable."""

    @abstractmethod
    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Tensor:
        """Scores [B,K] for passages[b][k] given queries[b]."""


class Generator(Component, ABC):
    """A conditional language model p(y | x, h)."""

    @abstractmethod
    def loglik(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        reduce: Reduce = "sum",
    ) -> Tensor:
        """Teacher-forced log p(y_b | x_b, h_bk) of the target tokens only: [B,K].

        reduce="sum" is the sequence log-probability; "mean" divides by the target length.
        """

    @abstractmethod
    def token_logprobs(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
    ) -> tuple[Tensor, Tensor]:
        """Per-token log-probs [B,K,T] of the targets and their mask [B,T] (for RAG-Token)."""

    def loglik_joint(
        self,
        queries: Sequence[str],
        passages: Sequence[Sequence[str]],
        targets: Sequence[str],
        doc_log_mask: Tensor,
    ) -> Tensor:
        """log p(y_b | x_b, all K passages) [B], reading the passages at once with
        doc_log_mask [B,K] added to the attention towards passage k's tokens (G-Rerank)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read passages jointly")

    @abstractmethod
    def generate(
        self, queries: Sequence[str], passages: Sequence[Sequence[str]], max_new_tokens: int = 16
    ) -> list[str]:
        """Greedy answers, one per query, conditioned on its passages."""


@dataclass(frozen=True)
class Objective:
    """The exact objective an estimator's gradient is compared with (`latentrag gradcheck`):
    -log Σ_{h∈corpus} p(h|x) p(y|x,h), with p(h|x) = softmax(score / temperature) over the
    whole corpus and log p(y|x,h) reduced as `reduce` says ("sum" or per-token "mean")."""

    temperature: float = 1.0
    reduce: Reduce = "sum"


@dataclass
class EstimatorOutput:
    """A loss whose gradient is the estimator's gradient, and named scalar diagnostics."""

    loss: Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)
    generator_forwards: int = 0
    generator_backwards: int = 0


class LatentModel(Protocol):
    """What an estimator may ask of the pipeline it drives (implemented by `Pipeline`).

    Log-probabilities are normalised over the candidate set (softmax of score/temperature);
    padded candidate slots hold -inf.
    """

    def candidates(self, batch: Batch, source: str, k: int) -> Candidates:
        """Candidate passages for the batch: "prior", "posterior" or "union" (deduplicated)."""

    corpus: Corpus
    #: running count of (example, passage) pairs the generator has scored
    generator_forwards: int

    def prior_logprobs(
        self, batch: Batch, candidates: Candidates, temperature: float = 1.0
    ) -> Tensor:
        """log p(h|x) = log softmax(score/temperature) over the candidates [B,K]."""

    def posterior_logprobs(
        self, batch: Batch, candidates: Candidates, temperature: float = 1.0
    ) -> Tensor:
        """log q(h|x,y) = log softmax(score/temperature) over the candidates [B,K]."""

    def loglik(
        self, batch: Batch, candidates: Candidates, reduce: Reduce = "sum", grad: bool = True
    ) -> Tensor:
        """log p(y|x,h) [B,K] for every valid candidate (0 at padding)."""

    def token_logprobs(self, batch: Batch, candidates: Candidates) -> tuple[Tensor, Tensor]:
        """Per-token log p(y_t|x,h,y_<t) [B,K,T] and target mask [B,T]."""

    def rows_loglik(
        self, batch: Batch, rows: Tensor, reduce: Reduce = "sum", grad: bool = True
    ) -> Tensor:
        """log p(y|x,h) [B,N] for explicit corpus rows [B,N] (N may differ from K)."""

    def rerank_scores(self, batch: Batch, candidates: Candidates) -> Tensor:
        """The reranker's scores [B,K] of the candidates, differentiable."""

    def joint_loglik(self, batch: Batch, candidates: Candidates, doc_log_mask: Tensor) -> Tensor:
        """log p(y|x, all K candidates) [B] with doc_log_mask [B,K] added to the attention
        towards each candidate's tokens (G-Rerank)."""


class Estimator(Component, ABC):
    """Turns a batch into a loss whose gradient is this estimator's gradient.

    It never knows which retriever or generator it drives: it talks to a `LatentModel`.
    What it declares (class attributes, read by the trainer, `config validate` and
    `latentrag gradcheck`; role names as in `latentrag.core.roles`):

    - ``trains``: the roles whose parameters it updates; the trainer freezes the others and
      the conformance kit checks that no gradient reaches them;
    - ``requires``: config sections it cannot work without (checked when a config is
      resolved; a light config model may carry the same ClassVar so that the check needs no
      import of the estimator's module);
    - ``exact``: True when its gradient is meant to equal the exact marginal-likelihood
      gradient in expectation for the roles it trains (possibly only in a limit, e.g. all
      candidates or long chains); False when it is biased by design (PDist, EMDR2);
    - ``persistent``: whether it carries state from one visit of an example to the next.
    """

    trains: tuple[str, ...] = ("retriever", "generator")
    requires: tuple[str, ...] = ("retriever", "generator")
    exact: bool = True
    persistent: bool = False

    @abstractmethod
    def loss(self, batch: Batch, model: LatentModel) -> EstimatorOutput:
        """The surrogate loss for `batch` and its diagnostics."""

    def trained_roles(self) -> tuple[str, ...]:
        """`trains` in today's role names (the old "prior" is read as "retriever")."""
        from .roles import canonical_roles

        return canonical_roles(self.trains, f"{type(self).__name__}.trains")

    def objective(self) -> Objective:
        """The exact objective this estimator's gradient is compared with.

        By default read from the config's ``temperature`` (required) and ``loglik``
        ("sum" when absent); an estimator whose settings are named otherwise overrides this.
        Raises `ConfigError` (one line) when the estimator declares no temperature.
        """
        from .errors import ConfigError

        config = self.config
        temperature = getattr(config, "temperature", None)
        if not isinstance(temperature, (int, float)):
            raise ConfigError(
                f"estimator {type(self).__name__} declares no temperature for p(h|x): give its "
                "config a `temperature` key or override Estimator.objective()"
            )
        return Objective(float(temperature), getattr(config, "loglik", "sum"))

    def extra_state(self) -> dict:
        """Estimator state to checkpoint (e.g. JSA's persistent chain cache), JSON-able."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore `extra_state()`; an empty dict forgets any carried state."""

    def reseed(self, seed: int) -> None:
        """Restart the estimator's own random stream (a no-op for deterministic ones)."""
