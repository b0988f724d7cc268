"""Every `[data] format` reads its 3-passage fixture (tests/fixtures/formats/) into the same
two questions, and the retrieval metrics over a fixed ranking equal hand-computed values.

The fixtures: passages P1 "Alpha is a river...", P2 "Beta is a city...", P3 "Gamma joins...";
question 1 has gold P1 (grade 2 where the format has grades) and P3 (grade 1), question 2
has gold P2 (SQuAD: one gold paragraph per question, P1 and P2). The ranking: question 1
gets P3, P2, P1; question 2 gets P1, P2, P3.

By hand, at k = 1, 2 (d = 1/log2(3), the discount of rank 2):
- question 1: hit@1 = hit@2 = 1; recall@1 = recall@2 = 1/2 (P3 of P1, P3); all@2 = 0;
  MRR = 1; nDCG@2 = 1/(2 + d) graded (DCG: P3's grade 1 at rank 1; ideal: 2 then 1),
  1/(1 + d) binary;
- question 2: hit@1 = 0, hit@2 = 1; recall@1 = 0, recall@2 = 1; all@1 = 0, all@2 = 1;
  MRR = 1/2; nDCG@2 = d.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from latentrag.core.config import DataConfig, EvalConfig
from latentrag.core.types import Candidates
from latentrag.data.dataset import load_dataset
from latentrag.data.readers import DataError
from latentrag.evaluation.measure import measure

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
Q1, Q2 = "Where does the Alpha river flow?", "What is Beta?"
ORDER = {Q1: ["P3", "P2", "P1"], Q2: ["P1", "P2", "P3"]}
D = 1 / math.log2(3)
TWO_GOLD = {
    "hit@1": 0.5, "hit@2": 1.0, "recall@1": 0.25, "recall@2": 0.75, "all@1": 0.0, "all@2": 0.5,
    "mrr@10": (1 + 0.5) / 2,
}  # fmt: skip
GRADED = {**TWO_GOLD, "ndcg@2": (1 / (2 + D) + D) / 2}
BINARY = {**TWO_GOLD, "ndcg@2": (1 / (1 + D) + D) / 2}
# SQuAD: question 1's only gold P1 is at rank 3; question 2's P2 at rank 2
ONE_GOLD = {
    "hit@1": 0.0, "hit@2": 0.5, "recall@1": 0.0, "recall@2": 0.5, "all@1": 0.0, "all@2": 0.5,
    "mrr@10": (1 / 3 + 1 / 2) / 2, "ndcg@2": D / 2,
}  # fmt: skip
SETTINGS = EvalConfig(
    recall_at=[1, 2], ndcg_at=[2], metrics=["hit", "recall", "all", "ndcg", "mrr"]
)

CASES = {
    "latentrag": ({"corpus": "latentrag/passages.jsonl", "dev": "latentrag/dev.jsonl"}, GRADED),
    "beir": ({"path": "beir"}, GRADED),
    "dpr": ({"corpus": "dpr/psgs.tsv", "dev": "dpr/dev.json"}, BINARY),
    "kilt": ({"corpus": "kilt/knowledgesource.jsonl", "dev": "kilt/dev.jsonl"}, BINARY),
    "squad": ({"dev": "squad/dev.json"}, ONE_GOLD),
    "hf": (
        {
            "corpus": "hf/passages",
            "dev": "hf/dev.parquet",
            "fields": {
                "passage_id": "doc_id",
                "text": "content",
                "id": "qid",
                "question": "query",
                "answers": "answers.text",
                "gold_ids": "positives",
                "gold_grades": "grades",
            },
        },
        GRADED,
    ),  # fmt: skip
}


class FixedPipeline:
    """Ranks the fixture's passages (named by their text's first word) in ORDER."""

    generator = None

    def __init__(self, corpus) -> None:
        self.corpus = corpus
        self.row = {f"P{'ABG'.index(p.text[0]) + 1}": i for i, p in enumerate(corpus)}

    def retrieve(self, questions, k):
        rows = torch.tensor([[self.row[name] for name in ORDER[q][:k]] for q in questions])
        return Candidates(rows, -torch.arange(k, dtype=torch.float).expand(len(questions), -1))


def load(fmt: str, **extra):
    options, _ = CASES[fmt]
    return load_dataset(DataConfig(format=fmt, **options, **extra), base=FIXTURES)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_fixture_loads_and_metrics_equal_hand_computed(fmt):
    if fmt == "hf":
        pytest.importorskip("pyarrow")
    dataset = load(fmt)
    assert len(dataset.corpus) == 3
    questions = dataset.split("test" if fmt == "beir" else "dev")
    assert [q.question for q in questions] == [Q1, Q2]
    metrics = measure(FixedPipeline(dataset.corpus), questions, SETTINGS)
    assert metrics == pytest.approx(CASES[fmt][1])


def test_what_each_format_carries():
    beir = load("beir")
    first = beir.split("test")[0]
    assert (first.gold_ids, first.gold_grades, first.answers) == (("d1", "d3"), (2, 1), ())
    assert [q.id for q in beir.split("test")] == ["q1", "q2"]  # q3 is judged by no qrels line
    assert beir.split("test")[1].gold_ids == ("d2",)  # d3's grade 0: judged, not gold
    dpr = load("dpr").split("dev")
    assert [(q.id, q.answers, q.gold_ids) for q in dpr] == [
        ("dev-0", ("the north",), ("1", "3")),
        ("dev-1", ("a city",), ("2",)),
    ]
    kilt = load("kilt")
    assert kilt.corpus.ids == ["10#1", "10#3", "20#1"]  # title and section lines skipped
    assert kilt.split("dev")[0].answers == ("the north", "north")
    pages = load("kilt", unit="page")
    assert pages.corpus.ids == ["10", "20"] and pages.split("dev")[0].gold_ids == ("10", "20")
    latentrag = load("latentrag").split("dev")
    assert latentrag[1].answers == ()  # retrieval-only question


def test_hf_mapping_and_ignored_columns(caplog):
    pytest.importorskip("pyarrow")
    with caplog.at_level("INFO", logger="latentrag.data"):
        dataset = load("hf")
    assert dataset.corpus[0].id == "1" and dataset.corpus[0].title == "Alpha"  # int ids: strings
    first, second = dataset.split("dev")
    assert (first.answers, first.gold_ids, first.gold_grades) == (
        ("the north",),
        ("1", "3"),
        (2, 1),
    )
    assert second.answers == ()  # an empty answers list: none
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored columns: lang" in logged and "ignored columns: answers, source" not in logged
    assert "source" in logged


def test_hf_mapping_to_a_missing_column_is_one_line():
    pytest.importorskip("pyarrow")
    options, _ = CASES["hf"]
    fields = {**options["fields"], "question": "querry"}
    config = DataConfig(format="hf", **{**options, "fields": fields})
    with pytest.raises(
        DataError, match=r"dev\.parquet:1: no column 'querry' \(data\.fields\.question\)"
    ):
        load_dataset(config, base=FIXTURES)


BAD = [
    ("beir", "beir/qrels/test.tsv", "q1\td9\t1\n", 2, "corpus id 'd9' is not in corpus.jsonl"),
    ("beir", "beir/qrels/test.tsv", "q1\td1\n", 2, "expected 3 tab-separated columns"),
    ("beir", "beir/qrels/test.tsv", "q1\td1\tx\n", 2, "score 'x' is not an integer"),
    ("beir", "beir/corpus.jsonl", '{"_id": "d1"}\n', 1, "missing field 'text'"),
    ("dpr", "dpr/psgs.tsv", "1\tonly two\n", 2, "expected 3 columns"),
    ("dpr", "dpr/dev.json", '[{"question": "q", "positive_ctxs": [{"passage_id": "9"}]}]', 1,
     "positive passage '9' is not in the corpus"),
    ("dpr", "dpr/dev.json", '[\n{"question": "q"},\n{"questoin": "q"}]', 3,
     "missing field 'question' (found 'questoin': did you mean 'question'?)"),
    ("dpr", "dpr/dev.json", '[\n{"question": "q"},\n{"answers": ["a"]}]', 3,
     "missing field 'question'"),
    ("kilt", "kilt/dev.jsonl", '{"id": "k", "input": "q", "output": [{"provenance": '
     '[{"wikipedia_id": "99", "start_paragraph_id": 1}]}]}\n', 1, "page '99'"),
    ("squad", "squad/dev.json", '{"data": [\n{"title": "x", "paragraphs": [{"context": 3}]}]}', 2,
     "must be a JSON string"),
    ("latentrag", "latentrag/dev.jsonl", '{"id": "q", "question": "?", "candidate_ids": ["p9"]}\n',
     1, "candidate id 'p9' is not in the corpus"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "name", "bad", "line", "words"), BAD)
def test_bad_files_name_file_and_line(tmp_path, fmt, name, bad, line, words):
    import shutil

    shutil.copytree(FIXTURES / fmt, tmp_path / fmt)
    target = tmp_path / name
    if target.suffix in (".tsv",) and fmt == "beir":
        bad = "query-id\tcorpus-id\tscore\n" + bad  # header on line 1
    elif target.suffix == ".tsv":
        bad = "id\ttext\ttitle\n" + bad
    target.write_text(bad)
    options, _ = CASES[fmt]
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(format=fmt, **options), base=tmp_path)
    assert str(err.value).startswith(f"{target}:{line}: "), str(err.value)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_generator_needs_answers_a_file_and_line_says_which():
    dataset = load("latentrag")
    dataset.require_answers("train")  # absent: nothing to check
    with pytest.raises(DataError) as err:
        dataset.require_answers("dev")
    path = FIXTURES / "latentrag" / "dev.jsonl"
    assert str(err.value).startswith(f"{path}:2: missing field 'answers' (question 'q2' has none")
