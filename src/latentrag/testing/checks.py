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
from latentrag.core.types import Batch, Candidates, Corpus
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
    """The config survives a dump and re-validation unchanged, and rejects unknown keys.

    Compared as dumps: a nested component (`ComponentRef`) validated again is unresolved
    until a registry resolves it, but dumps the same options."""
    model = type(config)
    again = model.model_validate(config.model_dump())
    if again.model_dump() != config.model_dump():
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

#: padded slots appended to every candidate set by `PaddedModel`
PADDING = 2


class TableReranker(torch.nn.Module, Reranker):
    """score(question, passage) = a learnable table entry: a trainable reranker for the
    toy pipeline, so that the kit can see whether gradient reaches the reranker role."""

    def __init__(self, questions: Sequence[str], corpus: Corpus, seed: int = 0) -> None:
        super().__init__()
        self.rows = {q: i for i, q in enumerate(questions)}
        self.columns = {text: i for i, text in enumerate(corpus.texts())}
        seeded = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(len(questions), len(corpus), generator=seeded))

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"table": self}

    def score(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> torch.Tensor:
        rows = torch.tensor([self.rows[q] for q in queries])
        columns = torch.tensor([[self.columns[p] for p in ps] for ps in passages])
        return self.table[rows.unsqueeze(1), columns]


def toy_pipeline(seed: int = 0, reranker: bool = False):
    """Tabular prior, posterior and generator (and, with `reranker`, a tabular reranker) over
    the toy corpus, every one trainable: exact checks are cheap."""
    from latentrag.core.pipeline import Pipeline
    from latentrag.toy.components import TableGenerator, TableRetriever

    corpus, examples = toy_corpus(), toy_examples()
    questions = list(dict.fromkeys(e.question for e in examples))
    pipeline = Pipeline(
        corpus,
        TableRetriever.from_examples(examples, corpus, seed=seed),
        TableGenerator.from_examples(examples, corpus, seed=seed + 1),
        posterior=TableRetriever.from_examples(examples, corpus, posterior=True, seed=seed + 2),
        reranker=TableReranker(questions, corpus, seed=seed + 3) if reranker else None,
    )
    pipeline.index()
    return pipeline, examples


class PaddedModel:
    """A `LatentModel` whose candidate sets are padded, as a union of two retrievers' sets is.

    Every set gets `PADDING` masked slots at its end, and every second example one valid
    candidate fewer, so rows differ in length. The padded slots hold corpus row `filler` and
    score `filler_score`: an estimator that honours the mask gives the same loss whatever
    they hold. Everything else is the wrapped pipeline's.
    """

    def __init__(self, model, filler: int = 0, filler_score: float = 0.0) -> None:
        self.model = model
        self.filler = filler
        self.filler_score = filler_score

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def candidates(self, batch: Batch, source: str, k: int) -> Candidates:
        found = self.model.candidates(batch, source, k)
        valid = found.valid().clone()
        for b in range(1, valid.shape[0], 2):
            slots = valid[b].nonzero().flatten()
            if len(slots) > 1:
                valid[b, slots[-1]] = False
        width = (valid.shape[0], PADDING)
        valid = torch.cat([valid, torch.zeros(width, dtype=torch.bool)], dim=1)
        indices = torch.cat([found.indices, torch.zeros(width, dtype=torch.long)], dim=1)
        scores = torch.cat([found.scores.float(), torch.zeros(width)], dim=1)
        indices = torch.where(valid, indices, torch.full_like(indices, self.filler))
        scores = torch.where(valid, scores, torch.full_like(scores, self.filler_score))
        return Candidates(indices, scores, valid)


def _role_gradients(estimator: Estimator, model, pipeline, batch: Batch):
    """The estimator's output on `model` and, per trainable role of `pipeline`, the
    gradients of its loss (None where a parameter is not reached)."""
    out = estimator.loss(batch, model)
    params = {
        role: _trainable_parameters(component)
        for role, component in pipeline.roles().items()
        if role != "estimator"
    }
    flat = [p for ps in params.values() for p in ps]
    grads = iter(torch.autograd.grad(out.loss, flat, allow_unused=True))
    return out, {role: [next(grads) for _ in ps] for role, ps in params.items()}


def _touched(grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether any gradient is non-zero (NaN counts as non-zero)."""
    return any(g is not None and bool((g != 0).any()) for g in grads)


def check_estimator(
    factory: Callable[[], Estimator],
    exact_cosine: float | None = None,
    seeds: int = 32,
) -> None:
    """A finite scalar loss; gradients to every role it trains and to no other (on a toy
    pipeline whose retriever, posterior, reranker and generator are all trainable); padded
    candidate sets masked (finite loss and gradients, the padded slots' content ignored);
    determinism under a seed; and, with `exact_cosine`, the mean gradient over `seeds` runs
    against the exact gradient."""
    pipeline, examples = toy_pipeline(reranker=True)
    batch = Batch(list(examples[:4]))
    estimator = _seeded(factory)
    out, grads = _role_gradients(estimator, pipeline, pipeline, batch)
    _require(out.loss.dim() == 0, estimator, f"loss must be a scalar, got {tuple(out.loss.shape)}")
    _require(bool(torch.isfinite(out.loss)), estimator, "loss is not finite")
    for key, value in out.diagnostics.items():
        _require(isinstance(value, float), estimator, f"diagnostic {key!r} must be a float")
    _check_trained_roles(estimator, grads)
    again = _seeded(factory)
    out_again = again.loss(batch, toy_pipeline(reranker=True)[0])
    _require(
        torch.allclose(out_again.loss.detach(), out.loss.detach(), atol=1e-6),
        estimator,
        "not deterministic: two instances built the same way give different losses",
    )
    _check_padding(factory, batch)
    if exact_cosine is not None:
        _check_against_exact(factory, batch, exact_cosine, seeds)


def _check_trained_roles(estimator: Estimator, grads: dict[str, list]) -> None:
    """Gradient reaches every role in `trains` and no other."""
    trained = estimator.trained_roles()
    for role, role_grads in grads.items():
        if role in trained:
            _require(_touched(role_grads), estimator, f"trains {role!r} but no gradient reaches it")
        else:
            _require(
                not _touched(role_grads),
                estimator,
                f"gradient reaches {role!r}, which it does not train (trains = {trained}): "
                "detach what flows into it, or declare it in `trains`",
            )


def _check_padding(factory: Callable[[], Estimator], batch: Batch) -> None:
    """On padded candidate sets the loss and every gradient are finite, and the same
    whatever the padded slots hold."""
    results = []
    for filler, filler_score in ((0, 0.0), (-1, 50.0)):
        pipeline, _ = toy_pipeline(reranker=True)
        padded = PaddedModel(pipeline, filler % len(pipeline.corpus), filler_score)
        estimator = _seeded(factory)
        out, grads = _role_gradients(estimator, padded, pipeline, batch)
        _require(
            bool(torch.isfinite(out.loss)),
            estimator,
            "loss is not finite on padded candidate sets (slots with mask False: "
            "log-probability -inf, log-likelihood 0); keep them out of the arithmetic",
        )
        for role, role_grads in grads.items():
            finite = all(g is None or bool(torch.isfinite(g).all()) for g in role_grads)
            _require(
                finite,
                estimator,
                f"gradient to {role!r} is not finite on padded candidate sets (0 * -inf at "
                "a padded slot?); keep masked slots out of the arithmetic",
            )
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    same = torch.allclose(loss_a, loss_b, atol=1e-6) and all(
        (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
        for role in grads_a
        for a, b in zip(grads_a[role], grads_b[role])
    )
    _require(
        same,
        estimator,
        "the loss or its gradient depends on what padded candidate slots hold (their "
        "indices/scores where the mask is False); ignore the masked slots",
    )


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
    "PaddedModel",
    "TableReranker",
    "check_config_round_trip",
    "check_estimator",
    "check_generator",
    "check_reranker",
    "check_retriever",
    "toy_pipeline",
]
