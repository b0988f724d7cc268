"""Readers and writers for latentrag's data files, with errors that name file and line.

Two JSONL formats (UTF-8, one JSON object per line, blank lines skipped), read one line at
a time (a file is never held in memory whole). The other formats (BEIR, DPR, KILT, SQuAD,
Hugging Face tables) have their own modules in this package; `latentrag.data.dataset`
picks one from a config's ``[data] format``.

Passages (``passages.jsonl``), read by :func:`read_passages_jsonl`::

    {"id": "Super_Bowl_50#0", "title": "Super Bowl 50", "text": "Super Bowl 50 was ..."}

- ``id``    string, non-empty, unique in the file
- ``title`` string, optional (default ``""``)
- ``text``  string, non-empty

Examples (``train.jsonl``, ``dev.jsonl``, ...), read by :func:`read_examples_jsonl`::

    {"id": "56be4db0acb8001400a502ec", "question": "Which NFL team ...?",
     "answers": ["Denver Broncos"], "gold_ids": ["Super_Bowl_50#0"]}

(one line in the file; wrapped here). Fields:

- ``id``       string, non-empty, unique in the file
- ``question`` string, not empty or blank
- ``answers``  list of non-empty strings, optional (retrieval-only data has none); when
  present, at least one; the first is the training target
- ``gold_ids`` list of non-empty passage ids, optional (default ``[]``); check them against
  a corpus with :func:`check_gold_ids`
- ``gold_grades`` list of integers, optional: the relevance grade of each gold id (for
  nDCG; default 1 each)
- ``candidate_ids`` list of non-empty passage ids, optional: a closed candidate list; when
  present, retrieval, reranking, training and evaluation see only these passages

Required fields are strict: a missing field, a value of the wrong type, malformed JSON,
invalid UTF-8, a duplicate id or a file with no records raises :class:`DataError`, whose
message is one line ``"{path}:{line}: {message}"``. Reading stops at the first error.
Fields not listed above are ignored (real data carries metadata), and listed once per
file in an INFO log (``latentrag evaluate --verbose`` shows it); one that looks like a
misspelt absent field is named in a warning (``answer``: did you mean ``answers``?), or is
the error when that field is required. A missing file raises the usual ``OSError``.

SQuAD v1.1 JSON is read by :func:`read_squad` (see `latentrag.data.squad`).

:func:`write_jsonl` writes records atomically (a temporary file in the same folder,
fsync, then ``os.replace``), so readers never see a half-written file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from latentrag.core.errors import LatentragError
from latentrag.core.types import Corpus, Example, Passage
from latentrag.io.atomic import atomic_file, atomic_write_bytes

log = logging.getLogger("latentrag.data")

__all__ = [
    "DataError",
    "FieldLog",
    "atomic_write_bytes",
    "check_candidate_ids",
    "check_gold_ids",
    "iter_jsonl",
    "read_examples_jsonl",
    "read_passages_jsonl",
    "read_squad",
    "to_record",
    "write_jsonl",
]

PathLike = str | os.PathLike[str]

JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class DataError(LatentragError, ValueError):
    """A data file is malformed; ``str()`` is one line ``"{path}:{line}: {message}"``.

    ``line`` is 1-based, or None when unknown (then the string is ``"{path}: {message}"``).
    """

    def __init__(self, path: PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.message = " ".join(str(message).split("\n"))
        super().__init__(self.path, self.message, self.line)

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class _DuplicateKey(ValueError):
    """A JSON object repeats a key (raised inside json.loads)."""


class Invalid(Exception):
    """A record breaks the format; the caller turns it into a DataError with path and line."""


_Invalid = Invalid  # the name this module used before the other readers shared it


# ---------------------------------------------------------------------------- helpers


def json_type(value: object) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


_json_type = json_type


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {key!r} in JSON object")
        obj[key] = value
    return obj


def _loads(text: str | bytes) -> Any:
    """json.loads that rejects duplicate keys; errors become ValueError/RecursionError."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys)


