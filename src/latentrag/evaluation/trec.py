"""TREC run files: what `latentrag evaluate --trec-run FILE` writes, for trec_eval, ir_measures
or pytrec_eval.

One line per (question, passage), best first within each question::

    <question id> Q0 <passage id> <rank> <score> <run tag>

Ranks start at 1; scores are the retriever's (or reranker's) and decrease with the rank.
trec_eval re-sorts each question's lines by score (then by passage id, descending), so
tied scores may be ranked differently there than here. Ids must not contain whitespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from latentrag.core.errors import LatentragError
from latentrag.core.types import Example


class TrecRunWriter:
    """A `measure` ranking callback writing each question's ranking as TREC run lines."""

    def __init__(self, handle: BinaryIO, tag: str = "latentrag") -> None:
        if not tag or any(c.isspace() for c in tag):
            raise LatentragError(f"TREC run tag {tag!r} must be one word")
        self.handle, self.tag = handle, tag
        self.questions = 0

    def __call__(self, example: Example, ids: list[str], scores: list[float]) -> None:
        _one_word(example.id, "question")
        lines = []
        for rank, (pid, score) in enumerate(zip(ids, scores), start=1):
            _one_word(pid, "passage")
            lines.append(f"{example.id} Q0 {pid} {rank} {score:.8g} {self.tag}\n")
        self.handle.write("".join(lines).encode("utf-8"))
        self.questions += 1


def _one_word(ident: str, kind: str) -> None:
    if not ident or any(c.isspace() for c in ident):
        raise LatentragError(f"{kind} id {ident!r} has whitespace: a TREC run cannot hold it")


def read_trec_run(path: str | Path) -> dict[str, list[tuple[str, int, float]]]:
    """question id -> [(passage id, rank, score)] in file order (for tests and checks)."""
    run: dict[str, list[tuple[str, int, float]]] = {}
    for line in Path(path).read_text("utf-8").splitlines():
        qid, _, pid, rank, score, _tag = line.split()
        run.setdefault(qid, []).append((pid, int(rank), float(score)))
    return run
