"""Check estimators against the exact gradient on a corpus small enough to sum over.

The exact objective is the marginal log-likelihood over the WHOLE corpus,
-mean_b log Σ_{h∈corpus} p(h|x) p(y|x,h) with p(h|x) a softmax over the corpus. It does not
depend on the posterior q, so gradients are compared on the prior's and the generator's
trainable parameters only. For each estimator and seed we take one step's gradient and
report its cosine to the exact gradient, its bias and its variance over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentrag.core.config import ResolvedConfig
from latentrag.core.interfaces import Estimator, Reduce
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch, Corpus, Example
from latentrag.experiments import tables

#: estimator config keys that gradcheck copies from the config's [estimator] section to every
#: estimator it builds (when that estimator has the key); "candidates" is left to each default
SHARED_SKIP = ("candidates",)
BURN_IN_STEPS = 5


@dataclass
class GradcheckRow:
    """One estimator's gradient against the exact gradient, over seeds."""

    estimator: str
    cosine_mean: float  # mean over seeds of the per-seed cosine
    cosine_of_mean: float  # cosine of the seed-averaged gradient
    relative_bias: float  # ||mean - exact|| / ||exact||
    variance: float  # trace(cov over seeds) / ||exact||^2
    forwards_per_example: float  # generator forwards per example in one step


def checked_parameters(pipeline: Pipeline) -> list[nn.Parameter]:
    """Trainable parameters of the prior and the generator (each once), in a fixed order."""
    params: dict[int, nn.Parameter] = {}
    for component in (pipeline.retriever, pipeline.generator):
        if component is None:
            continue
        for module in component.trainable_modules().values():
            for p in module.parameters():
                if p.requires_grad:
                    params.setdefault(id(p), p)
    return list(params.values())


def _flat_gradient(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def exact_loss(pipeline: Pipeline, batch: Batch, temperature: float, reduce: Reduce) -> Tensor:
    """-mean_b log Σ_{h∈corpus} p(h|x) p(y|x,h), the prior normalised over the whole corpus."""
    cand = pipeline.candidates(batch, "corpus", len(pipeline.corpus))
    log_prior = pipeline.prior_logprobs(batch, cand, temperature)
    loglik = pipeline.loglik(batch, cand, reduce=reduce)
    return -torch.logsumexp(log_prior + loglik, dim=-1).mean()


def exact_gradient(
    pipeline: Pipeline, batch: Batch, temperature: float = 0.1, reduce: Reduce = "sum"
) -> Tensor:
    """Flat gradient of `exact_loss` wrt `checked_parameters(pipeline)`."""
    return _flat_gradient(
        exact_loss(pipeline, batch, temperature, reduce), checked_parameters(pipeline)
    )


def reseed(estimator: Estimator, seed: int) -> None:
    """Re-seed torch and the estimator's own generator, and forget any chain state."""
    torch.manual_seed(seed)
    estimator.reseed(seed)
    if estimator.persistent:
        estimator.load_extra_state({})  # empty cache, same (re-seeded) random stream


def estimator_gradients(
    pipeline: Pipeline,
    estimator: Estimator,
    batch: Batch,
    seeds: Sequence[int],
    burn_in: int = BURN_IN_STEPS,
) -> tuple[Tensor, float]:
    """The estimator's flat gradients [S, P], one per seed, and generator forwards per example.

    A persistent-chain estimator (JSA) first runs `burn_in` steps without any parameter
    update, so the measured step starts from a warmed-up chain rather than a fresh one.
    """
    params = checked_parameters(pipeline)
    gradients, forwards = [], []
    for seed in seeds:
        reseed(estimator, seed)
        if estimator.persistent:
            with torch.no_grad():
                for _ in range(burn_in):
                    estimator.loss(batch, pipeline)
        start = pipeline.generator_forwards
        output = estimator.loss(batch, pipeline)
        forwards.append((pipeline.generator_forwards - start) / len(batch))
        gradients.append(_flat_gradient(output.loss, params))
    return torch.stack(gradients), sum(forwards) / len(forwards)


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0).clamp(-1.0, 1.0))


def compare(
    pipeline: Pipeline, estimators: dict[str, Estimator], batch: Batch, seeds: Sequence[int]
) -> list[GradcheckRow]:
    """One row per estimator; each is compared with the exact gradient at its own
    temperature and loglik reduction."""
    rows = []
    for name, estimator in estimators.items():
        cfg = estimator.config
        exact = exact_gradient(pipeline, batch, cfg.temperature, cfg.loglik).double()
        grads, forwards = estimator_gradients(pipeline, estimator, batch, seeds)
        grads = grads.double()
        mean = grads.mean(0)
        norm2 = float(exact.pow(2).sum())
        spread = grads.var(0, unbiased=True).sum() if len(seeds) > 1 else torch.tensor(0.0)
        rows.append(
            GradcheckRow(
                estimator=name,
                cosine_mean=sum(_cosine(g, exact) for g in grads) / len(grads),
                cosine_of_mean=_cosine(mean, exact),
                relative_bias=math.sqrt(float((mean - exact).pow(2).sum()) / norm2),
                variance=float(spread) / norm2,
                forwards_per_example=forwards,
            )
        )
    return rows


def format_table(rows: Sequence[GradcheckRow]) -> str:
    """A markdown table, columns aligned."""
    cells = [
        {
            "estimator": r.estimator,
            "cos (mean)": f"{r.cosine_mean:.4f}",
            "cos of mean": f"{r.cosine_of_mean:.4f}",
            "rel. bias": f"{r.relative_bias:.4f}",
            "variance": f"{r.variance:.4g}",
            "fwd/example": f"{r.forwards_per_example:.1f}",
        }
        for r in rows
    ]
    return tables.format_table(cells)


def build_estimator(config: ResolvedConfig, name: str) -> Estimator:
    """Estimator `name` from the registry, with the config's [estimator] keys it understands."""
    spec = default_registry().get("estimator", name)
    section = config.pipeline.estimator
    given = dict(section.model_extra or {}) if section is not None else {}
    fields = spec.config_model.model_fields
    shared = {k: v for k, v in given.items() if k in fields and k not in SHARED_SKIP}
    return spec.build(spec.config_model.model_validate(shared))


def run_gradcheck(
    config: ResolvedConfig,
    estimators: Sequence[str],
    seeds: int = 8,
    examples: int | Sequence[Example] = 4,
    corpus: Corpus | None = None,
    dataset: Sequence[Example] | None = None,
) -> list[GradcheckRow]:
    """Build the pipeline once and compare each named estimator with the exact gradient.

    The caller passes the data (the CLI reads the config's data section): `examples` is
    either the batch itself or a count taken from the front of `dataset`. When `corpus` /
    `dataset` are None the packaged toy corpus and questions are used. Seeds 0..seeds-1.
    """
    from latentrag.toy.corpus import toy_corpus, toy_examples

    corpus = corpus if corpus is not None else toy_corpus()
    if isinstance(examples, int):
        examples = list(dataset if dataset is not None else toy_examples())[:examples]
    pipeline = Pipeline.from_config(config, corpus)
    built = {name: build_estimator(config, name) for name in estimators}
    return compare(pipeline, built, Batch(list(examples)), list(range(seeds)))