def json_error(
    path: PathLike, err: BaseException, line: int | None, pos: int | None = None
) -> DataError:
    """The DataError for a failed JSON decode (`pos`: where in the decoded text, for the
    column when the error is about one line of a longer text)."""
    if isinstance(err, json.JSONDecodeError):
        column = err.colno if pos is None else pos - err.doc.rfind("\n", 0, pos)
        return DataError(path, f"malformed JSON: {err.msg} (column {column})", line)
    if isinstance(err, _DuplicateKey):
        return DataError(path, str(err), line)
    if isinstance(err, RecursionError):
        return DataError(path, "malformed JSON: nested too deeply", line)
    return DataError(path, f"malformed JSON: {err}", line)


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line, reading one line at a time;
    DataError on a bad line."""
    with open(path, "rb") as handle:
        for lineno, chunk in enumerate(handle, start=1):
            try:
                text = chunk.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, f"invalid UTF-8 at byte {err.start}", lineno) from None
            if not text.strip():
                continue
            try:
                obj = _loads(text)
            except json.JSONDecodeError as err:
                raise json_error(path, err, lineno) from None
            except (ValueError, RecursionError) as err:
                raise json_error(path, err, lineno) from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {json_type(obj)}", lineno)
            yield lineno, obj


_iter_jsonl = iter_jsonl


class FieldLog:
    """Checks a file's records for required fields and collects the fields it ignores,
    which `report` logs once (INFO) for the whole file."""

    def __init__(self, path: PathLike, required: tuple[str, ...], optional: tuple[str, ...]):
        self.path, self.required, self.optional = path, required, optional
        self.ignored: set[str] = set()

    def check(self, obj: Mapping[str, Any]) -> None:
        """Invalid on a missing required field; an unknown field that looks like a misspelt
        absent known one is named in a warning, once."""
        known = self.required + self.optional
        for key in obj:
            if key in known or key in self.ignored:
                continue
            absent = [name for name in known if name not in obj]
            close = difflib.get_close_matches(key, absent, n=1, cutoff=0.85)
            if close:
                hint = f"did you mean {close[0]!r}?"
                if close[0] in self.required:
                    raise Invalid(f"missing field {close[0]!r} (found {key!r}: {hint})")
                log.warning("%s: ignored field %r (%s)", self.path, key, hint)
            self.ignored.add(key)
        for key in self.required:
            if key not in obj:
                raise Invalid(f"missing field {key!r}")

    def report(self) -> None:
        if self.ignored:
            log.info("%s: ignored fields: %s", self.path, ", ".join(sorted(self.ignored)))


def _valid_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def string_field(obj: Mapping[str, Any], key: str, *, empty_ok: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise Invalid(f"field {key!r} must be a string, got {json_type(value)}")
    if not empty_ok and not value.strip():
        raise Invalid(f"field {key!r} must not be empty")
    if not _valid_unicode(value):
        raise Invalid(f"field {key!r} contains an unpaired surrogate")
    return value


_string = string_field


def strings_field(obj: Mapping[str, Any], key: str, *, empty_ok: bool) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list):
        raise Invalid(f"field {key!r} must be a list of strings, got {json_type(value)}")
    if not value and not empty_ok:
        raise Invalid(f"field {key!r} must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Invalid(f"field {key!r}[{i}] must be a string, got {json_type(item)}")
        if not item.strip():
            raise Invalid(f"field {key!r}[{i}] must not be empty")
        if not _valid_unicode(item):
            raise Invalid(f"field {key!r}[{i}] contains an unpaired surrogate")
    return tuple(value)


_strings = strings_field


def grades_field(obj: Mapping[str, Any], key: str, count: int) -> tuple[int, ...]:
    """A list of `count` integer relevance grades."""
    value = obj[key]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Invalid(f"field {key!r} must be a list of integers")
    if len(value) != count:
        raise Invalid(f"field {key!r} has {len(value)} grades for {count} gold_ids")
    return tuple(value)


def check_unique(path: PathLike, kind: str, ident: str, line: int, seen: dict[str, int]) -> None:
    if ident in seen:
        raise DataError(
            path, f"duplicate {kind} id {ident!r} (lines {seen[ident]} and {line})", line
        )
    seen[ident] = line


_check_unique = check_unique


# ---------------------------------------------------------------------------- JSONL readers

PASSAGE_FIELDS = (("id", "text"), ("title",))
EXAMPLE_FIELDS = (("id", "question"), ("answers", "gold_ids", "gold_grades", "candidate_ids"))


def passage_record(obj: Mapping[str, Any], fields: FieldLog) -> Passage:
    fields.check(obj)
    title = string_field(obj, "title", empty_ok=True) if "title" in obj else ""
    return Passage(id=string_field(obj, "id"), text=string_field(obj, "text"), title=title)


def example_record(obj: Mapping[str, Any], fields: FieldLog) -> Example:
    fields.check(obj)
    answers = strings_field(obj, "answers", empty_ok=False) if "answers" in obj else ()
    gold = strings_field(obj, "gold_ids", empty_ok=True) if "gold_ids" in obj else ()
    grades = grades_field(obj, "gold_grades", len(gold)) if "gold_grades" in obj else ()
    candidates = (
        strings_field(obj, "candidate_ids", empty_ok=False) if "candidate_ids" in obj else ()
    )
    return Example(
        id=string_field(obj, "id"),
        question=string_field(obj, "question"),
        answers=answers,
        gold_ids=gold,
        candidate_ids=candidates,
        gold_grades=grades,
    )


def iter_passages_jsonl(path: PathLike) -> Iterator[Passage]:
    """The passages of a passages JSONL file, one line at a time (ids checked unique)."""
    seen: dict[str, int] = {}
    fields = FieldLog(path, *PASSAGE_FIELDS)
    for lineno, obj in iter_jsonl(path):
        try:
            passage = passage_record(obj, fields)
        except Invalid as err:
            raise DataError(path, str(err), lineno) from None
        check_unique(path, "passage", passage.id, lineno, seen)
        yield passage
    fields.report()


def read_passages_jsonl(path: PathLike) -> Corpus:
    """Read a passages JSONL file (format in the module docstring) into a Corpus."""
    passages = list(iter_passages_jsonl(path))
    if not passages:
        raise DataError(path, "no passages (the file is empty)")
    return Corpus(passages)


def read_examples_jsonl(path: PathLike) -> list[Example]:
    """Read an examples JSONL file (format in the module docstring)."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    fields = FieldLog(path, *EXAMPLE_FIELDS)
    for lineno, obj in iter_jsonl(path):
        try:
            example = example_record(obj, fields)
        except Invalid as err:
            raise DataError(path, str(err), lineno) from None
        check_unique(path, "example", example.id, lineno, seen)
        examples.append(example)
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    fields.report()
    return examples


