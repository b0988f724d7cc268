"""Check estimators against the exact gradient, block by block, on a corpus small enough to
sum over (`latentrag gradcheck`).

The reference gradient g has one block per checked role:

- retriever (the prior p(h|x)) and generator: the gradient of the exact objective
  -mean_b log Σ_{h∈corpus} p(h|x) p(y|x,h), p(h|x) = softmax(score / T) over the whole corpus,
  at the estimator's `objective()` (temperature T, log-likelihood reduction);
- posterior q(h|x,y): the gradient of KL(π || q) over the corpus, π = p(h|x,y) held fixed:
  what a sampler-based posterior update (JSA, reweighted wake-sleep) follows. VRAG's q
  follows KL(q || π) instead; both vanish at q = π, so its posterior block reads as a
  difference of objectives, not as noise.

For each estimator and seed, gradcheck restarts the estimator (`load_extra_state({})`, or the
chain state carried by a training run, then `reseed`), lets it take `burn_in` steps without
any update (chains and baselines warm up), and takes one step's gradient. Per block it
reports over the S seeds, with 95% bootstrap intervals (resampling seeds):

- the cosine of the mean gradient ḡ to g;
- the noise-corrected bias ||ḡ - g||² - tr Σ̂ / S (unbiased for the squared bias), / ||g||²;
- the variance tr Σ̂ / ||g||² of one step's gradient (Σ̂ the covariance over seeds);
- the block's share of ||g||², and the generator passes per example of the measured step.

What gradcheck reads from an estimator (the contract): `objective()`, `trained_roles()`,
`exact`, `persistent`, `reseed(seed)` and `load_extra_state(state)`. It compares only the
roles the estimator says it trains; `exact = False` labels an estimator biased by design.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor, nn

from latentrag.core.config import (
    ResolvedConfig,
    StrictModel,
    apply_overrides,
    read_toml,
    resolve,
)
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.interfaces import Estimator, Generator, Objective, Reduce
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import Registry, default_registry
from latentrag.core.types import Batch, Corpus, Example
from latentrag.toy.keycode import KeycodeConfig, exact_posterior, keycode_pipeline

#: the blocks gradcheck can compare, in table order
BLOCKS = ("retriever", "posterior", "generator")
#: the blocks of the marginal-likelihood gradient (the conformance kit's exact check)
LIKELIHOOD_BLOCKS = ("retriever", "generator")
#: shared [estimator] keys not copied to every estimator ("candidates": each keeps its own
#: default) unless an estimator's own section or a sweep sets them
SHARED_SKIP = ("candidates",)
BURN_IN_STEPS = 5
DEFAULT_ESTIMATORS = ("topk", "topk-token", "vrag", "jsa")


# -- parameters and the reference gradient ------------------------------------------------


def block_parameters(pipeline: Pipeline) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per checked role, each parameter once (a component shared by
    two roles counts for the first), roles without parameters left out."""
    seen: set[int] = set()
    blocks: dict[str, list[nn.Parameter]] = {}
    for role in BLOCKS:
        component = getattr(pipeline, role)
        if component is None:
            continue
        params = []
        for module in component.trainable_modules().values():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if params:
            blocks[role] = params
    return blocks


def checked_parameters(pipeline: Pipeline) -> list[nn.Parameter]:
    """Trainable parameters of the prior and the generator (each once), in a fixed order."""
    blocks = block_parameters(pipeline)
    return [p for role in LIKELIHOOD_BLOCKS for p in blocks.get(role, [])]


