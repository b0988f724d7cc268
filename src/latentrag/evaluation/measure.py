"""Measure a pipeline: its retrieval against gold passages (hit@k, recall@k, all@k,
nDCG@k, MRR@k: see `latentrag.evaluation.metrics`) and the EM/F1/sub-EM of its greedy
answers.

`measure` is the one measurement of a run: the trainer's periodic and final evaluations,
a run's before/after numbers and `latentrag evaluate` all call it. It retrieves each
question once, deep enough for every metric and for the passages the generator reads, and
answers each question at most once. A question with `candidate_ids` is ranked among its
candidates only (`Pipeline.retrieve(..., within=...)`). `evaluate_retrieval` (a bare
retriever) and `evaluate_qa` (answers from `pipeline.predict`) measure one side alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from latentrag.core.config import EvalConfig
from latentrag.core.errors import LatentragError
from latentrag.core.pipeline import retrieve_within
from latentrag.core.types import Batch, Candidates, Corpus, Example
from latentrag.evaluation.metrics import (
    all_at_k,
    exact_match,
    f1,
    hit_at_k,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    sub_exact_match,
)

__all__ = ["Measure", "Ranking", "evaluate_qa", "evaluate_retrieval", "measure", "measure_with"]

#: answer(generator, questions, passages per question, max_new_tokens) -> one answer each
Answer = Callable[[Any, list[str], list[list[str]], int], list[str]]
#: called with each measured question, its ranked passage ids and their scores (TREC runs)
Ranking = Callable[[Example, list[str], list[float]], None]

MRR_AT = 10
ANSWER_BATCH = 8
#: metric name -> (per-question function of (ranked ids, example, k), the k it is taken at)
_AT_K = {
    "hit": lambda ranked, e, k: hit_at_k(ranked, e.gold_ids, k),
    "recall": lambda ranked, e, k: recall_at_k(ranked, e.gold_ids, k),
    "all": lambda ranked, e, k: all_at_k(ranked, e.gold_ids, k),
    "ndcg": lambda ranked, e, k: ndcg_at_k(ranked, e.relevance(), k),
    "mrr": lambda ranked, e, k: mrr_at_k(ranked, e.gold_ids, k),
}


class Measure(Protocol):
    """How a run measures its pipeline: metrics on `examples`; qa: answer them too."""

    def __call__(
        self, pipeline: Any, examples: Sequence[Example], *, qa: bool
    ) -> dict[str, float]: ...


class Searchable(Protocol):
    """A retriever, or a pipeline (which searches with its retriever and reranker)."""

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates: ...


def _hidden(progress: bool) -> bool | None:
    """tqdm's `disable`: no bar when not asked for, nor when stderr is not a terminal."""
    return None if progress else True


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _search(
    searchable: Searchable, corpus: Corpus, examples: list[Example], depth: int
) -> Candidates:
    """One retrieve call for these examples, each with a closed candidate list kept to it."""
    questions = [e.question for e in examples]
    if not any(e.candidate_ids for e in examples):
        return searchable.retrieve(questions, depth)
    within = [[corpus.index_of(p) for p in e.candidate_ids] or None for e in examples]
    if hasattr(searchable, "candidate_rows"):  # a Pipeline: its reranker sees them too
        return searchable.retrieve(questions, depth, within)
    return retrieve_within(searchable, questions, within, depth, len(corpus))


def _ranked_rows(
    searchable: Searchable,
    corpus: Corpus,
    examples: Sequence[Example],
    depth: int,
    batch_size: int,
    progress: bool,
) -> list[tuple[list[int], list[float]]]:
    """Each example's valid corpus rows and scores, best first, one retrieval per batch."""
    ranked: list[tuple[list[int], list[float]]] = []
    batches = _chunks(examples, batch_size)
    for chunk in tqdm(batches, desc="retrieval", disable=_hidden(progress), leave=False):
        found = _search(searchable, corpus, chunk, depth)
        rows, scores, valid = found.indices.tolist(), found.scores.tolist(), found.valid().tolist()
        for row, score, oks in zip(rows, scores, valid):
            keep = [i for i, ok in enumerate(oks) if ok]
            ranked.append(([row[i] for i in keep], [float(score[i]) for i in keep]))
    return ranked


