"""Conformance checks for components, one per kind, for plugin authors' own tests.

Each check builds fresh components with the factory you pass (a zero-argument callable, so
that determinism can be checked across instances) and raises `ConformanceError` saying what
is wrong. The builtin plugins pass the same checks (tests/test_conformance.py).

    from latentrag.testing.checks import check_retriever
    def test_my_retriever():
        check_retriever(lambda: MyRetriever(MyConfig()))
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel

from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Estimator, Generator, Reranker, Retriever
from latentrag.core.types import Batch, Corpus
from latentrag.toy.corpus import toy_corpus, toy_examples


class ConformanceError(AssertionError):
    """A component breaks the contract of its kind."""


def _fail(component: object, message: str) -> None:
    raise ConformanceError(f"{type(component).__name__}: {message}")


def _require(condition: bool, component: object, message: str) -> None:
    if not condition:
        _fail(component, message)


def _seeded(factory: Callable[[], object]) -> object:
    torch.manual_seed(0)
    return factory()


def _trainable_parameters(component) -> list[torch.nn.Parameter]:
    return [
        p
        for module in component.trainable_modules().values()
        for p in module.parameters()
        if p.requires_grad
    ]


def _check_gradient(component, output: torch.Tensor, what: str) -> None:
    params = _trainable_parameters(component)
    if not params:
        return
    _require(output.requires_grad, component, f"{what} is not differentiable (no grad_fn)")
    grads = torch.autograd.grad(output.sum(), params, allow_unused=True)
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    _require(reached, component, f"no gradient reaches the trainable parameters from {what}")


def _check_shape(component, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    _require(
        tuple(tensor.shape) == shape,
        component,
        f"{what} has shape {tuple(tensor.shape)}, expected {shape}",
    )


def check_config_round_trip(config: BaseModel) -> None:
    """The config survives a dump and re-validation unchanged, and rejects unknown keys."""
    model = type(config)
    again = model.model_validate(config.model_dump())
    if again != config:
        raise ConformanceError(f"{model.__name__}: config changes in a dump/validate round trip")
    try:
        model.model_validate({**config.model_dump(), "no_such_key_xyz": 1})
    except Exception:
        return
    raise ConformanceError(f"{model.__name__}: unknown keys are accepted (use extra='forbid')")


# -- retrievers ---------------------------------------------------------------------------


def check_retriever(
    factory: Callable[[], Retriever],
    corpus: Corpus | None = None,
    queries: Sequence[str] | None = None,
    k: int = 3,
) -> None:
    """Shapes, ordering, determinism, the k > corpus error, gradients, save/load."""
    corpus = corpus or toy_corpus()
    queries = list(queries or [e.question for e in toy_examples()[:4]])
    retriever = _seeded(factory)
    retriever.index(corpus)
    found = retriever.retrieve(queries, k)
    _check_shape(retriever, found.indices, (len(queries), k), "retrieve().indices")
    _check_shape(retriever, found.scores, (len(queries), k), "retrieve().scores")
    _require(found.indices.dtype == torch.long, retriever, "indices must be int64 corpus rows")
    _require(found.scores.is_floating_point(), retriever, "scores must be floating point")
    in_range = bool(((found.indices >= 0) & (found.indices < len(corpus))).all())
    _require(in_range, retriever, "indices outside the corpus")
    ordered = bool((found.scores[:, :-1] >= found.scores[:, 1:] - 1e-6).all())
    _require(ordered, retriever, "retrieve() must return the best passages first")
    distinct = all(len(set(row)) == len(row) for row in found.indices.tolist())
    _require(distinct, retriever, "retrieve() returned the same passage twice for one query")

    again = _seeded(factory)
    again.index(corpus)
    same = again.retrieve(queries, k)
    _require(
        torch.equal(same.indices, found.indices) and torch.allclose(same.scores, found.scores),
        retriever,
        "not deterministic: two instances built the same way retrieve differently",
    )
    try:
        retriever.retrieve(queries, len(corpus) + 1)
    except LatentragError:
        pass
    except Exception as exc:
        _fail(retriever, f"k larger than the corpus must raise a LatentragError, not {exc!r}")
    else:
        _fail(retriever, "k larger than the corpus must raise a LatentragError")

    _check_retriever_score(retriever, queries, found)
    _check_retriever_save_load(factory, retriever, corpus, queries, found)


def _check_retriever_score(retriever, queries, found) -> None:
    try:
        scores = retriever.score(queries, found.indices)
    except NotImplementedError:
        _require(not retriever.trainable_modules(), retriever, "trainable but cannot score()")
        return
    _check_shape(retriever, scores, tuple(found.indices.shape), "score()")
    agree = torch.allclose(scores.detach().float(), found.scores.float(), atol=1e-4, rtol=1e-4)
    _require(agree, retriever, "score() disagrees with the scores retrieve() returned")
    _check_gradient(retriever, scores, "score()")


def _check_retriever_save_load(factory, retriever, corpus, queries, found) -> None:
    with tempfile.TemporaryDirectory() as folder:
        retriever.save(Path(folder))
        if not any(Path(folder).iterdir()):
            return  # nothing persisted: the retriever keeps no index on disk
        loaded = _seeded(factory)
        loaded.load(Path(folder), corpus)
        same = loaded.retrieve(queries, found.indices.shape[1])
        _require(
            torch.equal(same.indices, found.indices),
            retriever,
            "an index saved and loaded again retrieves differently",
        )


# -- rerankers ----------------------------------------------------------------------------


def check_reranker(factory: Callable[[], Reranker], k: int = 3) -> None:
    """Shape [B,K], determinism, gradients to the trainable parameters."""
    corpus, examples = toy_corpus(), toy_examples()[:3]
    queries = [e.question for e in examples]
    passages = [[corpus[(i + j) % len(corpus)].text for j in range(k)] for i in range(3)]
    reranker = _seeded(factory)
    scores = reranker.score(queries, passages)
    _check_shape(reranker, scores, (3, k), "score()")
    _require(bool(torch.isfinite(scores).all()), reranker, "score() returned non-finite values")
    again = _seeded(factory).score(queries, passages)
    _require(
        torch.allclose(again.detach(), scores.detach(), atol=1e-5),
        reranker,
        "not deterministic: two instances built the same way score differently",
    )
    _check_gradient(reranker, scores, "score()")


# -- generators ---------------------------------------------------------------------------


def check_generator(factory: Callable[[], Generator]) -> None:
    """log-likelihood shapes and signs, batching invariance, token sums, gradients, generate."""
    corpus, examples = toy_corpus(), toy_examples()[:3]
    queries = [e.question for e in examples]
    targets = [e.target for e in examples]
    passages = [[corpus[i].text, corpus[(i + 5) % len(corpus)].text] for i in range(3)]
    generator = _seeded(factory)
    loglik = generator.loglik(queries, passages, targets)
    _check_shape(generator, loglik, (3, 2), "loglik()")
    finite = bool(torch.isfinite(loglik).all())
    _require(finite and bool((loglik <= 1e-5).all()), generator, "loglik() must be finite and <= 0")
    one = generator.loglik(queries[1:2], passages[1:2], targets[1:2])
    _require(
        torch.allclose(one.detach(), loglik[1:2].detach(), atol=1e-4),
        generator,
        "loglik() of an example depends on the other examples in the batch (padding?)",
    )
    tokens, mask = generator.token_logprobs(queries, passages, targets)
    summed = (tokens * mask.unsqueeze(1)).sum(-1)
    _require(
        torch.allclose(summed.detach(), loglik.detach(), atol=1e-4),
        generator,
        "token_logprobs() summed over tokens differs from loglik(reduce='sum')",
    )
    mean = generator.loglik(queries, passages, targets, reduce="mean")
    lengths = mask.sum(-1, keepdim=True).to(loglik.dtype)
    _require(
        torch.allclose(mean.detach(), loglik.detach() / lengths, atol=1e-4),
        generator,
        "loglik(reduce='mean') is not the sum divided by the number of target tokens",
    )
    _check_gradient(generator, loglik, "loglik()")
    answers = generator.generate(queries, [ps[:1] for ps in passages], max_new_tokens=4)
    one_string_each = isinstance(answers, list) and len(answers) == 3
    one_string_each = one_string_each and all(isinstance(a, str) for a in answers)
    _require(one_string_each, generator, "generate() must return one string per query")
    again = _seeded(factory)
    _require(
        again.generate(queries, [ps[:1] for ps in passages], max_new_tokens=4) == answers,
        generator,
        "generate() is not deterministic",
    )


# -- estimators ---------------------------------------------------------------------------


def toy_pipeline(seed: int = 0):
    """Tabular prior, posterior and generator over the toy corpus: exact checks are cheap."""
    from latentrag.core.pipeline import Pipeline
    from latentrag.toy.components import TableGenerator, TableRetriever

    corpus, examples = toy_corpus(), toy_examples()
    pipeline = Pipeline(
        corpus,
        TableRetriever.from_examples(examples, corpus, seed=seed),
        TableGenerator.from_examples(examples, corpus, seed=seed + 1),
        posterior=TableRetriever.from_examples(examples, corpus, posterior=True, seed=seed + 2),
    )
    pipeline.index()
    return pipeline, examples


def _estimator_gradients(estimator: Estimator, pipeline, batch: Batch):
    out = estimator.loss(batch, pipeline)
    params = {
        role: _trainable_parameters(pipeline.roles()[role])
        for role in estimator.trains
        if role in pipeline.roles()
    }
    flat = [p for ps in params.values() for p in ps]
    grads = torch.autograd.grad(out.loss, flat, allow_unused=True)
    return out, params, grads


def check_estimator(
    factory: Callable[[], Estimator],
    exact_cosine: float | None = None,
    seeds: int = 32,
) -> None:
    """A finite scalar loss, gradients to every trained role, determinism under a seed, and,
    with `exact_cosine`, the mean gradient over `seeds` runs against the exact gradient."""
    pipeline, examples = toy_pipeline()
    batch = Batch(list(examples[:4]))
    estimator = _seeded(factory)
    out, params, grads = _estimator_gradients(estimator, pipeline, batch)
    _require(out.loss.dim() == 0, estimator, f"loss must be a scalar, got {tuple(out.loss.shape)}")
    _require(bool(torch.isfinite(out.loss)), estimator, "loss is not finite")
    for key, value in out.diagnostics.items():
        _require(isinstance(value, float), estimator, f"diagnostic {key!r} must be a float")
    offset = 0
    for role, ps in params.items():
        chunk = grads[offset : offset + len(ps)]
        offset += len(ps)
        reached = any(g is not None and bool(g.abs().sum() > 0) for g in chunk)
        _require(reached, estimator, f"trains {role!r} but no gradient reaches it")
    again = _seeded(factory)
    out_again = again.loss(batch, toy_pipeline()[0])
    _require(
        torch.allclose(out_again.loss.detach(), out.loss.detach(), atol=1e-6),
        estimator,
        "not deterministic: two instances built the same way give different losses",
    )
    if exact_cosine is not None:
        _check_against_exact(factory, batch, exact_cosine, seeds)


def _check_against_exact(factory, batch: Batch, min_cosine: float, seeds: int) -> None:
    from latentrag.experiments.gradcheck import compare

    pipeline, _ = toy_pipeline()
    estimator = _seeded(factory)
    [row] = compare(pipeline, {"estimator": estimator}, batch, seeds=list(range(seeds)))
    cosine = row.cosine_of_mean
    _require(
        cosine >= min_cosine,
        estimator,
        f"mean gradient over {seeds} seeds has cosine {cosine:.4f} to the exact gradient "
        f"(required >= {min_cosine})",
    )


__all__ = [
    "ConformanceError",
    "check_config_round_trip",
    "check_estimator",
    "check_generator",
    "check_reranker",
    "check_retriever",
    "toy_pipeline",
]