def _flat_gradient(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def _log_joint(pipeline: Pipeline, batch: Batch, temperature: float, reduce: Reduce) -> Tensor:
    cand = pipeline.candidates(batch, "corpus", len(pipeline.corpus))
    log_prior = pipeline.prior_logprobs(batch, cand, temperature)
    return log_prior + pipeline.loglik(batch, cand, reduce=reduce)


def exact_loss(pipeline: Pipeline, batch: Batch, temperature: float, reduce: Reduce) -> Tensor:
    """-mean_b log Σ_{h∈corpus} p(h|x) p(y|x,h), the prior normalised over the whole corpus."""
    return -torch.logsumexp(_log_joint(pipeline, batch, temperature, reduce), dim=-1).mean()


def exact_gradient(
    pipeline: Pipeline, batch: Batch, temperature: float = 0.1, reduce: Reduce = "sum"
) -> Tensor:
    """Flat gradient of `exact_loss` wrt `checked_parameters(pipeline)`."""
    return _flat_gradient(
        exact_loss(pipeline, batch, temperature, reduce), checked_parameters(pipeline)
    )


def reference_gradients(
    pipeline: Pipeline, batch: Batch, objective: Objective
) -> dict[str, Tensor]:
    """g per block: the exact objective's gradient (retriever, generator) and, for the
    posterior, the gradient of KL(π || q) over the corpus with π held fixed."""
    blocks = block_parameters(pipeline)
    joint = _log_joint(pipeline, batch, objective.temperature, objective.reduce)
    likelihood = [r for r in LIKELIHOOD_BLOCKS if r in blocks]
    out: dict[str, Tensor] = {}
    if likelihood:
        loss = -torch.logsumexp(joint, dim=-1).mean()
        flat = _flat_gradient(loss, [p for r in likelihood for p in blocks[r]])
        out.update(_split(flat, {r: blocks[r] for r in likelihood}))
    if "posterior" in blocks:
        pi = torch.softmax(joint.detach(), dim=-1)
        cand = pipeline.candidates(batch, "corpus", len(pipeline.corpus))
        log_q = pipeline.posterior_logprobs(batch, cand, objective.temperature)
        cross_entropy = -torch.where(pi > 0, pi * log_q, 0.0).sum(-1).mean()
        out["posterior"] = _flat_gradient(cross_entropy, blocks["posterior"])
    return {r: out[r].double() for r in BLOCKS if r in out}


def _split(
    flat: Tensor, blocks: Mapping[str, Sequence[nn.Parameter]], dim: int = 0
) -> dict[str, Tensor]:
    sizes = [sum(p.numel() for p in ps) for ps in blocks.values()]
    return dict(zip(blocks, torch.split(flat, sizes, dim=dim)))


# -- the estimator's contract ---------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What gradcheck reads from an estimator, read once (see the module docstring)."""

    objective: Objective
    trains: tuple[str, ...]
    exact: bool
    persistent: bool


def read_contract(label: str, estimator: Estimator) -> Contract:
    """The estimator's declarations; a missing or invalid one is a one-line ConfigError."""
    where = f"gradcheck: estimator {label!r}"
    try:
        objective = estimator.objective()
        trains = tuple(estimator.trained_roles())
        exact, persistent = bool(estimator.exact), bool(estimator.persistent)
    except LatentragError as exc:
        raise ConfigError(f"{where}: {_first_line(exc)}") from None
    except (AttributeError, TypeError) as exc:
        raise ConfigError(
            f"{where} does not implement the Estimator interface ({_first_line(exc)})"
        ) from None
    temperature = getattr(objective, "temperature", None)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"{where}: objective() gives temperature {temperature!r}, not > 0")
    if getattr(objective, "reduce", None) not in ("sum", "mean"):
        raise ConfigError(f"{where}: objective() gives reduce {objective.reduce!r}")
    return Contract(objective, trains, exact, persistent)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# -- measuring an estimator -----------------------------------------------------------------


class CountingGenerator(Generator):
    """Wraps the pipeline's generator to count passes: a forward per (example, passage)
    scored (one per example for a joint read), a backward per forward taken with grad on."""

    def __init__(self, inner: Generator) -> None:
        self.inner = inner
        self.forwards = 0
        self.backwards = 0

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _count(self, passes: int) -> None:
        self.forwards += passes
        if torch.is_grad_enabled():
            self.backwards += passes

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.inner.trainable_modules()

    def loglik(self, queries, passages, targets, reduce: Reduce = "sum") -> Tensor:
        self._count(sum(len(ps) for ps in passages))
        return self.inner.loglik(queries, passages, targets, reduce=reduce)

    def token_logprobs(self, queries, passages, targets) -> tuple[Tensor, Tensor]:
        self._count(sum(len(ps) for ps in passages))
        return self.inner.token_logprobs(queries, passages, targets)

    def loglik_joint(self, queries, passages, targets, doc_log_mask) -> Tensor:
        self._count(len(queries))
        return self.inner.loglik_joint(queries, passages, targets, doc_log_mask)

    def generate(self, queries, passages, max_new_tokens: int = 16) -> list[str]:
        return self.inner.generate(queries, passages, max_new_tokens)


