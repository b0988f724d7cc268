"""Hugging Face tables: a dataset saved with ``Dataset.save_to_disk`` or parquet files.

Read with pyarrow alone (``pip install 'latentrag[hf]'``), one record batch at a time; the
`datasets` library is not needed (it would pull pandas and more to read the same Arrow
files). A path is a ``.parquet`` or ``.arrow`` file, a folder written by ``save_to_disk``
(its ``state.json`` lists the Arrow files) or a folder of parquet files. For a saved
``DatasetDict``, name each split's folder (``train = "squad_dd/train"``).

Columns map to latentrag's fields through ``[data] fields`` (our name = column name;
a dotted column name reaches into structs and lists of structs, e.g. SQuAD's
``answers = "answers.text"``). Passages: ``passage_id`` (default column ``id``), ``text``,
``title``; questions: ``id``, ``question``, ``answers``, ``gold_ids``, ``gold_grades``,
``candidate_ids`` (defaults: the same names). Integer ids become strings. The checks are
those of the JSONL formats (`latentrag.data.readers`); errors name the file and the row
(1-based) as ``file:row``. Columns no field maps to are ignored (listed once, INFO log).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from latentrag.core.errors import ConfigError
from latentrag.core.types import Corpus, Example, Passage
from latentrag.data.readers import (
    EXAMPLE_FIELDS,
    PASSAGE_FIELDS,
    DataError,
    FieldLog,
    Invalid,
    PathLike,
    check_unique,
    example_record,
    passage_record,
)

log = logging.getLogger("latentrag.data")

BATCH_ROWS = 1024
PASSAGE_KEYS = {"passage_id": "id", "text": "text", "title": "title"}
EXAMPLE_KEYS = {name: name for group in EXAMPLE_FIELDS for name in group}
FIELD_NAMES = tuple(PASSAGE_KEYS) + tuple(k for k in EXAMPLE_KEYS if k not in PASSAGE_KEYS)
_MISSING = object()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "data.format = 'hf' reads Arrow and parquet files with pyarrow: "
            "pip install 'latentrag[hf]'"
        ) from None
    return pyarrow


def table_files(path: PathLike) -> list[Path]:
    """The Arrow or parquet files a path stands for (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(2, "no such file", str(path))
    if (path / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir()))
        raise DataError(path, f"a saved DatasetDict: name one split's folder ({splits})")
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text("utf-8"))
        return [path / f["filename"] for f in state.get("_data_files", [])]
    files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(path, "no .parquet or .arrow files here")
    return files


def _batches(file: Path) -> Iterator[Any]:
    pa = _pyarrow()
    if file.suffix == ".parquet":
        yield from pa.parquet.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS)
        return
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))  # save_to_disk's format
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(file)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def iter_rows(path: PathLike) -> Iterator[tuple[Path, int, dict[str, Any], list[str]]]:
    """(file, 1-based row in it, record, column names) for every row, a batch at a time."""
    pa = _pyarrow()
    for file in table_files(path):
        row = 0
        try:
            for batch in _batches(file):
                names = batch.schema.names
                for record in batch.to_pylist():
                    row += 1
                    yield file, row, record, names
        except (pa.ArrowException, OSError) as err:
            message = " ".join(str(err).split())
            raise DataError(file, f"unreadable Arrow/parquet data: {message}", row + 1) from None


def _lookup(record: Any, dotted: str) -> Any:
    """The value at a dotted column path; structs by key, lists of structs element-wise."""
    value = record
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = [v.get(part) for v in value]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _as_text_ids(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list):
        return [_as_text_ids(v) for v in value]
    return value


class _Mapping:
    """Picks and renames a table's columns into one record of latentrag's fields."""

    def __init__(self, defaults: dict[str, str], fields: Mapping[str, str], path: PathLike):
        self.columns = {ours: fields.get(ours, column) for ours, column in defaults.items()}
        self.explicit = {ours for ours in defaults if ours in fields}
        self.path = path
        self.ignored: set[str] = set()

    def record(self, row: dict[str, Any], names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ours, column in self.columns.items():
            value = _lookup(row, column)
            if value is _MISSING:
                if ours in self.explicit:
                    raise Invalid(f"no column {column!r} (data.fields.{ours})")
                continue
            if value is None or (value == [] and ours in ("answers", "candidate_ids")):
                continue  # a null cell or no answers: the field is absent in this row
            key = "id" if ours == "passage_id" else ours
            ids = key in ("id", "gold_ids", "candidate_ids")
            out[key] = _as_text_ids(value) if ids else value
        used = {c.split(".")[0] for c in self.columns.values()}
        self.ignored.update(n for n in names if n not in used)
        return out

    def report(self) -> None:
        if self.ignored:
            log.info("%s: ignored columns: %s", self.path, ", ".join(sorted(self.ignored)))


def read_hf_passages(path: PathLike, fields: Mapping[str, str]) -> Corpus:
    mapping = _Mapping(PASSAGE_KEYS, fields, path)
    checks = FieldLog(path, *PASSAGE_FIELDS)
    seen: dict[str, int] = {}
    passages: list[Passage] = []
    for file, row, record, names in iter_rows(path):
        try:
            passage = passage_record(mapping.record(record, names), checks)
        except Invalid as err:
            raise DataError(file, str(err), row) from None
        check_unique(file, "passage", passage.id, row, seen)
        passages.append(passage)
    if not passages:
        raise DataError(path, "no passages (the table is empty)")
    mapping.report()
    return Corpus(passages)


def read_hf_questions(path: PathLike, fields: Mapping[str, str], corpus: Corpus) -> list[Example]:
    """The questions of a table, gold and candidate ids checked against `corpus`."""
    mapping = _Mapping(EXAMPLE_KEYS, fields, path)
    checks = FieldLog(path, *EXAMPLE_FIELDS)
    seen: dict[str, int] = {}
    examples: list[Example] = []
    for file, row, record, names in iter_rows(path):
        try:
            example = example_record(mapping.record(record, names), checks)
            missing = [p for p in (*example.gold_ids, *example.candidate_ids) if p not in corpus]
            if missing:
                raise Invalid(
                    f"example {example.id!r}: passage id {missing[0]!r} is not in the corpus"
                )
        except Invalid as err:
            raise DataError(file, str(err), row) from None
        check_unique(file, "example", example.id, row, seen)
        examples.append(example)
    if not examples:
        raise DataError(path, "no examples (the table is empty)")
    mapping.report()
    return examples
