"""Evaluate a retriever (recall@k, MRR@k against gold passages) and a pipeline (EM, F1)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from latentrag.core.errors import LatentragError
from latentrag.core.types import Batch, Candidates, Corpus, Example
from latentrag.evaluation.metrics import exact_match, f1, mrr_at_k, recall_at_k

__all__ = ["evaluate_qa", "evaluate_retrieval"]


class Searchable(Protocol):
    """A retriever, or a pipeline (which searches with its prior)."""

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates: ...


def _chunks(items: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _ranked_ids(candidates: Candidates, corpus: Corpus) -> list[list[str]]:
    valid = candidates.valid().tolist()
    rows = candidates.indices.tolist()
    return [[corpus[r].id for r, ok in zip(row, oks) if ok] for row, oks in zip(rows, valid)]


@torch.no_grad()
def evaluate_retrieval(
    retriever_or_pipeline: Searchable,
    corpus: Corpus,
    examples: Sequence[Example],
    ks: Sequence[int] = (1, 5, 20),
    mrr_at: int = 10,
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
    totals = {f"recall@{k}": 0.0 for k in ks} | {f"mrr@{mrr_at}": 0.0}
    batches = _chunks(judged, batch_size)
    for chunk in tqdm(batches, desc="retrieval", disable=not progress, leave=False):
        found = retriever_or_pipeline.retrieve([e.question for e in chunk], depth)
        for example, ranked in zip(chunk, _ranked_ids(found, corpus)):
            for k in ks:
                totals[f"recall@{k}"] += recall_at_k(ranked, example.gold_ids, k)
            totals[f"mrr@{mrr_at}"] += mrr_at_k(ranked, example.gold_ids, mrr_at)
    return {name: total / len(judged) for name, total in totals.items()}


@torch.no_grad()
def evaluate_qa(
    pipeline,
    examples: Sequence[Example],
    passages: int = 1,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """EM and F1 of the pipeline's greedy answers from its prior's top `passages` passages,
    plus the prior's retrieval metrics when the examples have gold ids."""
    if not examples:
        raise LatentragError("evaluate_qa: no examples to answer")
    em_total = f1_total = 0.0
    for chunk in tqdm(list(_chunks(examples, batch_size)), desc="answering", disable=not progress):
        answers = pipeline.predict(Batch(chunk), passages=passages, max_new_tokens=max_new_tokens)
        for example, answer in zip(chunk, answers):
            em_total += exact_match(answer, example.answers)
            f1_total += f1(answer, example.answers)
    result = {"em": em_total / len(examples), "f1": f1_total / len(examples)}
    if any(e.gold_ids for e in examples):
        result.update(evaluate_retrieval(pipeline, pipeline.corpus, examples))
    return result