def _metric_ks(settings: EvalConfig) -> list[tuple[str, int]]:
    """(metric, k) pairs in report order: hit, recall, all at recall_at; mrr; ndcg."""
    pairs = []
    for name in ("hit", "recall", "all", "mrr", "ndcg"):
        if name not in settings.metrics:
            continue
        ks = {"mrr": [settings.mrr_at], "ndcg": settings.ndcg_at}.get(name, settings.recall_at)
        pairs += [(name, k) for k in ks]
    return pairs


def _retrieval_metrics(
    ranked_ids: Sequence[list[str]], examples: Sequence[Example], pairs: Sequence[tuple[str, int]]
) -> dict[str, float]:
    """The mean of each (metric, k) over examples that all have gold ids."""
    totals = {f"{name}@{k}": 0.0 for name, k in pairs}
    for example, ranked in zip(examples, ranked_ids):
        for name, k in pairs:
            totals[f"{name}@{k}"] += _AT_K[name](ranked, example, k)
    return {name: total / len(examples) for name, total in totals.items()}


def _answer_metrics(answers: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    count = len(examples)
    return {
        "em": sum(exact_match(a, e.answers) for a, e in zip(answers, examples)) / count,
        "f1": sum(f1(a, e.answers) for a, e in zip(answers, examples)) / count,
        "sub_em": sum(sub_exact_match(a, e.answers) for a, e in zip(answers, examples)) / count,
    }


def _require_answers(examples: Sequence[Example]) -> None:
    missing = [e for e in examples if not e.answers]
    if missing:
        raise LatentragError(
            f"{len(missing)} of {len(examples)} questions have no answers (e.g. "
            f"{missing[0].id!r}): EM/F1 need them; this data only judges retrieval"
        )


def generate_answers(
    generator: Any,
    questions: list[str],
    passages: list[list[str]],
    max_new_tokens: int,
    batch_size: int = ANSWER_BATCH,
    progress: bool = False,
) -> list[str]:
    """Greedy answers from the generator, `batch_size` questions per call."""
    answers: list[str] = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="answering", disable=_hidden(progress), leave=False):
        end = start + batch_size
        answers += generator.generate(questions[start:end], passages[start:end], max_new_tokens)
    return answers


@torch.no_grad()
def measure(
    pipeline: Any,
    examples: Sequence[Example],
    settings: EvalConfig,
    *,
    qa: bool = False,
    answer: Answer | None = None,
    qa_questions: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    depth: int | None = None,
    on_ranking: Ranking | None = None,
) -> dict[str, float]:
    """The pipeline's metrics on `examples`, in one pass.

    Each question is retrieved once (`pipeline.retrieve`; among its `candidate_ids` when it
    has some), deep enough for every metric (at least `depth` when given) and for the
    passages shown to the generator. Retrieval metrics (`settings.metrics` at their k,
    clipped to the corpus size: see `EvalConfig`) are over the examples with gold ids, and
    absent when none has any; `on_ranking` sees every retrieved question's ranking. With
    `qa` and a generator, the first `qa_questions` examples (all by default) are answered
    once, by `answer` (default: the generator, greedy) from their top `settings.passages`
    passages of that same ranking, giving EM, F1 and sub-EM; a question without answers is
    then an error (one line).
    """
    examples = list(examples)
    asked = len(examples) if qa_questions is None else min(qa_questions, len(examples))
    if not qa or pipeline.generator is None:
        asked = 0
    _require_answers(examples[:asked])
    recorded = on_ranking is not None
    wanted = [i for i, e in enumerate(examples) if e.gold_ids or i < asked or recorded]
    if not wanted:
        return {}
    pairs = _metric_ks(settings)
    deepest = max([k for _, k in pairs] + [depth or 1, settings.passages if asked else 1])
    depth = min(deepest, len(pipeline.corpus))
    chosen = [examples[i] for i in wanted]
    found = _ranked_rows(pipeline, pipeline.corpus, chosen, depth, batch_size, progress)
    ranked = dict(zip(wanted, found))
    corpus = pipeline.corpus
    if on_ranking is not None:
        for i in wanted:
            rows, scores = ranked[i]
            on_ranking(examples[i], [corpus[r].id for r in rows], scores)

    metrics: dict[str, float] = {}
    judged = [i for i in wanted if examples[i].gold_ids]
    if judged and pairs:
        ids = [[corpus[r].id for r in ranked[i][0]] for i in judged]
        metrics |= _retrieval_metrics(ids, [examples[i] for i in judged], pairs)
    if asked:
        top = [ranked[i][0][: settings.passages] for i in range(asked)]
        passages = [[corpus[r].text for r in rows] for rows in top]
        answer = answer or partial(generate_answers, progress=progress)
        questions = [e.question for e in examples[:asked]]
        answers = answer(pipeline.generator, questions, passages, settings.max_new_tokens)
        metrics |= _answer_metrics(answers, examples[:asked])
    return metrics


