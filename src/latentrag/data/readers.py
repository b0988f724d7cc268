"""Readers and writers for latentrag's data files, with errors that name file and line.

Two JSONL formats (UTF-8, one JSON object per line, blank lines skipped) and SQuAD v1.1.

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
- ``answers``  list of non-empty strings, at least one; the first is the training target
- ``gold_ids`` list of non-empty passage ids, optional (default ``[]``); check them against
  a corpus with :func:`check_gold_ids`

Both readers are strict: a field not listed above, a missing field, a value of the wrong
type, malformed JSON, invalid UTF-8, a duplicate id or a file with no records raises
:class:`DataError`, whose message is one line ``"{path}:{line}: {message}"``. Reading stops
at the first error. A missing file raises the usual ``OSError``.

SQuAD v1.1 JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``),
read by :func:`read_squad`: paragraph ``j`` of the article titled ``T`` becomes the passage
with id ``f"{T}#{j}"`` (``T`` is SQuAD's title slug, e.g. ``Super_Bowl_50#0``) and title
``T`` with underscores as spaces; each question becomes an :class:`Example` whose answers
are the distinct answer texts in annotation order and whose gold id is its paragraph's id.
Extra SQuAD fields (``version``, ``answer_start``, ...) are ignored.

:func:`write_jsonl` writes records atomically (a temporary file in the same folder,
fsync, then ``os.replace``), so readers never see a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from latentrag.core.errors import LatentragError
from latentrag.core.types import Corpus, Example, Passage
from latentrag.io.atomic import atomic_write_bytes

__all__ = [
    "DataError",
    "atomic_write_bytes",
    "check_gold_ids",
    "read_examples_jsonl",
    "read_passages_jsonl",
    "read_squad",
    "to_record",
    "write_jsonl",
]

PathLike = str | os.PathLike[str]

_JSON_TYPES = {
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


class _Invalid(Exception):
    """A record breaks the format; the caller turns it into a DataError with path and line."""


# ---------------------------------------------------------------------------- helpers


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {key!r} in JSON object")
        obj[key] = value
    return obj


def _loads(text: str | bytes) -> Any:
    """json.loads that rejects duplicate keys; errors become ValueError/RecursionError."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def _json_error(path: PathLike, err: BaseException, line: int | None) -> DataError:
    if isinstance(err, json.JSONDecodeError):
        return DataError(path, f"malformed JSON: {err.msg} (column {err.colno})", line)
    if isinstance(err, _DuplicateKey):
        return DataError(path, str(err), line)
    if isinstance(err, RecursionError):
        return DataError(path, "malformed JSON: nested too deeply", line)
    return DataError(path, f"malformed JSON: {err}", line)


def _iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; DataError on a bad line."""
    raw = Path(path).read_bytes()
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, f"invalid UTF-8 at byte {err.start}", lineno) from None
        if not text.strip():
            continue
        try:
            obj = _loads(text)
        except (ValueError, RecursionError) as err:
            raise _json_error(path, err, lineno) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {_json_type(obj)}", lineno)
        yield lineno, obj


def _check_fields(
    obj: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]
) -> None:
    allowed = required + optional
    for key in obj:
        if key not in allowed:
            raise _Invalid(f"unknown field {key!r} (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in obj:
            raise _Invalid(f"missing field {key!r}")


def _valid_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _string(obj: Mapping[str, Any], key: str, *, empty_ok: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f"field {key!r} must be a string, got {_json_type(value)}")
    if not empty_ok and not value.strip():
        raise _Invalid(f"field {key!r} must not be empty")
    if not _valid_unicode(value):
        raise _Invalid(f"field {key!r} contains an unpaired surrogate")
    return value


def _strings(obj: Mapping[str, Any], key: str, *, empty_ok: bool) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list):
        raise _Invalid(f"field {key!r} must be a list of strings, got {_json_type(value)}")
    if not value and not empty_ok:
        raise _Invalid(f"field {key!r} must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _Invalid(f"field {key!r}[{i}] must be a string, got {_json_type(item)}")
        if not item.strip():
            raise _Invalid(f"field {key!r}[{i}] must not be empty")
        if not _valid_unicode(item):
            raise _Invalid(f"field {key!r}[{i}] contains an unpaired surrogate")
    return tuple(value)


def _check_unique(path: PathLike, kind: str, ident: str, line: int, seen: dict[str, int]) -> None:
    if ident in seen:
        raise DataError(
            path, f"duplicate {kind} id {ident!r} (lines {seen[ident]} and {line})", line
        )
    seen[ident] = line


# ---------------------------------------------------------------------------- JSONL readers


def _passage(obj: Mapping[str, Any]) -> Passage:
    _check_fields(obj, ("id", "text"), ("title",))
    title = _string(obj, "title", empty_ok=True) if "title" in obj else ""
    return Passage(id=_string(obj, "id"), text=_string(obj, "text"), title=title)


def _example(obj: Mapping[str, Any]) -> Example:
    _check_fields(obj, ("id", "question", "answers"), ("gold_ids",))
    gold = _strings(obj, "gold_ids", empty_ok=True) if "gold_ids" in obj else ()
    return Example(
        id=_string(obj, "id"),
        question=_string(obj, "question"),
        answers=_strings(obj, "answers", empty_ok=False),
        gold_ids=gold,
    )


def read_passages_jsonl(path: PathLike) -> Corpus:
    """Read a passages JSONL file (format in the module docstring) into a Corpus."""
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        try:
            passage = _passage(obj)
        except _Invalid as err:
            raise DataError(path, str(err), lineno) from None
        _check_unique(path, "passage", passage.id, lineno, seen)
        passages.append(passage)
    if not passages:
        raise DataError(path, "no passages (the file is empty)")
    return Corpus(passages)


def read_examples_jsonl(path: PathLike) -> list[Example]:
    """Read an examples JSONL file (format in the module docstring)."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        try:
            example = _example(obj)
        except _Invalid as err:
            raise DataError(path, str(err), lineno) from None
        _check_unique(path, "example", example.id, lineno, seen)
        examples.append(example)
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    return examples