def line_of_id(path: PathLike, ident: str) -> int | None:
    """Line of the JSONL record with this id, or None (not JSONL, unreadable, absent)."""
    try:
        for lineno, obj in iter_jsonl(path):
            if obj.get("id") == ident:
                return lineno
    except (OSError, DataError):
        return None
    return None


def check_gold_ids(
    examples: Iterable[Example],
    corpus: Corpus,
    path: PathLike,
    lines: Mapping[str, int] | None = None,
) -> None:
    """DataError naming the example (and its line in `path` when found) whose gold id is
    not in the corpus; `path` is the file the examples came from; `lines` maps example ids
    to their lines when the file is not latentrag JSONL."""
    _check_ids(examples, corpus, path, lines, "gold_ids", "gold id")


def check_candidate_ids(
    examples: Iterable[Example],
    corpus: Corpus,
    path: PathLike,
    lines: Mapping[str, int] | None = None,
) -> None:
    """As `check_gold_ids`, for the examples' candidate lists."""
    _check_ids(examples, corpus, path, lines, "candidate_ids", "candidate id")


def _check_ids(examples, corpus, path, lines, attribute: str, label: str) -> None:
    for example in examples:
        for pid in getattr(example, attribute):
            if pid not in corpus:
                line = lines.get(example.id) if lines else line_of_id(path, example.id)
                raise DataError(
                    path,
                    f"example {example.id!r}: {label} {pid!r} is not in the corpus "
                    f"({len(corpus)} passages)",
                    line,
                )


# ---------------------------------------------------------------------------- SQuAD


def read_squad(path: PathLike) -> tuple[Corpus, list[Example]]:
    """Read a SQuAD v1.1 JSON file into (corpus of paragraphs, examples), streaming; see
    `latentrag.data.squad`."""
    from latentrag.data.squad import read_squad as read

    return read(path)


# ---------------------------------------------------------------------------- writing


def to_record(obj: Passage | Example | Mapping[str, Any]) -> dict[str, Any]:
    """The JSONL record of a Passage or Example (field order as documented); a mapping as is."""
    if isinstance(obj, Passage):
        return {"id": obj.id, "title": obj.title, "text": obj.text}
    if isinstance(obj, Example):
        record: dict[str, Any] = {"id": obj.id, "question": obj.question}
        if obj.answers:
            record["answers"] = list(obj.answers)
        record["gold_ids"] = list(obj.gold_ids)
        if obj.gold_grades:
            record["gold_grades"] = list(obj.gold_grades)
        if obj.candidate_ids:
            record["candidate_ids"] = list(obj.candidate_ids)
        return record
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def write_jsonl(path: PathLike, records: Iterable[Passage | Example | Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` endings), atomically.

    Passages and Examples are written in the documented format (see :func:`to_record`);
    the output is deterministic, so the same records give the same bytes.
    """
    with atomic_file(path) as handle:
        for record in records:
            line = json.dumps(to_record(record), ensure_ascii=False, allow_nan=False) + "\n"
            handle.write(line.encode("utf-8"))
