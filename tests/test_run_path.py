"""One run path: `measure` retrieves each question once and answers it at most once; a
training run measures once before and once after (the trainer's final evaluation);
`latentrag evaluate` reports the configured metrics only; a bad demo writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import EvalConfig
from latentrag.core.errors import LatentragError
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Candidates, Corpus, Example, Passage
from latentrag.evaluation.measure import measure

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = Corpus([Passage(f"p{i}", f"text {i}") for i in range(4)])


class Echo:
    """Answers with the first passage it is shown; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def generate(self, queries, passages, max_new_tokens=16):
        self.asked.append(list(queries))
        return [row[0] for row in passages]


class FixedPipeline:
    """Ranks the corpus in a fixed order per question; records each retrieve call."""

    corpus = CORPUS

    def __init__(self, rankings: dict[str, list[int]]) -> None:
        self.rankings = rankings
        self.generator = Echo()
        self.calls: list[tuple[list[str], int]] = []

    def retrieve(self, questions, k):
        self.calls.append((list(questions), k))
        rows = torch.tensor([self.rankings[q][:k] for q in questions])
        return Candidates(rows, -torch.arange(k, dtype=torch.float).expand(len(questions), -1))


def test_measure_retrieves_once_and_answers_from_the_same_ranking():
    pipeline = FixedPipeline({"a": [1, 0, 2, 3], "b": [2, 0, 1, 3], "c": [3, 2, 1, 0]})
    examples = [
        Example("1", "a", ("Text 1!",), ("p1",)),  # gold at rank 1; answer exact
        Example("2", "b", ("text 9", "other"), ("p0",)),  # gold at rank 2; F1 1/2
        Example("3", "c", ("text 3",)),  # no gold ids: answered, not in recall
    ]
    settings = EvalConfig(recall_at=[1, 3], passages=2, metrics=["recall", "mrr"])
    metrics = measure(pipeline, examples, settings, qa=True, batch_size=2)
    assert metrics == pytest.approx(
        {"recall@1": 0.5, "recall@3": 1.0, "mrr@10": 0.75, "em": 2 / 3, "f1": (1 + 0.5 + 1) / 3}
        | {"sub_em": 2 / 3}  # "text 9" is not in the answer "text 2"
    )
    # one retrieve per batch of questions, deep enough for every metric (clipped to 4)
    assert pipeline.calls == [(["a", "b"], 4), (["c"], 4)]
    assert pipeline.generator.asked == [["a", "b", "c"]]


def test_measure_without_qa_answers_nothing_and_qa_questions_limits_the_answers():
    pipeline = FixedPipeline({"a": [1, 0, 2, 3], "b": [2, 0, 1, 3]})
    examples = [Example("1", "a", ("text 1",), ("p1",)), Example("2", "b", ("x",))]
    settings = EvalConfig(recall_at=[1], metrics=["recall", "mrr"])
    assert measure(pipeline, examples, settings) == {"recall@1": 1.0, "mrr@10": 1.0}
    assert pipeline.calls == [(["a"], 4)] and pipeline.generator.asked == []
    limited = measure(pipeline, examples, settings, qa=True, qa_questions=1)
    assert limited == {"recall@1": 1.0, "mrr@10": 1.0, "em": 1.0, "f1": 1.0, "sub_em": 1.0}
    assert pipeline.generator.asked == [["a"]]
    pipeline.generator = None  # nothing to answer with: retrieval metrics only
    assert set(measure(pipeline, examples, settings, qa=True)) == {"recall@1", "mrr@10"}


TOY_RUN = """\
[data]
source = "toy"
[retriever]
name = "bow"
dim = 16
buckets = 256
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
name = "topk"
k = 3
[train]
steps = 2
batch_size = 4
eval_every = 1
eval_qa = {eval_qa}
[eval]
recall_at = [1, 3]
metrics = ["recall", "mrr"]
max_new_tokens = 2
"""