def measure_with(settings: EvalConfig, **options: Any) -> Measure:
    """`measure` with these eval settings (and options): a trainer's default measurement."""
    return partial(measure, settings=settings, **options)


@torch.no_grad()
def evaluate_retrieval(
    retriever_or_pipeline: Searchable,
    corpus: Corpus,
    examples: Sequence[Example],
    ks: Sequence[int] = (1, 5, 20),
    mrr_at: int = MRR_AT,
    batch_size: int = 64,
    progress: bool = False,
    metrics: Sequence[str] = ("hit", "recall", "mrr"),
    ndcg_at: Sequence[int] = (10,),
) -> dict[str, float]:
    """Mean hit@k and recall@k for each k and MRR@mrr_at (and any other of `metrics`: all,
    ndcg) over the examples that have gold ids; a question with `candidate_ids` is ranked
    among them only.

    A k larger than the corpus is clipped to its size (the key keeps the k asked for).
    """
    judged = [e for e in examples if e.gold_ids]
    if not judged:
        raise LatentragError("retrieval metrics need examples with gold_ids; none has any")
    settings = EvalConfig(
        recall_at=list(ks), mrr_at=mrr_at, metrics=list(metrics), ndcg_at=list(ndcg_at)
    )
    pairs = _metric_ks(settings)
    depth = min(max(k for _, k in pairs), len(corpus))
    found = _ranked_rows(retriever_or_pipeline, corpus, judged, depth, batch_size, progress)
    ids = [[corpus[r].id for r in rows] for rows, _ in found]
    return _retrieval_metrics(ids, judged, pairs)


@torch.no_grad()
def evaluate_qa(
    pipeline: Any,
    examples: Sequence[Example],
    passages: int = 1,
    max_new_tokens: int = 16,
    batch_size: int = ANSWER_BATCH,
    progress: bool = True,
) -> dict[str, float]:
    """EM, F1 and sub-EM of `pipeline.predict`'s greedy answers from its top `passages`
    passages (no retrieval metrics: `measure` gives both from one retrieval)."""
    if not examples:
        raise LatentragError("evaluate_qa: no examples to answer")
    _require_answers(examples)
    answers: list[str] = []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="answering", disable=not progress):
        answers += pipeline.predict(Batch(chunk), passages=passages, max_new_tokens=max_new_tokens)
    return _answer_metrics(answers, examples)


RETRIEVAL_METRICS = tuple(_AT_K)
_LEGEND = {
    "hit": "hit@k: a gold passage is in the top k (what latentrag called recall@k before)",
    "recall": "recall@k: share of the gold passages in the top k (all-gold recall; "
    "= hit@k with one gold passage)",
    "all": "all@k: every gold passage is in the top k",
    "mrr": "mrr@k: 1/rank of the first gold passage in the top k",
    "ndcg": "ndcg@k: graded relevance, linear gains, log2 discounts (as trec_eval)",
    "sub_em": "sub_em: a reference answer is contained in the answer",
}


def metric_legend(metrics: dict[str, float]) -> str:
    """One line per kind of metric in `metrics`, saying what it measures."""
    kinds = dict.fromkeys(name.split("@")[0] for name in metrics)
    return "\n".join(_LEGEND[kind] for kind in kinds if kind in _LEGEND)
