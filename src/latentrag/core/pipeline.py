"""Assembles components from a config and serves them to estimators.

`Pipeline` implements the `LatentModel` protocol: candidate sets, prior and posterior
log-probabilities over them, and generator log-likelihoods. Estimators only see this.
For inference it retrieves (`retrieve`), answers batches (`predict`) and answers one
question with the passages it read (`answer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from latentrag.core.errors import LatentragError
from latentrag.core.interfaces import Estimator, Generator, Reduce, Reranker, Retriever
from latentrag.core.types import Batch, Candidates, Corpus, Example, Passage

if TYPE_CHECKING:
    from latentrag.core.config import ResolvedConfig

SOURCES = ("prior", "posterior", "union", "corpus")

#: score(queries, passages [n][1], targets) -> log p(y|x,h) [n]
ScoreFn = Callable[[list[str], list[list[str]], list[str]], Tensor]


class ScoreCache(Protocol):
    """What `Pipeline.rows_loglik` consults for generator log-likelihoods, when the
    pipeline was given one (`training.loglik_cache.LoglikCache` is the shipped one).

    `loglik` returns log p(y|x,h) [n] of the n (query, passage, target) triples, calling
    `score` for the ones it does not hold; a cache remembers only a generator whose scores
    cannot change (a frozen one) and scores every triple of any other.
    """

    def loglik(
        self,
        generator: Generator,
        queries: Sequence[str],
        passages: Sequence[str],
        targets: Sequence[str],
        reduce: str,
        score: ScoreFn,
    ) -> Tensor: ...


def merge_candidates(first: Candidates, second: Candidates) -> Candidates:
    """Per-row union of two candidate sets, first's order then second's new rows; padded."""
    rows: list[list[int]] = []
    for a, b in zip(first.indices.tolist(), second.indices.tolist()):
        seen: dict[int, None] = dict.fromkeys(a)
        seen.update(dict.fromkeys(b))
        rows.append(list(seen))
    return pad_rows(rows)


def pad_rows(rows: Sequence[Sequence[int]]) -> Candidates:
    """Candidates from ragged lists of corpus rows; padding slots repeat row 0, masked out."""
    width = max(len(r) for r in rows)
    indices = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        indices[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = True
    all_valid = bool(mask.all())
    return Candidates(indices, torch.zeros(indices.shape), None if all_valid else mask)


def masked_log_softmax(scores: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    logits = scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


@dataclass(frozen=True)
class RetrievedPassage:
    """A passage an answer was read from: its corpus id, its retrieval (or rerank) score,
    its text and title."""

    id: str
    score: float
    text: str
    title: str = ""


@dataclass(frozen=True)
class Answer:
    """What `Pipeline.answer` returns: the generator's answer (None without a generator)
    and the passages it read, best first."""

    question: str
    text: str | None
    passages: tuple[RetrievedPassage, ...]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: question, answer, passages (id, score, title, text)."""
        passages = [
            {"id": p.id, "score": p.score, "title": p.title, "text": p.text} for p in self.passages
        ]
        return {"question": self.question, "answer": self.text, "passages": passages}


