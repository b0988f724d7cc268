"""BEIR folders: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

- ``corpus.jsonl``: ``{"_id": "d1", "title": "...", "text": "..."}`` per line (``title``
  optional; ``text`` may be empty when the title is not, and then the title is the text);
- ``queries.jsonl``: ``{"_id": "q1", "text": "..."}`` per line;
- ``qrels/test.tsv`` (any ``<split>.tsv``): a header line ``query-id corpus-id score``, then
  one judgement per line, tab-separated; the score is an integer relevance grade.

Each split holds the queries its qrels judge, in the order they first appear there; a
passage with a grade above 0 is gold, with that grade (nDCG uses it); grade 0 is a judged
non-relevant passage, not gold. BEIR has no answers: only retrieval can be evaluated.
Other fields (``metadata``) are ignored. Every file is read one line at a time; errors
name the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from latentrag.core.types import Corpus, Example, Passage
from latentrag.data.readers import (
    DataError,
    FieldLog,
    Invalid,
    PathLike,
    check_unique,
    iter_jsonl,
    string_field,
)

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"


def iter_beir_corpus(path: PathLike) -> Iterator[Passage]:
    """The passages of a BEIR ``corpus.jsonl``, one line at a time."""
    fields = FieldLog(path, ("_id", "text"), ("title",))
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        try:
            fields.check(obj)
            title = string_field(obj, "title", empty_ok=True) if "title" in obj else ""
            text = string_field(obj, "text", empty_ok=bool(title.strip()))
            passage = Passage(id=string_field(obj, "_id"), text=text or title, title=title)
        except Invalid as err:
            raise DataError(path, str(err), line) from None
        check_unique(path, "passage", passage.id, line, seen)
        yield passage
    fields.report()


def read_beir_queries(path: PathLike) -> dict[str, str]:
    """Query id -> text from a BEIR ``queries.jsonl``."""
    fields = FieldLog(path, ("_id", "text"), ())
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        try:
            fields.check(obj)
            qid, text = string_field(obj, "_id"), string_field(obj, "text")
        except Invalid as err:
            raise DataError(path, str(err), line) from None
        check_unique(path, "query", qid, line, seen)
        queries[qid] = text
    fields.report()
    return queries


def _judgements(path: Path) -> Iterator[tuple[int, str, str, int]]:
    """(line, query id, passage id, grade) for each qrels line after the header."""
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8").strip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(path, f"invalid UTF-8 at byte {err.start}", line) from None
            if not text.strip():
                continue
            cells = text.split("\t")
            if line == 1 and cells[:2] == ["query-id", "corpus-id"]:
                continue
            if len(cells) != 3:
                raise DataError(
                    path,
                    f"expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"got {len(cells)}",
                    line,
                )
            try:
                grade = int(cells[2])
            except ValueError:
                raise DataError(path, f"score {cells[2]!r} is not an integer", line) from None
            yield line, cells[0], cells[1], grade


def read_qrels(path: Path, queries: dict[str, str], corpus: Corpus) -> list[Example]:
    """The examples one qrels file judges (see the module docstring)."""
    judged: dict[str, dict[str, int]] = {}
    for line, qid, pid, grade in _judgements(path):
        if qid not in queries:
            raise DataError(path, f"query id {qid!r} is not in {QUERIES_FILE}", line)
        if pid not in corpus:
            raise DataError(path, f"corpus id {pid!r} is not in {CORPUS_FILE}", line)
        grades = judged.setdefault(qid, {})
        if pid in grades:
            raise DataError(path, f"query {qid!r} judges passage {pid!r} twice", line)
        grades[pid] = grade
    if not judged:
        raise DataError(path, "no judgements (the file is empty)")
    examples = []
    for qid, grades in judged.items():
        gold = [(pid, grade) for pid, grade in grades.items() if grade > 0]
        examples.append(
            Example(
                id=qid,
                question=queries[qid],
                gold_ids=tuple(pid for pid, _ in gold),
                gold_grades=tuple(grade for _, grade in gold),
            )
        )
    return examples


def read_beir(folder: PathLike) -> tuple[Corpus, dict[str, list[Example]]]:
    """The corpus of a BEIR folder and one split per ``qrels/<split>.tsv``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder (a BEIR dataset is a folder)")
    corpus = Corpus(iter_beir_corpus(folder / CORPUS_FILE))
    if not len(corpus):
        raise DataError(folder / CORPUS_FILE, "no passages (the file is empty)")
    queries = read_beir_queries(folder / QUERIES_FILE)
    qrels = sorted((folder / QRELS_DIR).glob("*.tsv"))
    if not qrels:
        raise DataError(folder / QRELS_DIR, "no <split>.tsv qrels files")
    return corpus, {path.stem: read_qrels(path, queries, corpus) for path in qrels}