@pytest.fixture
def counted(monkeypatch) -> dict[str, list[int]]:
    """Questions passed to each built pipeline's `retrieve` and its generator's `generate`,
    one entry per call."""
    calls: dict[str, list[int]] = {"retrieve": [], "generate": [], "depth": []}
    build = Pipeline.from_config.__func__

    def from_config(cls, *args, **kwargs):
        pipeline = build(cls, *args, **kwargs)
        retrieve, generate = pipeline.retrieve, pipeline.generator.generate

        def counted_retrieve(questions, k):
            calls["retrieve"].append(len(questions))
            calls["depth"].append(k)
            return retrieve(questions, k)

        def counted_generate(questions, passages, max_new_tokens=16):
            calls["generate"].append(len(questions))
            return generate(questions, passages, max_new_tokens)

        pipeline.retrieve = counted_retrieve
        pipeline.generator.generate = counted_generate
        return pipeline

    monkeypatch.setattr(Pipeline, "from_config", classmethod(from_config))
    return calls


def test_a_run_with_eval_qa_retrieves_and_answers_once_per_evaluation(
    tmp_path, counted, one_thread
):
    config = tmp_path / "run.toml"
    config.write_text(TOY_RUN.format(eval_qa="true"))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output

    dev = 12  # the toy set's questions
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval"] for line in lines if "eval" in line]
    assert len(evals) == 2  # after steps 1 and 2; and one more before training
    assert sum(counted["retrieve"]) == 3 * dev and set(counted["depth"]) == {10}
    assert sum(counted["generate"]) == 2 * dev  # the before measurement does not answer
    written = json.loads((out / "eval.json").read_text())
    assert {k: v for k, v in written.items() if "(before)" not in k} == evals[-1]
    assert set(evals[-1]) == {"recall@1", "recall@3", "mrr@10", "em", "f1", "sub_em"}
    assert set(written) - set(evals[-1]) == {
        "recall@1 (before)",
        "recall@3 (before)",
        "mrr@10 (before)",
    }


def test_without_eval_qa_only_the_final_evaluation_answers(tmp_path, counted, one_thread):
    config = tmp_path / "run.toml"
    config.write_text(TOY_RUN.format(eval_qa="false"))
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", str(config), "--out", str(out)]).exit_code == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval"] for line in lines if "eval" in line]
    assert [set(e) >= {"em", "f1"} for e in evals] == [False, True]
    assert sum(counted["retrieve"]) == 3 * 12 and sum(counted["generate"]) == 12


def test_evaluate_qa_reports_the_configured_ks_only(tmp_path, counted, one_thread):
    config = tmp_path / "run.toml"
    config.write_text(TOY_RUN.format(eval_qa="false"))
    result = CliRunner().invoke(main, ["evaluate", str(config), "--qa"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "recall@1" in line)
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[columns.index("questions") + 1 :] == [
        "recall@1",
        "recall@3",
        "mrr@10",
        "em",
        "f1",
        "sub_em",
    ]
    assert sum(counted["retrieve"]) == 12 and sum(counted["generate"]) == 12


def test_evaluate_without_gold_ids_or_generator_is_one_line(tmp_path):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text('{"id": "a", "text": "Paris is in France."}\n')
    (tmp_path / "dev.jsonl").write_text('{"id": "q", "question": "Where?", "answers": ["x"]}\n')
    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\nsource = "jsonl"\ncorpus = "passages.jsonl"\ndev = "dev.jsonl"\n'
        '[retriever]\nname = "bm25"\n'
    )
    result = CliRunner().invoke(main, ["evaluate", str(config)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {config}: split 'dev': no question has gold_ids to measure retrieval "
        "against; use --qa for EM/F1"
    )
    result = CliRunner().invoke(main, ["evaluate", str(config), "--qa"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {config}: --qa needs a [generator] section"


def test_a_demo_whose_data_is_bad_writes_nothing(tmp_path):
    from latentrag.experiments.demo import run_demo

    (tmp_path / "passages.jsonl").write_text('{"id": "a", "text": "Paris"}\n{"id": "b", "te\n')
    (tmp_path / "train.jsonl").write_text("")
    config = tmp_path / "demo.toml"
    config.write_text(
        TOY_RUN.format(eval_qa="false").replace(
            'source = "toy"',
            'source = "jsonl"\ncorpus = "passages.jsonl"\ntrain = "train.jsonl"\n'
            'dev = "train.jsonl"\n[posterior]\nname = "bow"',
        )
    )
    out = tmp_path / "demo"
    with pytest.raises(LatentragError, match=r"passages.jsonl:2: malformed JSON"):
        run_demo(out, config=config, echo=lambda line: None)
    assert not out.exists()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [
        "demo.toml",
        "passages.jsonl",
        "train.jsonl",
    ]