class Pipeline:
    """The assembled components plus the corpus they work over.

    loglik_cache: remembers a frozen generator's log-likelihoods (`ScoreCache`); whoever
    owns the cache (a run, the demo) passes it, and may share it between pipelines.
    `config`: the resolved config it was built from (`from_config`), else None.
    """

    def __init__(
        self,
        corpus: Corpus,
        retriever: Retriever,
        generator: Generator | None = None,
        posterior: Retriever | None = None,
        reranker: Reranker | None = None,
        estimator: Estimator | None = None,
        rerank_pool: int = 20,
        loglik_cache: ScoreCache | None = None,
    ) -> None:
        self.corpus = corpus
        self.rerank_pool = rerank_pool
        self.retriever = retriever
        self.generator = generator
        self.posterior = posterior
        self.reranker = reranker
        self.estimator = estimator
        self.loglik_cache = loglik_cache
        self.config: ResolvedConfig | None = None
        self._texts = corpus.texts()
        self.generator_forwards = 0

    @classmethod
    def from_config(
        cls,
        config: ResolvedConfig,
        corpus: Corpus,
        index: bool = True,
        loglik_cache: ScoreCache | None = None,
    ) -> Pipeline:
        """Build every configured component and (unless `index` is False) index the corpus."""
        context = config.build_context()
        built = {role: spec.build(cfg, context) for role, (spec, cfg) in config.components.items()}
        rerank_pool = config.pipeline.eval.rerank_pool
        pipeline = cls(corpus, **built, rerank_pool=rerank_pool, loglik_cache=loglik_cache)
        pipeline.config = config
        if index:
            pipeline.index()
        return pipeline

    @property
    def prior(self) -> Retriever:
        """Deprecated name of `retriever` (the prior p(h|x))."""
        import warnings

        warnings.warn(
            "Pipeline.prior is deprecated; use Pipeline.retriever", DeprecationWarning, stacklevel=2
        )
        return self.retriever

    # -- components ------------------------------------------------------------------

    def roles(self) -> dict[str, object]:
        roles = {
            "retriever": self.retriever,
            "posterior": self.posterior,
            "reranker": self.reranker,
            "generator": self.generator,
            "estimator": self.estimator,
        }
        return {k: v for k, v in roles.items() if v is not None}

    def index(self) -> None:
        self.retriever.index(self.corpus)
        if self.posterior is not None and self.posterior is not self.retriever:
            self.posterior.index(self.corpus)

    def posterior_queries(self, batch: Batch) -> list[str]:
        """What q(h|x,y) reads: the question and the answer together."""
        return [f"{e.question} {e.target}" for e in batch.examples]

    def passages(self, rows: Tensor) -> list[list[str]]:
        return [[self._texts[i] for i in row] for row in rows.tolist()]

    def _require_posterior(self) -> Retriever:
        if self.posterior is None:
            raise ValueError("this estimator needs a [posterior] retriever in the config")
        return self.posterior

    # -- LatentModel -----------------------------------------------------------------

    def candidate_rows(self, examples: Sequence[Example]) -> list[list[int] | None] | None:
        """Each example's closed candidate list (`Example.candidate_ids`) as corpus rows,
        None for an example without one; None when no example has one."""
        if not any(e.candidate_ids for e in examples):
            return None
        return [self._rows_of(e) if e.candidate_ids else None for e in examples]

    def _rows_of(self, example: Example) -> list[int]:
        try:
            return [self.corpus.index_of(pid) for pid in example.candidate_ids]
        except KeyError as err:
            raise LatentragError(f"example {example.id!r}: candidate {err.args[0]}") from None

    @torch.no_grad()
    def candidates(self, batch: Batch, source: str, k: int) -> Candidates:
        """Candidates for the batch; an example with `candidate_ids` gets its best k of
        them (all of them for source "corpus"), padded and masked when it has fewer."""
        k = min(k, len(self.corpus))  # a pool larger than the corpus is the corpus
        within = self.candidate_rows(batch.examples)
        if within is not None:
            return self._candidates_within(batch, source, k, within)
        if source == "prior":
            return self.retriever.retrieve(batch.questions, k)
        if source == "posterior":
            return self._require_posterior().retrieve(self.posterior_queries(batch), k)
        if source == "union":
            prior = self.retriever.retrieve(batch.questions, k)
            posterior = self._require_posterior().retrieve(self.posterior_queries(batch), k)
            return merge_candidates(prior, posterior)
        if source == "corpus":
            rows = torch.arange(len(self.corpus)).expand(len(batch), -1)
            return Candidates(rows.clone(), torch.zeros(rows.shape))
        raise ValueError(f"unknown candidate source {source!r}; choose from {SOURCES}")

    def _candidates_within(
        self, batch: Batch, source: str, k: int, within: list[list[int] | None]
    ) -> Candidates:
        size = len(self.corpus)
        if source == "prior":
            return retrieve_within(self.retriever, batch.questions, within, k, size)
        if source == "posterior":
            queries = self.posterior_queries(batch)
            return retrieve_within(self._require_posterior(), queries, within, k, size)
        if source == "union":
            prior = retrieve_within(self.retriever, batch.questions, within, k, size)
            queries = self.posterior_queries(batch)
            posterior = retrieve_within(self._require_posterior(), queries, within, k, size)
            return merge_ranked(prior, posterior)
        if source == "corpus":
            return pad_rows([rows if rows is not None else range(size) for rows in within])
        raise ValueError(f"unknown candidate source {source!r}; choose from {SOURCES}")

    def prior_logprobs(
        self, batch: Batch, candidates: Candidates, temperature: float = 1.0
    ) -> Tensor:
        scores = self.retriever.score(batch.questions, candidates.indices)
        return masked_log_softmax(scores, candidates.mask, temperature)

    def posterior_logprobs(
        self, batch: Batch, candidates: Candidates, temperature: float = 1.0
    ) -> Tensor:
        queries = self.posterior_queries(batch)
        scores = self._require_posterior().score(queries, candidates.indices)
        return masked_log_softmax(scores, candidates.mask, temperature)

    def loglik(
        self, batch: Batch, candidates: Candidates, reduce: Reduce = "sum", grad: bool = True
    ) -> Tensor:
        return self.rows_loglik(batch, candidates.indices, reduce, grad, candidates.mask)

    def rows_loglik(
        self,
        batch: Batch,
        rows: Tensor,
        reduce: Reduce = "sum",
        grad: bool = True,
        mask: Tensor | None = None,
    ) -> Tensor:
        """log p(y|x,h) [B,N] for corpus rows [B,N]; each distinct (example, row) pair is
        scored once; masked slots get 0."""
        assert self.generator is not None, "no [generator] configured"
        valid = mask if mask is not None else torch.ones_like(rows, dtype=torch.bool)
        pairs = sorted({(b, r) for (b, r), ok in _cells(rows, valid) if ok})
        slot = {pair: i for i, pair in enumerate(pairs)}
        queries = [batch.examples[b].question for b, _ in pairs]
        targets = [batch.examples[b].target for b, _ in pairs]
        passages = [[self._texts[r]] for _, r in pairs]

        def score(queries: list[str], passages: list[list[str]], targets: list[str]) -> Tensor:
            self.generator_forwards += len(queries)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                return self.generator.loglik(queries, passages, targets, reduce=reduce)[:, 0]

        if self.loglik_cache is None:
            flat = score(queries, passages, targets)
        else:  # it remembers a frozen generator's scores, which never change
            texts = [p for (p,) in passages]
            flat = self.loglik_cache.loglik(self.generator, queries, texts, targets, reduce, score)
        gather = torch.tensor(
            [slot.get((b, r), 0) for (b, r), _ in _cells(rows, valid)],
            dtype=torch.long,
            device=flat.device,  # the generator's device
        ).view(rows.shape)
        out = flat[gather]
        return out.masked_fill(~valid.to(flat.device), 0.0)

    def token_logprobs(self, batch: Batch, candidates: Candidates) -> tuple[Tensor, Tensor]:
        assert self.generator is not None, "no [generator] configured"
        passages = self.passages(candidates.indices)
        self.generator_forwards += candidates.indices.numel()
        return self.generator.token_logprobs(batch.questions, passages, batch.targets)

    def rerank_scores(self, batch: Batch, candidates: Candidates) -> Tensor:
        if self.reranker is None:
            raise ValueError("this estimator needs a [reranker] in the config")
        return self.reranker.score(batch.questions, self.passages(candidates.indices))

    def joint_loglik(self, batch: Batch, candidates: Candidates, doc_log_mask: Tensor) -> Tensor:
        assert self.generator is not None, "no [generator] configured"
        passages = self.passages(candidates.indices)
        self.generator_forwards += len(batch)
        return self.generator.loglik_joint(
            batch.questions, passages, batch.targets, doc_log_mask
        )

    # -- inference -------------------------------------------------------------------

    @torch.no_grad()
    def retrieve(
        self, questions: Sequence[str], k: int, within: Sequence[Sequence[int] | None] | None = None
    ) -> Candidates:
        """The k best passages: the prior's, or, with a reranker, the reranker's best k of
        the prior's top `rerank_pool`. `within`: per question, the corpus rows it may get
        (a closed candidate list, see `candidate_rows`) or None for the whole corpus; a
        question with fewer than k candidates gets them all, padded and masked."""
        questions = list(questions)
        if within is not None and any(rows is not None for rows in within):
            return self._retrieve_within(questions, k, within)
        if self.reranker is None:
            return self.retriever.retrieve(questions, k)
        pool = self.retriever.retrieve(questions, min(max(k, self.rerank_pool), len(self.corpus)))
        scores = self.reranker.score(questions, self.passages(pool.indices)).float()
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        return Candidates(pool.indices.gather(1, order), scores.gather(1, order))

    def _retrieve_within(
        self, questions: list[str], k: int, within: Sequence[Sequence[int] | None]
    ) -> Candidates:
        size = len(self.corpus)
        if self.reranker is None:
            return retrieve_within(self.retriever, questions, within, k, size)
        pool = retrieve_within(
            self.retriever, questions, within, min(max(k, self.rerank_pool), size), size
        )
        valid = pool.valid()
        scores = self.reranker.score(questions, self.passages(pool.indices)).float()
        scores = scores.masked_fill(~valid, float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
        mask = valid.gather(1, order)
        top = scores.gather(1, order).masked_fill(~mask, 0.0)
        return Candidates(pool.indices.gather(1, order), top, None if bool(mask.all()) else mask)

    @torch.no_grad()
    def predict(self, batch: Batch, passages: int = 1, max_new_tokens: int = 16) -> list[str]:
        """Answer each question from its top passages (see `retrieve`); with a masking
        reranker (G-Rerank) and a generator that reads jointly, the way training reads
        instead (`predict_joint`)."""
        assert self.generator is not None, "no [generator] configured"
        if self.reads_jointly:
            return self.predict_joint(batch, max_new_tokens)
        top = self.retrieve(batch.questions, passages, self.candidate_rows(batch.examples))
        return self.generator.generate(batch.questions, _valid_texts(self, top), max_new_tokens)

    @property
    def reads_jointly(self) -> bool:
        """A reranker that masks (`log_mask`) and a generator that generates from a joint
        reading (`generate_joint`): G-Rerank's inference."""
        return hasattr(self.reranker, "log_mask") and hasattr(self.generator, "generate_joint")

    @torch.no_grad()
    def predict_joint(self, batch: Batch, max_new_tokens: int = 16) -> list[str]:
        """G-Rerank inference: the prior's top K candidates (K: the estimator's `k` when it
        has one, as in training, else `rerank_pool`) read at once under the reranker's hard
        top-k mask (`log_mask(scores, training=False)`)."""
        pool, _, log_mask = self._joint_reading(batch)
        return self.generator.generate_joint(  # type: ignore[union-attr]
            batch.questions, self.passages(pool.indices), log_mask, max_new_tokens
        )

    def _joint_reading(self, batch: Batch) -> tuple[Candidates, Tensor, Tensor]:
        """The pool a joint reader reads, the reranker's scores of it (-inf on padding) and
        the hard log mask over it, each [B,K]."""
        k = getattr(getattr(self.estimator, "config", None), "k", None)
        k = k if isinstance(k, int) else self.rerank_pool
        pool = self.candidates(batch, "prior", k)
        scores = self.rerank_scores(batch, pool).float()
        valid = pool.valid().to(scores.device)
        scores = scores.masked_fill(~valid, float("-inf"))
        log_mask = self.reranker.log_mask(scores, training=False, valid=valid)  # type: ignore[union-attr]
        return pool, scores, log_mask

    @torch.no_grad()
    def answer(
        self, question: str, k: int | None = None, max_new_tokens: int | None = None
    ) -> Answer:
        """Answer one question from its k best passages (`retrieve`), returning both.

        k and max_new_tokens default to the config's [eval] `passages` and `max_new_tokens`
        (1 and 16 without a config), so the answer is the one an evaluation gives; the
        answer text is None when the pipeline has no generator. A pipeline that reads
        jointly (G-Rerank, see `predict`) answers as it predicts, and returns the passages
        the hard mask kept, best first (k does not apply)."""
        settings = self.config.pipeline.eval if self.config is not None else None
        max_new_tokens = max_new_tokens or (settings.max_new_tokens if settings else 16)
        if self.generator is not None and self.reads_jointly:
            return self._answer_jointly(question, max_new_tokens)
        k = min(k or (settings.passages if settings else 1), len(self.corpus))
        top = self.retrieve([question], k)
        found = zip(top.indices[0].tolist(), top.scores[0].tolist(), top.valid()[0].tolist())
        passages = tuple(_retrieved(self.corpus[row], score) for row, score, ok in found if ok)
        text = None
        if self.generator is not None:
            read = [[p.text for p in passages]]
            text = self.generator.generate([question], read, max_new_tokens)[0]
        return Answer(question, text, passages)

    def _answer_jointly(self, question: str, max_new_tokens: int) -> Answer:
        batch = Batch([Example(id="question", question=question)])
        pool, scores, log_mask = self._joint_reading(batch)
        text = self.generator.generate_joint(  # type: ignore[union-attr]
            [question], self.passages(pool.indices), log_mask, max_new_tokens
        )[0]
        kept = (log_mask[0] > -1.0).tolist()  # a hard mask's log: 0 where kept, LOG_ZERO not
        rows = zip(pool.indices[0].tolist(), scores[0].tolist(), kept)
        passages = sorted(
            (_retrieved(self.corpus[row], score) for row, score, keep in rows if keep),
            key=lambda passage: -passage.score,
        )
        return Answer(question, text, tuple(passages))


def _retrieved(passage: Passage, score: float) -> RetrievedPassage:
    return RetrievedPassage(passage.id, float(score), passage.text, passage.title)


def _cells(rows: Tensor, valid: Tensor):
    for b, (row, ok) in enumerate(zip(rows.tolist(), valid.tolist())):
        for r, v in zip(row, ok):
            yield (b, r), v


# -- closed candidate lists ------------------------------------------------------------------


def _valid_texts(pipeline: Pipeline, found: Candidates) -> list[list[str]]:
    rows, valid = found.indices.tolist(), found.valid().tolist()
    return [[pipeline._texts[r] for r, ok in zip(row, oks) if ok] for row, oks in zip(rows, valid)]


def pad_ranked(rows: Sequence[Sequence[int]], scores: Sequence[Sequence[float]]) -> Candidates:
    """Candidates from ragged ranked lists of corpus rows and their scores; padding slots
    repeat row 0 with score 0, masked out."""
    candidates = pad_rows([list(r) if len(r) else [0] for r in rows])
    valid = candidates.valid().clone()
    for b, (row, row_scores) in enumerate(zip(rows, scores)):
        candidates.scores[b, : len(row)] = torch.tensor(list(row_scores), dtype=torch.float)
        valid[b, len(row) :] = False
    candidates.mask = None if bool(valid.all()) else valid
    return candidates


def _ranked_lists(found: Candidates) -> tuple[list[list[int]], list[list[float]]]:
    rows, scores, valid = found.indices.tolist(), found.scores.tolist(), found.valid().tolist()
    keep = [[i for i, ok in enumerate(oks) if ok] for oks in valid]
    return (
        [[row[i] for i in idx] for row, idx in zip(rows, keep)],
        [[score[i] for i in idx] for score, idx in zip(scores, keep)],
    )


def merge_ranked(first: Candidates, second: Candidates) -> Candidates:
    """Per-row union of two padded candidate sets (first's order, then second's new rows)."""
    rows_a, _ = _ranked_lists(first)
    rows_b, _ = _ranked_lists(second)
    union = [list(dict.fromkeys([*a, *b])) for a, b in zip(rows_a, rows_b)]
    return pad_ranked(union, [[0.0] * len(rows) for rows in union])


def retrieve_within(
    retriever: Retriever,
    queries: Sequence[str],
    within: Sequence[Sequence[int] | None],
    k: int,
    corpus_size: int,
) -> Candidates:
    """Each query's k best corpus rows among its own candidate rows (`within[b]`; None: the
    whole corpus), best first; padded and masked where a query has fewer than k.

    A retriever that defines ``retrieve_within(queries, rows, k)`` (rows: one list per
    query) ranks the lists itself (a fusion retriever ranks within them); else its
    `score()` scores each list (-inf at padding) and the best k are kept; a retriever
    without `score()` retrieves deeper and deeper until each list's best k are found."""
    queries = list(queries)
    free = [b for b, rows in enumerate(within) if rows is None]
    closed = [b for b, rows in enumerate(within) if rows is not None]
    rows_out: list[list[int]] = [[] for _ in queries]
    scores_out: list[list[float]] = [[] for _ in queries]
    if free:
        found = retriever.retrieve([queries[b] for b in free], min(k, corpus_size))
        for b, rows, scores in zip(free, *_ranked_lists(found)):
            rows_out[b], scores_out[b] = rows, scores
    if closed:
        lists = [list(within[b]) for b in closed]
        found = _rank_lists(retriever, [queries[b] for b in closed], lists, k, corpus_size)
        for b, rows, scores in zip(closed, *_ranked_lists(found)):
            rows_out[b], scores_out[b] = rows, scores
    return pad_ranked(rows_out, scores_out)


def _rank_lists(
    retriever: Retriever, queries: list[str], lists: list[list[int]], k: int, corpus_size: int
) -> Candidates:
    own = getattr(retriever, "retrieve_within", None)
    if callable(own):
        return own(queries, lists, k)
    padded = pad_rows(lists)
    try:
        scores = retriever.score(queries, padded.indices)
    except NotImplementedError:
        return _filter_deep(retriever, queries, lists, k, corpus_size)
    valid = padded.valid()
    scores = scores.detach().float().masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
    mask = valid.gather(1, order)
    top = scores.gather(1, order).masked_fill(~mask, 0.0)
    return Candidates(padded.indices.gather(1, order), top, None if bool(mask.all()) else mask)


def _filter_deep(
    retriever: Retriever, queries: list[str], lists: list[list[int]], k: int, corpus_size: int
) -> Candidates:
    """The best k of each list from ever deeper retrievals over the whole corpus; rows a
    retrieval never returns (an approximate index) follow, in list order, at the lowest
    score found."""
    allowed = [set(rows) for rows in lists]
    wanted = [min(k, len(rows)) for rows in allowed]
    depth = min(corpus_size, max(4 * k, 64))
    while True:
        rows, scores = _ranked_lists(retriever.retrieve(queries, depth))
        picked = [
            [(r, s) for r, s in zip(row, score) if r in ok][:n]
            for row, score, ok, n in zip(rows, scores, allowed, wanted)
        ]
        if depth >= corpus_size or all(len(p) == n for p, n in zip(picked, wanted)):
            break
        depth = min(corpus_size, depth * 4)
    for found, rows, n in zip(picked, lists, wanted):
        floor = min((s for _, s in found), default=0.0)
        seen = {r for r, _ in found}
        found += [(r, floor) for r in dict.fromkeys(rows) if r not in seen][: n - len(found)]
    return pad_ranked([[r for r, _ in p] for p in picked], [[s for _, s in p] for p in picked])