def _line_of_id(path: PathLike, ident: str) -> int | None:
    """Line of the JSONL record with this id, or None (not JSONL, unreadable, absent)."""
    try:
        for lineno, obj in _iter_jsonl(path):
            if obj.get("id") == ident:
                return lineno
    except (OSError, DataError):
        return None
    return None


def check_gold_ids(examples: Iterable[Example], corpus: Corpus, path: PathLike) -> None:
    """DataError naming the example (and its line in `path` when found) whose gold id is
    not in the corpus; `path` is the file the examples came from."""
    for example in examples:
        for gold in example.gold_ids:
            if gold not in corpus:
                raise DataError(
                    path,
                    f"example {example.id!r}: gold id {gold!r} is not in the corpus "
                    f"({len(corpus)} passages)",
                    _line_of_id(path, example.id),
                )


# ---------------------------------------------------------------------------- SQuAD


def _require(obj: Any, where: str, fields: dict[str, type]) -> None:
    if not isinstance(obj, dict):
        raise _Invalid(f"{where}: expected a JSON object, got {_json_type(obj)}")
    for key, kind in fields.items():
        if key not in obj:
            raise _Invalid(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], kind):
            wanted, got = _JSON_TYPES[kind], _json_type(obj[key])
            raise _Invalid(f"{where}: field {key!r} must be a JSON {wanted}, got {got}")


def _squad_answers(qa: dict[str, Any], where: str) -> tuple[str, ...]:
    texts: list[str] = []
    for i, answer in enumerate(qa["answers"]):
        _require(answer, f"{where}.answers[{i}]", {"text": str})
        if answer["text"].strip() and answer["text"] not in texts:
            texts.append(answer["text"])
    if not texts:
        raise _Invalid(f"{where}: no answers")
    return tuple(texts)


def _squad_question(qa: Any, where: str, pid: str) -> Example:
    _require(qa, where, {"id": str, "question": str, "answers": list})
    if not qa["id"].strip():
        raise _Invalid(f"{where}: field 'id' must not be empty")
    if not qa["question"].strip():
        raise _Invalid(f"{where}: field 'question' must not be empty")
    answers = _squad_answers(qa, where)
    return Example(id=qa["id"], question=qa["question"], answers=answers, gold_ids=(pid,))


def _squad_article(
    article: Any, where: str, passages: list[Passage], examples: list[Example]
) -> None:
    _require(article, where, {"title": str, "paragraphs": list})
    slug = article["title"]
    for j, paragraph in enumerate(article["paragraphs"]):
        pwhere = f"{where}.paragraphs[{j}]"
        _require(paragraph, pwhere, {"context": str, "qas": list})
        pid = f"{slug}#{j}"
        passages.append(Passage(id=pid, text=paragraph["context"], title=slug.replace("_", " ")))
        for k, qa in enumerate(paragraph["qas"]):
            examples.append(_squad_question(qa, f"{pwhere}.qas[{k}]", pid))


def _squad_unique(path: PathLike, passages: list[Passage], examples: list[Example]) -> None:
    groups = (("passage", [p.id for p in passages]), ("question", [e.id for e in examples]))
    for kind, ids in groups:
        seen: set[str] = set()
        for ident in ids:
            if ident in seen:
                raise DataError(path, f"duplicate {kind} id {ident!r}")
            seen.add(ident)


def read_squad(path: PathLike) -> tuple[Corpus, list[Example]]:
    """Read a SQuAD v1.1 JSON file into (corpus of paragraphs, examples); see module doc."""
    try:
        data = _loads(Path(path).read_bytes())
    except UnicodeDecodeError as err:
        raise DataError(path, f"invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise _json_error(path, err, err.lineno) from None
    except (ValueError, RecursionError) as err:
        raise _json_error(path, err, None) from None
    passages: list[Passage] = []
    examples: list[Example] = []
    try:
        _require(data, "top level", {"data": list})
        for i, article in enumerate(data["data"]):
            _squad_article(article, f"data[{i}]", passages, examples)
    except _Invalid as err:
        raise DataError(path, str(err)) from None
    if not passages:
        raise DataError(path, "no passages (field 'data' has no paragraphs)")
    if not examples:
        raise DataError(path, "no examples (no paragraph has questions)")
    _squad_unique(path, passages, examples)
    return Corpus(passages), examples


# ---------------------------------------------------------------------------- writing


def to_record(obj: Passage | Example | Mapping[str, Any]) -> dict[str, Any]:
    """The JSONL record of a Passage or Example (field order as documented); a mapping as is."""
    if isinstance(obj, Passage):
        return {"id": obj.id, "title": obj.title, "text": obj.text}
    if isinstance(obj, Example):
        return {
            "id": obj.id,
            "question": obj.question,
            "answers": list(obj.answers),
            "gold_ids": list(obj.gold_ids),
        }
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def write_jsonl(path: PathLike, records: Iterable[Passage | Example | Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` endings), atomically.

    Passages and Examples are written in the documented format (see :func:`to_record`);
    the output is deterministic, so the same records give the same bytes.
    """
    lines = [
        json.dumps(to_record(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records
    ]
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
