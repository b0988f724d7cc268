"""Plain data types shared by every component.

Nothing here imports torch at run time, so the data readers and the CLI stay light;
tensor fields are annotated only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from latentrag.core.errors import LatentragError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of text."""

    id: str
    text: str
    title: str = ""


class MissingAnswersError(LatentragError):
    """An example without reference answers reached something that needs them (a generator)."""


@dataclass(frozen=True)
class Example:
    """A question with, when known, its reference answers and the ids of its gold passages.

    answers: reference answers (the first is the training target); empty in retrieval-only
    data (BEIR), where only retrieval can be evaluated. gold_ids: the relevant passages;
    gold_grades: their relevance grades (BEIR qrels), aligned with gold_ids, empty when all
    are 1. candidate_ids: a closed candidate list (HotpotQA distractor, MS MARCO reranking):
    when given, retrieval, reranking, training and evaluation see only these passages.
    """

    id: str
    question: str
    answers: tuple[str, ...] = ()
    gold_ids: tuple[str, ...] = ()
    candidate_ids: tuple[str, ...] = ()
    gold_grades: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.gold_grades and len(self.gold_grades) != len(self.gold_ids):
            raise ValueError(
                f"example {self.id!r}: {len(self.gold_grades)} gold_grades for "
                f"{len(self.gold_ids)} gold_ids"
            )

    @property
    def target(self) -> str:
        """The answer used as the training target (the first reference)."""
        if not self.answers:
            raise MissingAnswersError(
                f"example {self.id!r} has no answers, and the generator needs them (this data "
                "only judges retrieval: evaluate without --qa and train no generator on it)"
            )
        return self.answers[0]

    def relevance(self) -> dict[str, int]:
        """Gold passage id -> relevance grade (1 for every gold id without grades)."""
        grades = self.gold_grades or (1,) * len(self.gold_ids)
        return dict(zip(self.gold_ids, grades))


class Corpus(Sequence[Passage]):
    """An ordered, id-addressable collection of passages.

    Retrievers refer to passages by their row in the corpus (an int), which is what
    `Candidates.indices` holds; `index_of` maps a passage id to its row.
    """

    def __init__(self, passages: Iterable[Passage]):
        self._passages = list(passages)
        self._rows: dict[str, int] = {}
        for row, passage in enumerate(self._passages):
            if passage.id in self._rows:
                raise ValueError(f"duplicate passage id {passage.id!r} in corpus")
            self._rows[passage.id] = row

    def __len__(self) -> int:
        return len(self._passages)

    def __getitem__(self, row):  # type: ignore[override]
        return self._passages[row]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self._passages)

    def __contains__(self, passage_id: object) -> bool:
        return passage_id in self._rows

    def index_of(self, passage_id: str) -> int:
        """Row of the passage with this id; KeyError naming the id when absent."""
        try:
            return self._rows[passage_id]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in the corpus") from None

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self._passages]

    def texts(self, with_title: bool = False) -> list[str]:
        if with_title:
            return [f"{p.title}. {p.text}" if p.title else p.text for p in self._passages]
        return [p.text for p in self._passages]

    def fingerprint(self) -> str:
        """SHA-256 over ids, titles and texts: changes whenever the corpus does."""
        digest = hashlib.sha256()
        for p in self._passages:
            for part in (p.id, p.title, p.text):
                digest.update(part.encode("utf-8"))
                digest.update(b"\x00")
        return digest.hexdigest()


@dataclass
class Candidates:
    """Passages retrieved for a batch of B queries, K per query.

    indices: LongTensor [B, K] of corpus rows; scores: FloatTensor [B, K] (higher is better);
    mask: BoolTensor [B, K], False where a row is padding (candidate sets of unequal size).
    """

    indices: Tensor
    scores: Tensor
    mask: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)  # type: ignore[return-value]

    def valid(self) -> Tensor:
        """The mask, or all True when there is no padding."""
        import torch

        if self.mask is None:
            return torch.ones_like(self.indices, dtype=torch.bool)
        return self.mask


@dataclass
class Batch:
    """A list of examples processed together."""

    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def questions(self) -> list[str]:
        return [e.question for e in self.examples]

    @property
    def targets(self) -> list[str]:
        return [e.target for e in self.examples]

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]
