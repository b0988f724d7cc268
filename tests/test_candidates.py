"""Closed candidate lists (`Example.candidate_ids`): retrieval, reranking, training and
evaluation see only each question's own candidates; `latentrag evaluate` on a BEIR folder
and on a HotpotQA-style file with candidate lists and extra fields.

The HotpotQA-style fixture (tests/fixtures/hotpot/): 8 passages, 3 questions of 4
candidates and 2 gold passages each. BM25 within the candidates, by hand (each top
passage shares the most question words): h1 "alpha river and beta mountain?" -> a1, a2
(both gold; x1, which repeats every word, is no candidate); h2 "omega harbour ships city?"
-> b2, b1 (gold b2; d2 is gold too); h3 "sigma desert green?" -> d3, d2 (gold a1, x1).
So hit@2 = 2/3, recall@2 = (1 + 1/2 + 0)/3 = 1/2, all@2 = 1/3.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import DataConfig, EvalConfig
from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import Pipeline, retrieve_within
from latentrag.core.types import Batch, Corpus, Example
from latentrag.data.dataset import load_dataset
from latentrag.evaluation.measure import measure
from latentrag.evaluation.trec import read_trec_run
from latentrag.plugins.bm25 import BM25Config
from latentrag.plugins.bm25.retriever import BM25Retriever
from latentrag.testing.checks import TableReranker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURES = Path(__file__).parent / "fixtures"
HOTPOT = FIXTURES / "hotpot"


@pytest.fixture(scope="module")
def hotpot():
    config = DataConfig(format="latentrag", corpus="passages.jsonl", dev="dev.jsonl")
    return load_dataset(config, base=HOTPOT)


def bm25_pipeline(corpus: Corpus, **parts) -> Pipeline:
    pipeline = Pipeline(corpus, BM25Retriever(BM25Config()), **parts)
    pipeline.index()
    return pipeline


def ids(corpus: Corpus, candidates) -> list[list[str]]:
    rows, valid = candidates.indices.tolist(), candidates.valid().tolist()
    return [[corpus[r].id for r, ok in zip(row, oks) if ok] for row, oks in zip(rows, valid)]


class NoScore(Retriever):
    """A retriever without score(): the pipeline filters ever deeper retrievals."""

    def __init__(self, inner: Retriever) -> None:
        self.inner, self.depths = inner, []

    def index(self, corpus: Corpus) -> None:
        self.inner.index(corpus)

    def retrieve(self, queries, k):
        self.depths.append(k)
        return self.inner.retrieve(queries, k)


def test_retrieval_is_kept_to_each_questions_candidates(hotpot):
    pipeline = bm25_pipeline(hotpot.corpus)
    examples = hotpot.split("dev")
    within = pipeline.candidate_rows(examples)
    found = pipeline.retrieve([e.question for e in examples], 2, within)
    assert ids(hotpot.corpus, found) == [["a1", "a2"], ["b2", "b1"], ["d3", "d2"]]
    unrestricted = pipeline.retrieve([examples[0].question], 1)
    assert ids(hotpot.corpus, unrestricted) == [["x1"]]  # the passage the list keeps out
    wide = pipeline.retrieve([e.question for e in examples], 6, within)  # 4 candidates each
    assert wide.shape == (3, 4) and wide.mask is None
    assert [set(r) for r in ids(hotpot.corpus, wide)] == [set(e.candidate_ids) for e in examples]


def test_a_retriever_without_score_gives_the_same_ranking(hotpot):
    examples = hotpot.split("dev")
    scored = bm25_pipeline(hotpot.corpus)
    unscored = NoScore(BM25Retriever(BM25Config()))
    unscored.index(hotpot.corpus)
    within = scored.candidate_rows(examples)
    questions = [e.question for e in examples]
    expected = scored.retrieve(questions, 3, within)
    found = retrieve_within(unscored, questions, within, 3, len(hotpot.corpus))
    assert torch.allclose(found.scores, expected.scores)
    # the same passages wherever scores differ; ties at 0 may list other zero-score rows
    assert torch.equal(found.indices[:, :2], expected.indices[:, :2])
    assert unscored.depths == [8]  # 4k = 12, clipped to the corpus


def test_mixed_batches_and_short_lists_are_padded(hotpot):
    pipeline = bm25_pipeline(hotpot.corpus)
    short = Example("s", "omega city", candidate_ids=("b1",))
    free = Example("f", "alpha river beta mountain")
    found = pipeline.candidates(Batch([short, free]), "prior", 3)
    assert ids(hotpot.corpus, found) == [["b1"], ["x1", "a1", "a2"]]
    assert found.mask.tolist() == [[True, False, False], [True, True, True]]
    assert found.scores[0, 1:].tolist() == [0.0, 0.0]
    everything = pipeline.candidates(Batch([short, free]), "corpus", 3)
    assert everything.valid().sum(1).tolist() == [1, len(hotpot.corpus)]


class Spy:
    """A generator that records which passages it is asked to score."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def loglik(self, queries, passages, targets, reduce="sum"):
        self.seen += [p for row in passages for p in row]
        return torch.zeros(len(queries), len(passages[0]), requires_grad=True)