@contextmanager
def counting(pipeline: Pipeline) -> Iterator[CountingGenerator]:
    """The pipeline's generator wrapped in a `CountingGenerator` for the block's duration."""
    inner = pipeline.generator
    counter = CountingGenerator(inner)
    pipeline.generator = counter
    try:
        yield counter
    finally:
        pipeline.generator = inner


@dataclass
class Measured:
    """One estimator's gradients over seeds, per block [S, P_block], and its cost."""

    gradients: dict[str, Tensor]
    forwards_per_example: float
    backwards_per_example: float


def restart(estimator: Estimator, seed: int, carried: dict | None = None) -> None:
    """Forget (or restore) the estimator's carried state, then restart its random streams."""
    estimator.load_extra_state(copy.deepcopy(carried) if carried else {})
    torch.manual_seed(seed)
    estimator.reseed(seed)


def estimator_gradients(
    pipeline: Pipeline,
    estimator: Estimator,
    batch: Batch,
    seeds: Sequence[int],
    burn_in: int = BURN_IN_STEPS,
    carried: dict | None = None,
    label: str = "estimator",
) -> Measured:
    """One step's gradient per seed and block, after `burn_in` update-free steps (none when
    a training run's state is `carried`: the chain is then where training left it)."""
    blocks = block_parameters(pipeline)
    params = [p for ps in blocks.values() for p in ps]
    rows, forwards, backwards = [], 0, 0
    with counting(pipeline) as counter:
        for seed in seeds:
            restart(estimator, seed, carried)
            with torch.no_grad():
                for _ in range(0 if carried else burn_in):
                    _loss(estimator, batch, pipeline, label)
            start_f, start_b = counter.forwards, counter.backwards
            loss = _loss(estimator, batch, pipeline, label)
            forwards += counter.forwards - start_f
            backwards += counter.backwards - start_b
            if loss.requires_grad:
                rows.append(_flat_gradient(loss, params).double())
            else:  # no gradient reaches any checked block
                rows.append(torch.zeros(sum(p.numel() for p in params), dtype=torch.double))
    per = len(seeds) * len(batch)
    return Measured(_split(torch.stack(rows), blocks, dim=1), forwards / per, backwards / per)


def _loss(estimator: Estimator, batch: Batch, pipeline: Pipeline, label: str) -> Tensor:
    try:
        return estimator.loss(batch, pipeline).loss
    except (LatentragError, ValueError, NotImplementedError) as exc:
        raise ConfigError(
            f"gradcheck: estimator {label!r} cannot run on this pipeline: {_first_line(exc)}"
        ) from None


# -- statistics over seeds ------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval."""

    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.value, self.low, self.high]


@dataclass(frozen=True)
class BlockStats:
    """One block of one estimator's gradient against the reference (relative to ||g||²)."""

    share: float  # ||g_block||² / ||g||²
    cosine: Interval  # cosine of the mean gradient
    bias: Interval  # (||ḡ - g||² - tr Σ̂ / S) / ||g||²
    variance: Interval  # tr Σ̂ / ||g||²
    cosine_mean: float  # mean over seeds of each seed's cosine


