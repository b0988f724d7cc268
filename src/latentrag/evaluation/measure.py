"""Measure a pipeline: its retrieval's recall@k and MRR@k against gold passages, and the
EM/F1 of its greedy answers.

`measure` is the one measurement of a run: the trainer's periodic and final evaluations,
a run's before/after numbers and `latentrag evaluate` all call it. It retrieves each
question once, deep enough for every metric and for the passages the generator reads, and
answers each question at most once. `evaluate_retrieval` (a bare retriever) and
`evaluate_qa` (answers from `pipeline.predict`) measure one side alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from latentrag.core.config import EvalConfig
from latentrag.core.errors import LatentragError
from latentrag.core.types import Batch, Candidates, Corpus, Example
from latentrag.evaluation.metrics import exact_match, f1, mrr_at_k, recall_at_k

__all__ = ["Measure", "evaluate_qa", "evaluate_retrieval", "measure", "measure_with"]

#: answer(generator, questions, passages per question, max_new_tokens) -> one answer each
Answer = Callable[[Any, list[str], list[list[str]], int], list[str]]

MRR_AT = 10
ANSWER_BATCH = 8


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


def _ranked_rows(
    searchable: Searchable,
    questions: Sequence[str],
    depth: int,
    batch_size: int,
    progress: bool,
) -> list[list[int]]:
    """Each question's valid corpus rows, best first, from one `retrieve` call per batch."""
    ranked: list[list[int]] = []
    batches = _chunks(questions, batch_size)
    for chunk in tqdm(batches, desc="retrieval", disable=_hidden(progress), leave=False):
        found = searchable.retrieve(chunk, depth)
        rows, valid = found.indices.tolist(), found.valid().tolist()
        ranked += [[r for r, ok in zip(row, oks) if ok] for row, oks in zip(rows, valid)]
    return ranked


def _retrieval_metrics(
    ranked_ids: Sequence[list[str]], examples: Sequence[Example], ks: Sequence[int], mrr_at: int
) -> dict[str, float]:
    """Mean recall@k for each k and MRR@mrr_at over examples that all have gold ids."""
    totals = {f"recall@{k}": 0.0 for k in ks} | {f"mrr@{mrr_at}": 0.0}
    for example, ranked in zip(examples, ranked_ids):
        for k in ks:
            totals[f"recall@{k}"] += recall_at_k(ranked, example.gold_ids, k)
        totals[f"mrr@{mrr_at}"] += mrr_at_k(ranked, example.gold_ids, mrr_at)
    return {name: total / len(examples) for name, total in totals.items()}


def _answer_metrics(answers: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    count = len(examples)
    return {
        "em": sum(exact_match(a, e.answers) for a, e in zip(answers, examples)) / count,
        "f1": sum(f1(a, e.answers) for a, e in zip(answers, examples)) / count,
    }


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
) -> dict[str, float]:
    """The pipeline's metrics on `examples`, in one pass.

    Each question is retrieved once (`pipeline.retrieve`), deep enough for every metric and
    for the passages shown to the generator. Retrieval metrics (recall@k for k in
    `settings.recall_at`, clipped to the corpus size; MRR@10) are over the examples with
    gold ids, and absent when none has any. With `qa` and a generator, the first
    `qa_questions` examples (all by default) are answered once, by `answer` (default: the
    generator, greedy) from their top `settings.passages` passages of that same ranking,
    giving EM and F1.
    """
    examples = list(examples)
    asked = len(examples) if qa_questions is None else min(qa_questions, len(examples))
    if not qa or pipeline.generator is None:
        asked = 0
    wanted = [i for i, e in enumerate(examples) if e.gold_ids or i < asked]
    if not wanted:
        return {}
    ks = list(settings.recall_at)
    deepest = max([*ks, MRR_AT, settings.passages if asked else 1])
    depth = min(deepest, len(pipeline.corpus))
    questions = [examples[i].question for i in wanted]
    ranked = dict(zip(wanted, _ranked_rows(pipeline, questions, depth, batch_size, progress)))

    metrics: dict[str, float] = {}
    judged = [i for i in wanted if examples[i].gold_ids]
    if judged:
        ids = [[pipeline.corpus[r].id for r in ranked[i]] for i in judged]
        metrics |= _retrieval_metrics(ids, [examples[i] for i in judged], ks, MRR_AT)
    if asked:
        top = [ranked[i][: settings.passages] for i in range(asked)]
        passages = [[pipeline.corpus[r].text for r in rows] for rows in top]
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
) -> dict[str, float]:
    """Mean recall@k for each k and MRR@mrr_at over the examples that have gold ids.

    A k larger than the corpus is clipped to its size (the key keeps the k asked for).
    """
    judged = [e for e in examples if e.gold_ids]
    if not judged:
        raise LatentragError("retrieval metrics need examples with gold_ids; none has any")
    depth = min(max([*ks, mrr_at]), len(corpus))
    questions = [e.question for e in judged]
    rows = _ranked_rows(retriever_or_pipeline, questions, depth, batch_size, progress)
    ids = [[corpus[r].id for r in ranked] for ranked in rows]
    return _retrieval_metrics(ids, judged, ks, mrr_at)


@torch.no_grad()
def evaluate_qa(
    pipeline: Any,
    examples: Sequence[Example],
    passages: int = 1,
    max_new_tokens: int = 16,
    batch_size: int = ANSWER_BATCH,
    progress: bool = True,
) -> dict[str, float]:
    """EM and F1 of `pipeline.predict`'s greedy answers from its top `passages` passages
    (no retrieval metrics: `measure` gives both from one retrieval)."""
    if not examples:
        raise LatentragError("evaluate_qa: no examples to answer")
    answers: list[str] = []
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="answering", disable=not progress):
        answers += pipeline.predict(Batch(chunk), passages=passages, max_new_tokens=max_new_tokens)
    return _answer_metrics(answers, examples)