def test_training_candidates_and_reranking_stay_in_the_list(hotpot):
    examples = [e for e in hotpot.split("dev") if e.answers]  # h1 has an answer
    spy = Spy()
    pipeline = bm25_pipeline(hotpot.corpus, generator=spy)
    batch = Batch(examples)
    for source in ("prior", "corpus"):
        candidates = pipeline.candidates(batch, source, 8)
        pipeline.loglik(batch, candidates)
    allowed = {hotpot.corpus[hotpot.corpus.index_of(p)].text for p in examples[0].candidate_ids}
    assert spy.seen and set(spy.seen) <= allowed
    reranker = TableReranker([examples[0].question], hotpot.corpus)
    reranked = bm25_pipeline(hotpot.corpus, reranker=reranker)
    reranked.rerank_pool = 8
    found = reranked.retrieve([examples[0].question], 4, reranked.candidate_rows(examples))
    assert set(ids(hotpot.corpus, found)[0]) == set(examples[0].candidate_ids)


def test_measure_over_candidate_lists_by_hand(hotpot):
    pipeline = bm25_pipeline(hotpot.corpus)
    settings = EvalConfig(recall_at=[2], metrics=["hit", "recall", "all"])
    metrics = measure(pipeline, hotpot.split("dev"), settings)
    assert metrics == pytest.approx({"hit@2": 2 / 3, "recall@2": 1 / 2, "all@2": 1 / 3})


# -- the command line --------------------------------------------------------------------------


def table(output: str) -> dict[str, str]:
    header, _, row = output[output.index("| retrieval") :].splitlines()[:3]
    cells = [[c.strip() for c in line.strip(" |").split("|")] for line in (header, row)]
    return dict(zip(*cells))


def write_config(tmp_path: Path, data: str, retriever: str, eval_: str = "") -> Path:
    config = tmp_path / "eval.toml"
    config.write_text(f"[data]\n{data}\n[retriever]\n{retriever}\n[eval]\n{eval_}\n")
    return config


@pytest.mark.parametrize(
    "retriever", ['name = "bm25"', 'name = "dpr"\nmodel = "tiny-random"'], ids=["bm25", "dpr"]
)
def test_evaluate_hotpot_style_file_over_its_candidates(tmp_path, retriever):
    data = f'format = "latentrag"\ncorpus = "{HOTPOT}/passages.jsonl"\ndev = "{HOTPOT}/dev.jsonl"'
    config = write_config(
        tmp_path, data, retriever, 'recall_at = [2]\nmetrics = ["hit", "recall", "all"]'
    )
    run = tmp_path / "run.trec"
    result = CliRunner().invoke(main, ["evaluate", str(config), "--trec-run", str(run)])
    assert result.exit_code == 0, result.output
    values = table(result.output)
    assert values["questions"] == "3"
    hit, recall, every = (float(values[k]) for k in ("hit@2", "recall@2", "all@2"))
    if retriever == 'name = "bm25"':
        assert (hit, recall, every) == pytest.approx((2 / 3, 1 / 2, 1 / 3), abs=1e-3)
    assert hit >= recall >= every
    assert "recall@k: share of the gold passages in the top k (all-gold recall" in result.output
    ranked = read_trec_run(run)
    lists = {e.id: e.candidate_ids for e in load_dataset(
        DataConfig(format="latentrag", corpus="passages.jsonl", dev="dev.jsonl"), base=HOTPOT
    ).split("dev")}  # fmt: skip
    assert {q: sorted(p for p, _, _ in rows) for q, rows in ranked.items()} == {
        q: sorted(c) for q, c in lists.items()
    }  # every candidate, ranked; nothing else


def test_evaluate_a_beir_folder(tmp_path):
    data = f'format = "beir"\npath = "{FIXTURES}/formats/beir"'
    config = write_config(tmp_path, data, 'name = "bm25"', "recall_at = [1, 2]\nndcg_at = [3]")
    run = tmp_path / "run.trec"
    args = ["evaluate", str(config), "--split", "test", "--trec-run", str(run), "--verbose"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    values = table(result.output)
    assert values["split"] == "test" and values["questions"] == "2"
    assert list(values)[3:] == ["hit@1", "hit@2", "recall@1", "recall@2", "mrr@10", "ndcg@3"]
    ranked = {q: [p for p, _, _ in rows] for q, rows in read_trec_run(run).items()}
    assert sorted(ranked) == ["q1", "q2"] and all(len(r) == 3 for r in ranked.values())
    # the metrics agree with the run and the qrels (q1: d1 grade 2, d3 grade 1; q2: d2)
    grades = {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1}}
    hit1 = sum(ranked[q][0] in grades[q] for q in grades) / 2
    assert float(values["hit@1"]) == pytest.approx(hit1, abs=1e-3)
    mrr = sum(1 / (1 + [p in grades[q] for p in ranked[q]].index(True)) for q in grades) / 2
    assert float(values["mrr@10"]) == pytest.approx(mrr, abs=1e-3)


def test_evaluate_qa_on_retrieval_only_data_is_one_line(tmp_path):
    data = f'format = "beir"\npath = "{FIXTURES}/formats/beir"'
    config = write_config(tmp_path, data, 'name = "bm25"')
    config.write_text(
        config.read_text() + '\n[generator]\nname = "hf-causal-lm"\nmodel = "tiny-llama"\n'
    )
    result = CliRunner().invoke(main, ["evaluate", str(config), "--split", "test", "--qa"])
    assert result.exit_code == 2
    queries = FIXTURES / "formats" / "beir" / "queries.jsonl"
    expected = f"error: {queries}: missing field 'answers' (question 'q1' has none; the generator"
    assert result.output.startswith(expected) and result.output.count("\n") == 1
