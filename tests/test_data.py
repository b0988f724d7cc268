"""Tests for latentrag.data.readers (readers, writer) and the shipped SQuAD slice."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentrag.core.errors import LatentragError
from latentrag.core.types import Corpus, Example, Passage
from latentrag.data import load_squad_slice, squad_slice_dir
from latentrag.data.readers import (
    DataError,
    check_gold_ids,
    read_examples_jsonl,
    read_passages_jsonl,
    read_squad,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_squad_slice.py"
SOURCE = REPO.parent / "shared" / "data" / "squad-v1.1-dev.json"
SLICE_FILES = ("passages.jsonl", "train.jsonl", "dev.jsonl", "test.jsonl", "NOTICE",
               "manifest.json")

PASSAGE = {"id": "p1", "title": "T", "text": "some text"}
EXAMPLE = {"id": "q1", "question": "what?", "answers": ["that"], "gold_ids": ["p1"]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def dumps(obj: object) -> str:
    return json.dumps(obj)


def assert_error(err: pytest.ExceptionInfo[DataError], path: Path, line: int | None,
                 *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    assert err.value.path == str(path)
    assert err.value.line == line
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert text.startswith(prefix), text
    assert path.name in text
    for word in words:
        assert word in text, text


# ---------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path: Path) -> None:
    passages = [Passage("a", "text a", "Title A"), Passage("b", "tëxt \u2028 b\n", "")]
    examples = [Example("q1", "who?", ("x", "y"), ("a",)), Example("q2", "why?", ("z",))]
    write_jsonl(tmp_path / "p.jsonl", passages)
    write_jsonl(tmp_path / "e.jsonl", examples)
    corpus = read_passages_jsonl(tmp_path / "p.jsonl")
    assert list(corpus) == passages
    assert read_examples_jsonl(tmp_path / "e.jsonl") == examples
    assert (tmp_path / "p.jsonl").read_bytes().count(b"\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "p.jsonl"]  # no temp left


def test_write_is_deterministic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"id": "1", "text": "old"}])
    write_jsonl(path, [PASSAGE])
    first = path.read_bytes()
    write_jsonl(path, [PASSAGE])
    assert path.read_bytes() == first == (dumps(PASSAGE) + "\n").encode()


def test_optional_fields_and_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ["", dumps({"id": "a", "text": "t"}), "   "])
    assert read_passages_jsonl(path)[0] == Passage("a", "t", "")
    path = write_lines(tmp_path / "e.jsonl", [dumps({"id": "q", "question": "?",
                                                     "answers": ["a"]})])
    assert read_examples_jsonl(path)[0].gold_ids == ()


def test_unknown_fields_are_ignored_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [{**EXAMPLE, "id": f"q{i}", "meta": {"i": i}, "type": "bridge"} for i in range(3)]
    records[1]["candidate_ids"] = ["p1", "p2"]
    del records[2]["answers"]
    path = write_lines(tmp_path / "e.jsonl", [dumps(r) for r in records])
    with caplog.at_level("INFO", logger="latentrag.data"):
        examples = read_examples_jsonl(path)
    assert [e.candidate_ids for e in examples] == [(), ("p1", "p2"), ()]
    assert examples[2].answers == ()
    with pytest.raises(LatentragError, match="'q2' has no answers.*generator needs them"):
        _ = examples[2].target
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"{path}: ignored fields: meta, type"]
    near = write_lines(tmp_path / "n.jsonl", [dumps({"id": "q", "question": "?", "answer": "x"})])
    caplog.clear()
    assert read_examples_jsonl(near)[0].answers == ()  # HotpotQA's own "answer": ignored...
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{near}: ignored field 'answer' (did you mean 'answers'?)"]  # ...said
    passages = write_lines(tmp_path / "p.jsonl", [dumps({**PASSAGE, "score": 1})])
    assert read_passages_jsonl(passages)[0] == Passage("p1", "some text", "T")


# ---------------------------------------------------------------------------- bad inputs

BAD_EXAMPLES = [
    # (lines, bad line, words in the message)
    ([dumps(EXAMPLE), '{"id": "q2", "question": '], 2, ["malformed JSON"]),
    ([dumps(EXAMPLE), "", "[1, 2]"], 3, ["JSON object", "array"]),
    ([dumps({k: v for k, v in EXAMPLE.items() if k != "question"})], 1,
     ["missing field 'question'"]),
    ([dumps(EXAMPLE), dumps({**EXAMPLE, "id": "q2", "answers": "that"})], 2,
     ["'answers'", "list of strings"]),
    ([dumps({**EXAMPLE, "answers": ["a", 3]})], 1, ["'answers'[1]", "string"]),
    ([dumps({**EXAMPLE, "id": 7})], 1, ["'id'", "string"]),
    ([dumps(EXAMPLE), dumps({**EXAMPLE, "id": "q2", "answers": []})], 2,
     ["'answers'", "empty"]),
    ([dumps({**EXAMPLE, "question": "  "})], 1, ["'question'", "empty"]),
    ([dumps(EXAMPLE), dumps({"id": "q2", "questoin": "?", "answers": ["x"]})], 2,
     ["missing field 'question'", "found 'questoin'", "did you mean 'question'"]),
    ([dumps({**EXAMPLE, "gold_grades": [1, 2]})], 1, ["'gold_grades'", "2 grades for 1"]),
    ([dumps({**EXAMPLE, "candidate_ids": "p1"})], 1, ["'candidate_ids'", "list of strings"]),
    ([dumps(EXAMPLE), "", dumps({**EXAMPLE, "question": "again?"})], 3,
     ["duplicate", "'q1'", "lines 1 and 3"]),
    (['{"id": "q1", "id": "q2", "question": "?", "answers": ["a"]}'], 1, ["duplicate key"]),
    (["[" * 100_000], 1, ["malformed JSON"]),
]


@pytest.mark.parametrize(("lines", "line", "words"), BAD_EXAMPLES)
def test_bad_examples(tmp_path: Path, lines: list[str], line: int, words: list[str]) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_examples_jsonl(path)
    assert_error(err, path, line, *words)


BAD_PASSAGES = [
    ([dumps(PASSAGE), "{not json"], 2, ["malformed JSON"]),
    ([dumps({"id": "a", "title": "T"})], 1, ["missing field 'text'"]),
    ([dumps(PASSAGE), dumps({"id": "b", "text": ["x"]})], 2, ["'text'", "string", "array"]),
    ([dumps({**PASSAGE, "title": None})], 1, ["'title'", "null"]),
    ([dumps(PASSAGE), dumps(PASSAGE)], 2, ["duplicate passage id 'p1'", "lines 1 and 2"]),
]


@pytest.mark.parametrize(("lines", "line", "words"), BAD_PASSAGES)
def test_bad_passages(tmp_path: Path, lines: list[str], line: int, words: list[str]) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_passages_jsonl(path)
    assert_error(err, path, line, *words)


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(dumps(PASSAGE).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(DataError) as err:
        read_passages_jsonl(path)
    assert_error(err, path, 2, "UTF-8")


@pytest.mark.parametrize(("reader", "what"), [(read_passages_jsonl, "no passages"),
                                              (read_examples_jsonl, "no examples")])
def test_empty_file(tmp_path: Path, reader, what: str) -> None:
    for content in ("", "\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError) as err:
            reader(path)
        assert_error(err, path, None, what)


def test_gold_id_absent(tmp_path: Path) -> None:
    corpus = Corpus([Passage("p1", "text")])
    records = [EXAMPLE, {**EXAMPLE, "id": "q2"}, {**EXAMPLE, "id": "q3", "gold_ids": ["p9"]}]
    path = write_lines(tmp_path / "ex.jsonl", [dumps(r) for r in records])
    examples = read_examples_jsonl(path)
    check_gold_ids(examples[:2], corpus, path)
    with pytest.raises(DataError) as err:
        check_gold_ids(examples, corpus, path)
    assert_error(err, path, 3, "'q3'", "'p9'", "not in the corpus")


def test_data_error_is_value_error_one_line() -> None:
    err = DataError("f.jsonl", "two\nlines", 4)
    assert isinstance(err, ValueError)
    assert str(err) == "f.jsonl:4: two lines"
    assert (err.path, err.line, err.message) == ("f.jsonl", 4, "two lines")
    assert str(DataError("f.json", "bad")) == "f.json: bad"


# ---------------------------------------------------------------------------- SQuAD

SQUAD = {"version": "1.1", "data": [{"title": "A_b", "paragraphs": [
    {"context": "ctx zero", "qas": [{"id": "x", "question": "q?", "answers": [
        {"text": "ans", "answer_start": 0}, {"text": "ans", "answer_start": 0},
        {"text": "other", "answer_start": 1}]}]},
    {"context": "ctx one", "qas": [{"id": "y", "question": "r?", "answers": [
        {"text": "b", "answer_start": 0}]}]},
]}]}


def test_read_squad(tmp_path: Path) -> None:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD))
    corpus, examples = read_squad(path)
    assert list(corpus) == [Passage("A_b#0", "ctx zero", "A b"), Passage("A_b#1", "ctx one", "A b")]
    assert examples == [Example("x", "q?", ("ans", "other"), ("A_b#0",)),
                        Example("y", "r?", ("b",), ("A_b#1",))]


def test_read_squad_errors(tmp_path: Path) -> None:
    path = tmp_path / "squad.json"
    path.write_text('{"data": [\n  {"title": "x",,}]}')
    with pytest.raises(DataError) as err:
        read_squad(path)
    assert_error(err, path, 2, "malformed JSON")
    bad = json.loads(json.dumps(SQUAD))
    del bad["data"][0]["paragraphs"][1]["qas"][0]["question"]
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError) as err:
        read_squad(path)
    assert_error(err, path, 1, "data[0].paragraphs[1].qas[0]", "missing field 'question'")
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match="no passages"):
        read_squad(path)


# ---------------------------------------------------------------------------- shipped slice


def test_shipped_slice() -> None:
    splits = {name: load_squad_slice(name) for name in ("train", "dev", "test")}
    corpus = splits["train"][0]
    assert len(corpus) == 300
    ids = [{e.id for e in examples} for _, examples in splits.values()]
    assert all(ids) and sum(len(s) for s in ids) == len(set().union(*ids))
    for split_corpus, examples in splits.values():
        assert split_corpus.fingerprint() == corpus.fingerprint()
        assert all(g in corpus for e in examples for g in e.gold_ids)
    assert len({p.id.rsplit("#", 1)[0] for p in corpus}) == 48
    assert all(len(p.text.split()) <= 120 for p in corpus)
    manifest = json.loads((squad_slice_dir() / "manifest.json").read_text())
    assert manifest["counts"]["passages"] == 300
    assert "CC BY-SA 4.0" in (squad_slice_dir() / "NOTICE").read_text()


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="train, dev, test"):
        load_squad_slice("validation")


def load_script():
    spec = importlib.util.spec_from_file_location("make_squad_slice", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SOURCE.is_file(), reason=f"source {SOURCE} is absent")
def test_rebuild_slice_is_byte_identical(tmp_path: Path) -> None:
    assert load_script().main(["--source", str(SOURCE), "--out", str(tmp_path)]) == 0
    for name in SLICE_FILES:
        assert (tmp_path / name).read_bytes() == (squad_slice_dir() / name).read_bytes(), name


def test_script_refuses_wrong_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps(SQUAD))
    assert load_script().main(["--source", str(fake), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err
    assert not (tmp_path / "out").exists()


def test_data_module_does_not_import_torch() -> None:
    code = ("import sys, latentrag.core.types; before = 'torch' in sys.modules; "
            "import latentrag.data.readers; print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("the latentrag package itself imports torch")
    assert out == ["False", "False"]


# ---------------------------------------------------------------------------- property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("id", "title", "text", "question", "answers", "gold_ids")
records = st.fixed_dictionaries(
    {}, optional={k: json_values | st.text() | st.lists(st.text(), max_size=3) for k in FIELDS}
) | st.dictionaries(st.sampled_from((*FIELDS, "extra")), json_values, max_size=5)
junk_line = st.one_of(
    st.text(max_size=40).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=40),
    json_values.map(lambda v: json.dumps(v).encode()),
    records.map(lambda r: json.dumps(r).encode()),
    records.map(lambda r: json.dumps(r).encode()[:-1]),  # truncated
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(junk_line, max_size=6))
def test_junk_parses_or_raises_data_error(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"\n".join(lines))
    for reader in (read_examples_jsonl, read_passages_jsonl):
        try:
            reader(path)
        except DataError as err:
            assert "\n" not in str(err) and str(err).startswith(str(path))
