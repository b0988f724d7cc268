"""KILT: the knowledge source (``kilt_knowledgesource.json``) and task files (``*.jsonl``).

- Knowledge source, one Wikipedia page per line:
  ``{"wikipedia_id": "290", "wikipedia_title": "A", "text": ["A\\n", "A is ...\\n", ...]}``.
  With ``unit = "paragraph"`` (default) each non-empty paragraph is a passage with id
  ``"<wikipedia_id>#<paragraph index>"`` (KILT's paragraph numbering; section headers
  ``Section::::...`` are skipped); with ``unit = "page"`` each page is one passage with id
  ``"<wikipedia_id>"`` (KILT's page-level R-precision setting).
- Task files, one question per line:
  ``{"id": ..., "input": "question", "output": [{"answer": "...", "provenance":
  [{"wikipedia_id": "290", "start_paragraph_id": 1, "end_paragraph_id": 1}]}]}``.
  The answers are the outputs' non-empty ``answer`` strings; the gold passages are the
  provenance pages (page unit) or their paragraphs from start to end that are in the corpus
  (paragraph unit). A test file without ``output`` gives questions with neither.

Other fields are ignored; every file is read one line at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from latentrag.core.types import Corpus, Example, Passage
from latentrag.data.readers import (
    DataError,
    FieldLog,
    Invalid,
    PathLike,
    check_unique,
    iter_jsonl,
    json_type,
    string_field,
)

Unit = Literal["paragraph", "page"]


def _wikipedia_id(obj: Mapping[str, Any]) -> str:
    value = obj["wikipedia_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return string_field(obj, "wikipedia_id")


def _paragraphs(page: Mapping[str, Any]) -> list[str]:
    text = page["text"]
    if not isinstance(text, list) or not all(isinstance(p, str) for p in text):
        raise Invalid("field 'text' must be a list of strings (the page's paragraphs)")
    return text


def _page_passages(page: Mapping[str, Any], unit: Unit) -> Iterator[Passage]:
    wid = _wikipedia_id(page)
    title = (
        string_field(page, "wikipedia_title", empty_ok=True) if "wikipedia_title" in page else ""
    )
    paragraphs = _paragraphs(page)
    if unit == "page":
        body = " ".join(p.strip() for p in paragraphs[1:] if p.strip())
        yield Passage(id=wid, text=body or title, title=title)
        return
    for i, paragraph in enumerate(paragraphs):
        text = paragraph.strip()
        if text and not text.startswith("Section::::") and (i or not title):
            yield Passage(id=f"{wid}#{i}", text=text, title=title)


def iter_kilt_passages(path: PathLike, unit: Unit = "paragraph") -> Iterator[Passage]:
    fields = FieldLog(path, ("wikipedia_id", "text"), ("wikipedia_title",))
    pages: dict[str, int] = {}
    for line, page in iter_jsonl(path):
        try:
            fields.check(page)
            check_unique(path, "page", _wikipedia_id(page), line, pages)
            yield from _page_passages(page, unit)
        except Invalid as err:
            raise DataError(path, str(err), line) from None
    fields.report()


def read_kilt_passages(path: PathLike, unit: Unit = "paragraph") -> Corpus:
    corpus = Corpus(iter_kilt_passages(path, unit))
    if not len(corpus):
        raise DataError(path, "no passages (the file is empty)")
    return corpus


def _provenance_ids(item: Any, corpus: Corpus, unit: Unit) -> list[str]:
    if not isinstance(item, dict) or "wikipedia_id" not in item:
        raise Invalid("each provenance must be an object with a 'wikipedia_id'")
    wid = _wikipedia_id(item)
    if unit == "page":
        ids = [wid]
    else:
        start, end = item.get("start_paragraph_id"), item.get("end_paragraph_id", None)
        if not isinstance(start, int):
            raise Invalid(f"provenance of page {wid}: 'start_paragraph_id' must be an integer")
        end = start if not isinstance(end, int) else end
        ids = [f"{wid}#{i}" for i in range(start, end + 1) if f"{wid}#{i}" in corpus]
    if not ids or ids[0] not in corpus:
        raise Invalid(f"provenance page {wid!r} (those paragraphs) is not in the corpus")
    return ids


def _outputs(obj: Mapping[str, Any], corpus: Corpus, unit: Unit) -> tuple[list[str], list[str]]:
    outputs = obj.get("output", [])
    if not isinstance(outputs, list):
        raise Invalid(f"field 'output' must be a list, got {json_type(outputs)}")
    answers: list[str] = []
    gold: list[str] = []
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise Invalid(f"output[{i}] must be an object, got {json_type(output)}")
        answer = output.get("answer")
        if isinstance(answer, str) and answer.strip() and answer not in answers:
            answers.append(answer)
        for item in output.get("provenance") or []:
            gold += [pid for pid in _provenance_ids(item, corpus, unit) if pid not in gold]
    return answers, gold


def read_kilt_questions(path: PathLike, corpus: Corpus, unit: Unit = "paragraph") -> list[Example]:
    """The questions of a KILT task file (see the module docstring)."""
    fields = FieldLog(path, ("id", "input"), ("output",))
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        try:
            fields.check(obj)
            answers, gold = _outputs(obj, corpus, unit)
            ident = string_field(obj, "id") if isinstance(obj["id"], str) else str(obj["id"])
            example = Example(ident, string_field(obj, "input"), tuple(answers), tuple(gold))
        except Invalid as err:
            raise DataError(path, str(err), line) from None
        check_unique(path, "example", example.id, line, seen)
        examples.append(example)
    if not examples:
        raise DataError(path, "no examples (the file is empty)")
    fields.report()
    return examples
