"""Per-question predictions of a pipeline (`latentrag predict RUN --split test --out F`).

One record per question: its id, question, reference answers and gold ids, the passages
retrieved (ids and scores, best first), the answer generated from the top
``eval.passages`` of them, and its EM, F1 and sub-EM. Questions are retrieved and answered
in the batches `evaluation.measure.measure` uses, so on the dev split the mean EM and F1
of the records equal the run's evaluation. The file is written atomically (JSON Lines).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from latentrag.core.config import EvalConfig
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Example
from latentrag.evaluation.measure import MRR_AT, generate_answers
from latentrag.evaluation.metrics import exact_match, f1, normalize_answer
from latentrag.io.atomic import atomic_file

__all__ = ["predict_examples", "sub_exact_match", "summarize", "write_predictions"]

RETRIEVE_BATCH = 64


def sub_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised reference (not empty) is a substring of the normalised
    prediction (plain substring, as FlashRAG's sub_em and the evaluation's), else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(ref and ref in predicted for ref in map(normalize_answer, answers)))


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _retrieved(
    pipeline: Pipeline, questions: list[str], depth: int
) -> list[list[tuple[int, float]]]:
    """Each question's (row, score) pairs, best first, `depth` deep."""
    ranked: list[list[tuple[int, float]]] = []
    for chunk in _chunks(questions, RETRIEVE_BATCH):
        found = pipeline.retrieve(chunk, depth)
        rows, scores, valid = found.indices.tolist(), found.scores.tolist(), found.valid().tolist()
        for row, score, ok in zip(rows, scores, valid):
            ranked.append([(r, float(s)) for r, s, v in zip(row, score, ok) if v])
    return ranked


@torch.no_grad()
def predict_examples(
    pipeline: Pipeline, examples: Sequence[Example], settings: EvalConfig, depth: int | None = None
) -> list[dict[str, Any]]:
    """One prediction record per example (see the module docstring). depth: passages
    listed per question (default: enough for every recall@k of the settings and MRR@10)."""
    examples = list(examples)
    wanted = depth or max([*settings.recall_at, MRR_AT, settings.passages])
    depth = min(wanted, len(pipeline.corpus))
    ranked = _retrieved(pipeline, [e.question for e in examples], depth)
    answers: list[str | None] = [None] * len(examples)
    if pipeline.generator is not None:
        read = [[pipeline.corpus[r].text for r, _ in rows[: settings.passages]] for rows in ranked]
        questions = [e.question for e in examples]
        answers = list(
            generate_answers(pipeline.generator, questions, read, settings.max_new_tokens)
        )
    return [_record(pipeline, e, rows, a) for e, rows, a in zip(examples, ranked, answers)]


def _record(
    pipeline: Pipeline, example: Example, rows: list[tuple[int, float]], answer: str | None
) -> dict[str, Any]:
    ids = [pipeline.corpus[r].id for r, _ in rows]
    record: dict[str, Any] = {
        "id": example.id,
        "question": example.question,
        "answers": list(example.answers),
        "gold_ids": list(example.gold_ids),
        "retrieved": [{"id": pid, "score": score} for pid, (_, score) in zip(ids, rows)],
        "gold_rank": _gold_rank(ids, example.gold_ids),
        "prediction": answer,
    }
    if answer is not None:
        record["em"] = exact_match(answer, example.answers)
        record["f1"] = f1(answer, example.answers)
        record["sub_em"] = sub_exact_match(answer, example.answers)
    return record


def _gold_rank(ids: list[str], gold: Sequence[str]) -> int | None:
    """Rank (from 1) of the first gold passage among the retrieved, None if absent."""
    return next((rank for rank, pid in enumerate(ids, start=1) if pid in set(gold)), None)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean EM, F1 and sub-EM over the answered records (empty when none was answered)."""
    answered = [r for r in records if r.get("prediction") is not None]
    if not answered:
        return {}
    return {key: sum(r[key] for r in answered) / len(answered) for key in ("em", "f1", "sub_em")}


def write_predictions(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The records as JSON Lines at `path`, written atomically."""
    with atomic_file(path) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
