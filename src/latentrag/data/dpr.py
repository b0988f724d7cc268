"""DPR's files: the passages TSV (``psgs_w100.tsv``) and the retriever JSON or QA CSV files.

- Passages: a header ``id text title``, then one passage per line, tab-separated (quoted
  the way Python's csv module reads: a field in double quotes may hold tabs and quotes).
- Questions, ``*.json`` (DPR's ``nq-dev.json`` ...): one JSON array of
  ``{"question": ..., "answers": [...], "positive_ctxs": [{"passage_id": "..."}, ...]}``
  (``negative_ctxs``, ``hard_negative_ctxs`` and other fields are ignored). The gold
  passages are the positive contexts' ``passage_id`` (older files: ``psg_id``); the id is
  the record's ``id`` when it has one, else ``"<split>-<index>"``. The array is read one
  record at a time (`latentrag.data.json_stream`).
- Questions, ``*.csv`` / ``*.tsv`` (DPR's ``nq-test.qa.csv``): ``question<TAB>answers``
  with the answers a Python list literal; no gold passages (EM/F1 only).
"""

from __future__ import annotations

import ast
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentrag.core.types import Corpus, Example, Passage
from latentrag.data.json_stream import iter_array
from latentrag.data.readers import (
    DataError,
    FieldLog,
    Invalid,
    PathLike,
    check_unique,
    json_type,
    string_field,
    strings_field,
)

HEADER = ["id", "text", "title"]
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _rows(path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of a tab-separated file, one row at a time."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            for cells in reader:
                if cells and any(cell.strip() for cell in cells):
                    yield reader.line_num, cells
        except UnicodeDecodeError as err:
            raise DataError(path, f"invalid UTF-8 ({err.reason})", reader.line_num + 1) from None
        except csv.Error as err:
            raise DataError(path, f"malformed TSV: {err}", reader.line_num) from None


def iter_dpr_passages(path: PathLike) -> Iterator[Passage]:
    """The passages of a DPR passages TSV."""
    seen: dict[str, int] = {}
    for line, cells in _rows(path):
        if not seen and line == 1 and [c.strip() for c in cells] == HEADER:
            continue
        if len(cells) != 3:
            raise DataError(path, f"expected 3 columns (id, text, title), got {len(cells)}", line)
        ident, text, title = (cell.strip() for cell in cells)
        if not ident or not text:
            raise DataError(path, f"empty {'id' if not ident else 'text'}", line)
        check_unique(path, "passage", ident, line, seen)
        yield Passage(id=ident, text=text, title=title)


def read_dpr_passages(path: PathLike) -> Corpus:
    corpus = Corpus(iter_dpr_passages(path))
    if not len(corpus):
        raise DataError(path, "no passages (the file is empty)")
    return corpus


def _positive_id(ctx: Any, i: int) -> str:
    if not isinstance(ctx, dict):
        raise Invalid(f"positive_ctxs[{i}] must be an object, got {json_type(ctx)}")
    key = "passage_id" if "passage_id" in ctx else "psg_id"
    if key not in ctx:
        raise Invalid(f"positive_ctxs[{i}]: missing field 'passage_id'")
    value = ctx[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return string_field(ctx, key)


def _json_question(obj: Any, ident: str, fields: FieldLog) -> Example:
    if not isinstance(obj, dict):
        raise Invalid(f"expected a JSON object, got {json_type(obj)}")
    fields.check(obj)
    positives = obj.get("positive_ctxs", [])
    if not isinstance(positives, list):
        raise Invalid(f"field 'positive_ctxs' must be a list, got {json_type(positives)}")
    answers = strings_field(obj, "answers", empty_ok=True) if "answers" in obj else ()
    gold = tuple(dict.fromkeys(_positive_id(ctx, i) for i, ctx in enumerate(positives)))
    ident = string_field(obj, "id") if "id" in obj else ident
    return Example(id=ident, question=string_field(obj, "question"), answers=answers, gold_ids=gold)


def _json_questions(path: Path, split: str) -> Iterator[tuple[int, Example]]:
    fields = FieldLog(path, ("question",), ("id", "answers", "positive_ctxs"))
    for index, (line, obj) in enumerate(iter_array(path)):
        try:
            yield line, _json_question(obj, f"{split}-{index}", fields)
        except Invalid as err:
            raise DataError(path, str(err), line) from None
    fields.report()


def _csv_questions(path: Path, split: str) -> Iterator[tuple[int, Example]]:
    for index, (line, cells) in enumerate(_rows(path)):
        if len(cells) != 2:
            raise DataError(path, f"expected 2 columns (question, answers), got {len(cells)}", line)
        try:
            answers = ast.literal_eval(cells[1])
        except (ValueError, SyntaxError):
            raise DataError(path, "answers must be a list literal like ['a', 'b']", line) from None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(path, "answers must be a list of strings", line)
        if not cells[0].strip():
            raise DataError(path, "empty question", line)
        yield line, Example(f"{split}-{index}", cells[0], tuple(a for a in answers if a.strip()))


def read_dpr_questions(path: PathLike, split: str, corpus: Corpus) -> list[Example]:
    """The questions of a DPR retriever JSON or QA CSV file, gold ids checked."""
    path = Path(path)
    rows = _csv_questions if path.suffix in (".csv", ".tsv") else _json_questions
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, example in rows(path, split):
        check_unique(path, "example", example.id, line, seen)
        for pid in example.gold_ids:
            if pid not in corpus:
                message = f"example {example.id!r}: positive passage {pid!r} is not in the corpus"
                raise DataError(path, message, line)
        examples.append(example)
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    return examples