@dataclass(frozen=True)
class _Moments:
    """Sufficient statistics of the deviations d_s = g_s - g: Gram [S,S] and d_s·g [S]."""

    gram: Tensor
    dots: Tensor
    norm2: float

    @classmethod
    def of(cls, gradients: Tensor, reference: Tensor) -> _Moments:
        deviations = gradients - reference  # gradients [S, P], reference [P]
        return cls(deviations @ deviations.T, deviations @ reference, float(reference @ reference))

    def __add__(self, other: _Moments) -> _Moments:
        return _Moments(self.gram + other.gram, self.dots + other.dots, self.norm2 + other.norm2)

    def statistics(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(relative bias², relative variance, cosine of the mean) for each row of weights
        [R,S] (seed multiplicities summing to S: 1s, or bootstrap counts)."""
        s = weights.shape[1]
        mean_sq = torch.einsum("rs,st,rt->r", weights, self.gram, weights) / s**2
        spread = weights @ self.gram.diagonal() - s * mean_sq
        trace = spread / (s - 1) if s > 1 else torch.zeros_like(spread)
        bias = mean_sq - trace / s
        dot = weights @ self.dots / s
        norm2 = self.norm2
        mean_norm2 = (norm2 + 2 * dot + mean_sq).clamp_min(0.0)  # ||ḡ||², rounding aside
        cosine = (norm2 + dot) / torch.sqrt(norm2 * mean_norm2).clamp_min(1e-300)
        return bias / norm2, trace / norm2, cosine.clamp(-1.0, 1.0)

    def seed_cosines(self) -> Tensor:
        norm2, dots = self.norm2, self.dots
        return (norm2 + dots) / torch.sqrt(norm2 * (norm2 + 2 * dots + self.gram.diagonal()))


def _shifted_percentile(point: float, resampled: Tensor) -> Interval:
    """The 2.5% and 97.5% quantiles of the bootstrap replicates, shifted by the bootstrap's
    own bias (mean of the replicates - point): resampling seeds with replacement inflates
    ||d̄||² by about tr Σ̂ / S, which the noise-corrected bias² has already removed."""
    shift = float(resampled.mean()) - point
    low, high = (
        float(q) - shift
        for q in resampled.quantile(torch.tensor([0.025, 0.975], dtype=resampled.dtype))
    )
    return Interval(point, min(low, point), max(high, point))


def block_stats(moments: _Moments, share: float, resamples: int, seed: int = 0) -> BlockStats:
    """Point estimates and 95% bootstrap intervals over seeds (shifted percentiles)."""
    s = moments.gram.shape[0]
    if moments.norm2 <= 0:
        nan = Interval(math.nan, math.nan, math.nan)
        return BlockStats(share, nan, nan, nan, math.nan)
    point = [float(x[0]) for x in moments.statistics(torch.ones(1, s, dtype=torch.double))]
    if resamples > 0 and s > 1:
        generator = torch.Generator().manual_seed(seed)
        draws = torch.randint(s, (resamples, s), generator=generator)
        counts = torch.zeros(resamples, s, dtype=torch.double)
        counts.scatter_add_(1, draws, torch.ones_like(counts))
        resampled = moments.statistics(counts)
    else:
        resampled = [torch.tensor([v], dtype=torch.double) for v in point]
    intervals = [_shifted_percentile(v, r) for v, r in zip(point, resampled)]
    cosine_mean = float(moments.seed_cosines().clamp(-1, 1).mean())
    return BlockStats(share, intervals[2], intervals[0], intervals[1], cosine_mean)


# -- comparing estimators -------------------------------------------------------------------


@dataclass
class GradcheckRow:
    """One estimator against the reference gradient, per block it trains."""

    estimator: str
    exact: bool
    trains: tuple[str, ...]
    objective: Objective
    blocks: dict[str, BlockStats]
    #: the retriever and generator blocks it trains, together (the marginal likelihood)
    likelihood: BlockStats | None
    forwards_per_example: float
    backwards_per_example: float
    #: roles it trains that gradcheck has no reference for (e.g. a reranker)
    unchecked: tuple[str, ...] = ()

    @property
    def cosine_of_mean(self) -> float:
        """Cosine of the seed-averaged gradient to the exact marginal-likelihood gradient,
        over the retriever and generator blocks it trains (nan when it trains neither)."""
        return self.likelihood.cosine.value if self.likelihood is not None else math.nan

    @property
    def cosine_mean(self) -> float:
        return self.likelihood.cosine_mean if self.likelihood is not None else math.nan


def reference_shares(reference: Mapping[str, Tensor]) -> dict[str, float]:
    """Each block's share of ||g||² (all blocks of the reference)."""
    norms = {r: float(g @ g) for r, g in reference.items()}
    total = sum(norms.values())
    return {r: (n / total if total > 0 else math.nan) for r, n in norms.items()}


def compare(
    pipeline: Pipeline,
    estimators: Mapping[str, Estimator],
    batch: Batch,
    seeds: Sequence[int],
    burn_in: int = BURN_IN_STEPS,
    resamples: int = 1000,
    carried: Mapping[str, dict] | None = None,
) -> list[GradcheckRow]:
    """One row per estimator, each compared with the reference at its own objective, on
    the blocks it trains. `carried`: label -> estimator state to start every seed from."""
    contracts = {label: read_contract(label, est) for label, est in estimators.items()}
    references: dict[Objective, dict[str, Tensor]] = {}
    rows = []
    for label, estimator in estimators.items():
        contract = contracts[label]
        if contract.objective not in references:
            references[contract.objective] = reference_gradients(
                pipeline, batch, contract.objective
            )
        reference = references[contract.objective]
        state = (carried or {}).get(label)
        measured = estimator_gradients(
            pipeline, estimator, batch, list(seeds), burn_in, state, label
        )
        rows.append(_row(label, contract, reference, measured, resamples))
    return rows


def _row(
    label: str,
    contract: Contract,
    reference: Mapping[str, Tensor],
    measured: Measured,
    resamples: int,
) -> GradcheckRow:
    shares = reference_shares(reference)
    compared = [r for r in BLOCKS if r in contract.trains and r in reference]
    moments = {r: _Moments.of(measured.gradients[r], reference[r]) for r in compared}
    blocks = {r: block_stats(moments[r], shares[r], resamples) for r in compared}
    likely = [r for r in compared if r in LIKELIHOOD_BLOCKS]
    likelihood = None
    if likely:
        total = moments[likely[0]]
        for r in likely[1:]:
            total = total + moments[r]
        likelihood = block_stats(total, sum(shares[r] for r in likely), resamples)
    return GradcheckRow(
        estimator=label,
        exact=contract.exact,
        trains=contract.trains,
        objective=contract.objective,
        blocks=blocks,
        likelihood=likelihood,
        forwards_per_example=measured.forwards_per_example,
        backwards_per_example=measured.backwards_per_example,
        unchecked=tuple(r for r in contract.trains if r not in BLOCKS),
    )


def state_summary(
    pipeline: Pipeline, batch: Batch, objective: Objective, k: int | None = None
) -> dict[str, float]:
    """Where the parameters stand: KL(π || q) over the corpus (nats, mean over questions),
    π's mass outside the prior's top-k, and the prior's gold recall@1 (when gold is known)."""
    summary: dict[str, float] = {}
    with torch.no_grad():
        pi = exact_posterior(pipeline, batch, objective.temperature)
        cand = pipeline.candidates(batch, "corpus", len(pipeline.corpus))
        log_prior = pipeline.prior_logprobs(batch, cand, objective.temperature)
        if pipeline.posterior is not None:
            log_q = pipeline.posterior_logprobs(batch, cand, objective.temperature).double()
            kl = torch.where(pi > 0, pi * (pi.clamp_min(1e-300).log() - log_q), 0.0).sum(-1)
            summary["kl_pi_q"] = float(kl.mean())
        if k is not None and k < len(pipeline.corpus):
            top = log_prior.topk(k, dim=-1).indices
            summary["outside_top_k"] = float(1 - pi.gather(1, top).sum(-1).mean())
        gold = _gold_rows(pipeline.corpus, batch.examples)
        if gold is not None:
            best = log_prior.argmax(-1)
            summary["prior_recall_at_1"] = float((best == gold).double().mean())
    return summary


def _gold_rows(corpus: Corpus, examples: Sequence[Example]) -> Tensor | None:
    if not all(e.gold_ids and e.gold_ids[0] in corpus for e in examples):
        return None
    return torch.tensor([corpus.index_of(e.gold_ids[0]) for e in examples])


# -- the gradcheck config file --------------------------------------------------------------


class EstimatorEntry(BaseModel):
    """An `[estimators.<label>]` section: a registered estimator and its own options."""

    model_config = ConfigDict(extra="allow")
    name: str


class GradcheckSettings(StrictModel):
    """The `[gradcheck]` section (command-line options override it)."""

    estimators: list[str] | None = Field(None, description="labels or registry names")
    seeds: int = Field(16, ge=1, description="seeds per estimator")
    burn_in: int = Field(BURN_IN_STEPS, ge=0, description="update-free steps before measuring")
    resamples: int = Field(1000, ge=0, description="bootstrap resamples for the intervals")
    examples: int | None = Field(None, ge=1, description="questions in the batch (default all)")


class GradcheckFile(StrictModel):
    """A gradcheck config: a tractable benchmark, the compared estimators and settings."""

    benchmark: KeycodeConfig
    estimator: dict[str, Any] = Field(
        default_factory=dict, description="keys shared by every compared estimator having them"
    )
    estimators: dict[str, EstimatorEntry] = Field(default_factory=dict)
    gradcheck: GradcheckSettings = Field(default_factory=GradcheckSettings)

    @field_validator("estimator")
    @classmethod
    def _no_name(cls, shared: dict[str, Any]) -> dict[str, Any]:
        if "name" in shared:
            raise ValueError(
                "holds keys shared by the compared estimators; name them in [gradcheck] "
                "estimators or as [estimators.<label>] sections"
            )
        return shared


@dataclass
class GradcheckSetup:
    """Everything a gradcheck run needs, from a gradcheck config (`benchmark` set) or from a
    pipeline config (`pipeline_config` set, with its data)."""

    source: str
    settings: GradcheckSettings
    shared: dict[str, Any]
    entries: dict[str, EstimatorEntry] = field(default_factory=dict)
    benchmark: KeycodeConfig | None = None
    pipeline_config: ResolvedConfig | None = None
    examples: list[Example] = field(default_factory=list)
    corpus: Corpus | None = None
    registry: Registry | None = None
    #: estimator keys forced onto every estimator that has them (a sweep)
    forced: dict[str, Any] = field(default_factory=dict)
    _pipeline: Pipeline | None = None

    def override(self, **changes: Any) -> None:
        """Replace settings (command-line options; None leaves one as it is)."""
        given = {k: v for k, v in changes.items() if v is not None}
        try:
            self.settings = GradcheckSettings.model_validate(
                {**self.settings.model_dump(), **given}
            )
        except ValidationError as exc:
            raise ConfigError(_validation_line("gradcheck", "", exc, "--")) from None

    def labels(self, requested: Sequence[str] | None = None) -> list[str]:
        if requested:
            return list(requested)
        if self.settings.estimators:
            return list(self.settings.estimators)
        return list(self.entries) or list(DEFAULT_ESTIMATORS)

    def build_estimators(self, labels: Sequence[str]) -> dict[str, Estimator]:
        return {label: self.build_estimator(label) for label in labels}

    def build_estimator(self, label: str) -> Estimator:
        """The estimator a label names: an `[estimators.<label>]` section, else a registry
        name, with the shared keys its config model has."""
        registry = self.registry or default_registry()
        entry = self.entries.get(label)
        name = entry.name if entry is not None else label
        where = f"estimators.{label}" if entry is not None else "estimator"
        try:
            spec = registry.get("estimator", name)
        except LatentragError as exc:
            place = f"{self.source}: {where}.name" if entry is not None else "gradcheck"
            raise ConfigError(f"{place}: {_first_line(exc)}") from None
        fields = spec.config_model.model_fields
        options = {k: v for k, v in self.shared.items() if k in fields and k not in SHARED_SKIP}
        options.update(dict(entry.model_extra or {}) if entry is not None else {})
        options.update({k: v for k, v in self.forced.items() if k in fields})
        try:
            config = spec.config_model.model_validate(options)
        except ValidationError as exc:
            raise ConfigError(_validation_line(self.source, where, exc)) from None
        return spec.build(config, self._context())

    def _context(self) -> Any:
        if self.pipeline_config is not None:
            return self.pipeline_config.build_context()
        from latentrag.core.config import BuildContext

        return BuildContext(self.registry or default_registry())

    def has_estimator_key(self, key: str, labels: Sequence[str]) -> bool:
        registry = self.registry or default_registry()
        for label in labels:
            entry = self.entries.get(label)
            try:
                spec = registry.get("estimator", entry.name if entry else label)
            except LatentragError:
                continue
            if key in spec.config_model.model_fields:
                return True
        return False

    def pipeline(self, temperature: float) -> tuple[Pipeline, Batch]:
        """The pipeline and the batch (the first `settings.examples` questions)."""
        if self.benchmark is not None:
            pipeline, batch = keycode_pipeline(self.benchmark, temperature)
            return pipeline, Batch(batch.examples[: self.settings.examples])
        assert self.pipeline_config is not None and self.corpus is not None
        if self._pipeline is None:
            if "generator" not in self.pipeline_config.components:
                raise ConfigError(f"{self.source}: gradcheck needs a [generator] section")
            self._pipeline = Pipeline.from_config(self.pipeline_config, self.corpus)
        count = self.settings.examples or 4
        return self._pipeline, Batch(self.examples[:count])


def _validation_line(source: str, where: str, exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = prefix + ".".join([p for p in [where, *(str(p) for p in err["loc"])] if p])
        key = key.replace("_", "-") if prefix else key
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def load_setup(
    path: str | Path,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    base: Path | None = None,
) -> GradcheckSetup:
    """Read a gradcheck config (with a `[benchmark]` section) or a pipeline config (its
    `[data]` gives the corpus and the train split's questions)."""
    data = apply_overrides(read_toml(path), list(overrides))
    source = str(path)
    if "benchmark" not in data:
        return _pipeline_setup(data, source, registry, base or Path(path).parent)
    try:
        parsed = GradcheckFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_line(source, "", exc)) from None
    return GradcheckSetup(
        source=source,
        settings=parsed.gradcheck,
        shared=parsed.estimator,
        entries=parsed.estimators,
        benchmark=parsed.benchmark,
        registry=registry,
    )


def _pipeline_setup(
    data: dict[str, Any], source: str, registry: Registry | None, base: Path
) -> GradcheckSetup:
    from latentrag.data.dataset import load_dataset

    resolved = resolve(data, source, registry)
    dataset = load_dataset(resolved.pipeline.data, base=base)
    section = resolved.pipeline.estimator
    return GradcheckSetup(
        source=source,
        settings=GradcheckSettings(),
        shared=dict(section.model_extra or {}) if section is not None else {},
        pipeline_config=resolved,
        examples=dataset.split("train"),
        corpus=dataset.corpus,
        registry=resolved.registry,
    )


# -- runs: one point, a sweep, a training run -----------------------------------------------


@dataclass
class GradcheckResult:
    """The comparison at one point (a sweep value or a training step)."""

    rows: list[GradcheckRow]
    shares: dict[str, float]  # each block's share of ||g||² at the first row's objective
    objective: Objective
    summary: dict[str, float]
    key: str = ""
    value: Any = None


@dataclass(frozen=True)
class Sweep:
    """A setting and the values to measure at: `key=v1,v2,...`."""

    key: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        import tomllib

        key, sep, raw = text.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,..., e.g. k=2,4,8")
        values = []
        for item in raw.split(","):
            try:
                values.append(tomllib.loads(f"v = {item.strip()}")["v"])
            except tomllib.TOMLDecodeError:
                values.append(item.strip())
        return cls(key.strip(), tuple(values))


@dataclass(frozen=True)
class Training:
    """Measure at states along a short training run of the benchmark's own models."""

    steps: int
    snapshots: int = 3
    estimator: str | None = None  # label; default: the first persistent compared estimator
    lr: float = 0.05


def run_point(
    setup: GradcheckSetup,
    labels: Sequence[str],
    carried: Mapping[str, dict] | None = None,
    state: tuple[Pipeline, Batch] | None = None,
) -> GradcheckResult:
    """Build the estimators (and the pipeline, unless `state` gives it) and compare."""
    estimators = setup.build_estimators(labels)
    contracts = {label: read_contract(label, est) for label, est in estimators.items()}
    objective = next(iter(contracts.values())).objective
    pipeline, batch = state if state is not None else setup.pipeline(objective.temperature)
    settings = setup.settings
    rows = compare(
        pipeline,
        estimators,
        batch,
        range(settings.seeds),
        settings.burn_in,
        settings.resamples,
        carried,
    )
    shares = reference_shares(reference_gradients(pipeline, batch, objective))
    k = setup.forced.get("k", setup.shared.get("k"))
    summary = state_summary(pipeline, batch, objective, k if isinstance(k, int) else None)
    return GradcheckResult(rows, shares, objective, summary)


def run_gradcheck(
    setup: GradcheckSetup,
    estimators: Sequence[str] | None = None,
    sweep: Sweep | None = None,
    training: Training | None = None,
) -> list[GradcheckResult]:
    """Compare the estimators once, at each value of a sweep, or along a training run."""
    labels = setup.labels(estimators)
    if not labels:
        raise ConfigError("gradcheck: no estimators to compare")
    if sweep is not None and training is not None:
        raise ConfigError("gradcheck: --sweep and --train cannot be combined")
    if training is not None:
        return _along_training(setup, labels, training)
    if sweep is None:
        return [run_point(setup, labels)]
    results = []
    for value in sweep.values:
        result = run_point(_with_value(setup, sweep.key, value, labels), labels)
        result.key, result.value = sweep.key, value
        results.append(result)
    return results


def _with_value(setup: GradcheckSetup, key: str, value: Any, labels: Sequence[str]):
    """A copy of the setup with one setting changed (a benchmark key, `burn_in`,
    `seeds`, or an estimator key forced onto every estimator having it)."""
    section, _, name = key.rpartition(".")
    point = copy.copy(setup)
    benchmark_keys = KeycodeConfig.model_fields if setup.benchmark is not None else {}
    try:
        if section in ("", "gradcheck") and name in ("burn_in", "seeds", "resamples"):
            fields = setup.settings.model_dump() | {name: value}
            point.settings = GradcheckSettings.model_validate(fields)
        elif section in ("", "benchmark") and name in benchmark_keys and name != "name":
            fields = setup.benchmark.model_dump() | {name: value}
            point.benchmark = KeycodeConfig.model_validate(fields)
        elif section in ("", "estimator") and setup.has_estimator_key(name, labels):
            point.forced = {**setup.forced, name: value}
        else:
            raise ConfigError(
                f"--sweep {key!r}: not a benchmark key, burn_in/seeds, nor a key of any "
                f"compared estimator ({', '.join(labels)})"
            )
    except ValidationError as exc:
        raise ConfigError(_validation_line(f"--sweep {key}={value!r}", "", exc)) from None
    return point


def _along_training(
    setup: GradcheckSetup, labels: Sequence[str], training: Training
) -> list[GradcheckResult]:
    """Train with one estimator (Adam on the roles it trains, the whole batch per step) and
    compare at evenly spaced steps; persistent estimators of the same registry name start
    every seed from the trainer's chain state at that step."""
    if training.steps < 1 or training.snapshots < 1:
        raise ConfigError("gradcheck: --train needs steps >= 1 and snapshots >= 1")
    estimators = setup.build_estimators(labels)
    contracts = {label: read_contract(label, est) for label, est in estimators.items()}
    trainer_label = training.estimator or next(
        (label for label, c in contracts.items() if c.persistent), labels[0]
    )
    trainer = setup.build_estimator(trainer_label)
    contract = read_contract(trainer_label, trainer)
    pipeline, batch = setup.pipeline(contract.objective.temperature)
    blocks = block_parameters(pipeline)
    params = [p for r in contract.trains if r in blocks for p in blocks[r]]
    optimizer = torch.optim.Adam(params, lr=training.lr)
    trainer_name = _registry_name(setup, trainer_label)
    shared_state = [
        label
        for label, c in contracts.items()
        if c.persistent and _registry_name(setup, label) == trainer_name
    ]
    marks = _snapshot_steps(training.steps, training.snapshots)
    restart(trainer, 0)
    results = []
    for step in range(training.steps + 1):
        if step in marks:
            state = trainer.extra_state()
            carried = {label: state for label in shared_state} if step > 0 else None
            result = run_point(setup, labels, carried, (pipeline, batch))
            result.key, result.value = "step", step
            results.append(result)
        if step < training.steps:
            optimizer.zero_grad()
            _loss(trainer, batch, pipeline, trainer_label).backward()
            optimizer.step()
    return results


def _snapshot_steps(steps: int, snapshots: int) -> set[int]:
    if snapshots == 1:
        return {steps}
    return {round(i * steps / (snapshots - 1)) for i in range(snapshots)}


def _registry_name(setup: GradcheckSetup, label: str) -> str:
    entry = setup.entries.get(label)
    return entry.name if entry is not None else label


#: re-exported for callers that only need the table
def format_table(results: Sequence[GradcheckResult] | Sequence[GradcheckRow]) -> str:
    from latentrag.experiments.gradcheck_report import format_results

    return format_results(results)


__all__ = [
    "BLOCKS",
    "BlockStats",
    "Contract",
    "GradcheckResult",
    "GradcheckRow",
    "GradcheckSetup",
    "Interval",
    "Sweep",
    "Training",
    "block_parameters",
    "checked_parameters",
    "compare",
    "exact_gradient",
    "exact_loss",
    "format_table",
    "load_setup",
    "read_contract",
    "reference_gradients",
    "run_gradcheck",
]
