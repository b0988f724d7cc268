"""SQuAD v1.1 JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``).

Paragraph ``j`` of the article titled ``T`` becomes the passage with id ``f"{T}#{j}"``
(``T`` is SQuAD's title slug, e.g. ``Super_Bowl_50#0``) and title ``T`` with underscores as
spaces; each question becomes an `Example` whose answers are the distinct answer texts in
annotation order and whose gold id is its paragraph's id. Extra SQuAD fields (``version``,
``answer_start``, ...) are ignored. The ``data`` array is read one article at a time
(`latentrag.data.json_stream`); errors name the file and the line where the article starts.

With ``[data] format = "squad"``, each split is a SQuAD file and the corpus is the union of
their paragraphs (`read_squad_splits`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from latentrag.core.types import Corpus, Example, Passage
from latentrag.data.json_stream import iter_array
from latentrag.data.readers import JSON_TYPES, DataError, Invalid, PathLike, json_type


def _require(obj: Any, where: str, fields: dict[str, type]) -> None:
    if not isinstance(obj, dict):
        raise Invalid(f"{where}: expected a JSON object, got {json_type(obj)}")
    for key, kind in fields.items():
        if key not in obj:
            raise Invalid(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], kind):
            wanted, got = JSON_TYPES[kind], json_type(obj[key])
            raise Invalid(f"{where}: field {key!r} must be a JSON {wanted}, got {got}")


def _answers(qa: dict[str, Any], where: str) -> tuple[str, ...]:
    texts: list[str] = []
    for i, answer in enumerate(qa["answers"]):
        _require(answer, f"{where}.answers[{i}]", {"text": str})
        if answer["text"].strip() and answer["text"] not in texts:
            texts.append(answer["text"])
    if not texts:
        raise Invalid(f"{where}: no answers")
    return tuple(texts)


def _question(qa: Any, where: str, pid: str) -> Example:
    _require(qa, where, {"id": str, "question": str, "answers": list})
    if not qa["id"].strip():
        raise Invalid(f"{where}: field 'id' must not be empty")
    if not qa["question"].strip():
        raise Invalid(f"{where}: field 'question' must not be empty")
    return Example(
        id=qa["id"], question=qa["question"], answers=_answers(qa, where), gold_ids=(pid,)
    )


def _article(article: Any, where: str) -> Iterator[Passage | Example]:
    _require(article, where, {"title": str, "paragraphs": list})
    slug = article["title"]
    for j, paragraph in enumerate(article["paragraphs"]):
        pwhere = f"{where}.paragraphs[{j}]"
        _require(paragraph, pwhere, {"context": str, "qas": list})
        pid = f"{slug}#{j}"
        yield Passage(id=pid, text=paragraph["context"], title=slug.replace("_", " "))
        for k, qa in enumerate(paragraph["qas"]):
            yield _question(qa, f"{pwhere}.qas[{k}]", pid)


def iter_squad(path: PathLike) -> Iterator[tuple[int, Passage | Example]]:
    """(line of the article, passage or example) in file order, one article in memory."""
    for i, (line, article) in enumerate(iter_array(path, "data")):
        try:
            items = list(_article(article, f"data[{i}]"))
        except Invalid as err:
            raise DataError(path, str(err), line) from None
        for item in items:
            yield line, item


def _add_unique(path: PathLike, kind: str, ident: str, line: int, seen: dict[str, int]) -> None:
    if ident in seen:
        raise DataError(path, f"duplicate {kind} id {ident!r}", line)
    seen[ident] = line


def read_squad(path: PathLike) -> tuple[Corpus, list[Example]]:
    """Read a SQuAD v1.1 JSON file into (corpus of paragraphs, examples)."""
    passages: list[Passage] = []
    examples: list[Example] = []
    seen: dict[str, dict[str, int]] = {"passage": {}, "question": {}}
    for line, item in iter_squad(path):
        if isinstance(item, Passage):
            _add_unique(path, "passage", item.id, line, seen["passage"])
            passages.append(item)
        else:
            _add_unique(path, "question", item.id, line, seen["question"])
            examples.append(item)
    if not passages:
        raise DataError(path, "no passages (field 'data' has no paragraphs)")
    if not examples:
        raise DataError(path, "no examples (no paragraph has questions)")
    return Corpus(passages), examples


def read_squad_splits(paths: Mapping[str, PathLike]) -> tuple[Corpus, dict[str, list[Example]]]:
    """The paragraphs of every split's SQuAD file as one corpus, and each split's questions.

    A paragraph id found in two files must have the same text in both."""
    passages: dict[str, Passage] = {}
    splits: dict[str, list[Example]] = {}
    for name, path in paths.items():
        corpus, splits[name] = read_squad(path)
        for passage in corpus:
            known = passages.setdefault(passage.id, passage)
            if known != passage:
                raise DataError(path, f"paragraph {passage.id!r} differs from another split's")
    return Corpus(passages.values()), splits
