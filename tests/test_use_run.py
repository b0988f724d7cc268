"""Use what a run trained (issue 16): `load_run`, `evaluate --run`, `ask`, `predict`, the
three exports, `train.keep_optimizer` and `train.max_grad_norm = 0`. Two toy runs of two
steps: bow + tiny-llama, and dpr (tiny-random, passage encoder trained) + tiny-llama LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import load_config, resolve
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.pipeline import Pipeline
from latentrag.core.types import Corpus
from latentrag.experiments.loading import load_run, open_run, run_metrics_after
from latentrag.experiments.predict import sub_exact_match
from latentrag.experiments.runs import train_run
from latentrag.toy.corpus import toy_corpus, toy_examples
from latentrag.training import gradients
from latentrag.training.checkpoint import read_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOW_RUN = """\
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
lr = 0.05
eval_every = 1
[eval]
recall_at = [1, 3]
max_new_tokens = 3
"""

DPR_RUN = """\
[data]
source = "toy"
[retriever]
name = "dpr"
model = "tiny-random"
max_length = 32
train_passage_encoder = true
refresh_every = 1
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
lora = {r = 4}
[estimator]
name = "topk"
k = 3
[train]
steps = 2
batch_size = 4
lr = 0.01
checkpoint_every = 1
keep_optimizer = false
[eval]
recall_at = [1, 3]
max_new_tokens = 2
"""

QUESTIONS = [e.question for e in toy_examples()]


def _train(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.toml"
    config.write_text(text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    try:
        train_run(load_config(config), config, folder / "run")
    finally:
        torch.set_num_threads(threads)
    return folder / "run"


@pytest.fixture(scope="module")
def bow_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("bow"), BOW_RUN)


@pytest.fixture(scope="module")
def dpr_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("dpr"), DPR_RUN)


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- load_run and evaluate --run -----------------------------------------------------------


def test_load_run_puts_the_checkpoint_weights_into_the_pipeline(bow_run):
    pipeline = load_run(bow_run)
    saved = read_checkpoint(bow_run / "ckpt-2").tensors["model"]
    loaded = {f"retriever.{k}": v for k, v in pipeline.retriever.state_dict().items()}
    loaded |= {f"generator.{k}": v for k, v in pipeline.generator.state_dict().items()}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    untrained = Pipeline.from_config(pipeline.config, toy_corpus(), index=False)
    before = untrained.retriever.state_dict()["query_encoder.bag.weight"]
    assert not torch.equal(before, saved["retriever.query_encoder.bag.weight"])
    assert pipeline.config.pipeline.train.steps == 2 and len(pipeline.corpus) == 12


def test_evaluate_run_reproduces_the_metrics_after_training_exactly(bow_run):
    result = _cli("evaluate", "--run", bow_run, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    after = run_metrics_after(bow_run)
    assert set(after) >= {"recall@1", "recall@3", "mrr@10", "em", "f1"}
    assert {k: shown[k] for k in after} == after  # exactly, not approximately
    assert shown["matches_eval_json"] is True and shown["step"] == 2


def test_a_refreshed_dense_index_reproduces_its_run_too(dpr_run):
    from latentrag.experiments.loading import evaluate_run

    assert evaluate_run(open_run(dpr_run)) == run_metrics_after(dpr_run)


def test_evaluate_takes_a_config_or_a_run_not_both(bow_run):
    neither = _cli("evaluate")
    assert neither.exit_code == 2 and "missing CONFIG_FILE (or --run RUN)" in neither.stderr
    both = _cli("evaluate", bow_run / "config.toml", "--run", bow_run)
    assert both.exit_code == 2 and "takes no CONFIG_FILE" in both.stderr


def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path):
    with pytest.raises(LatentragError, match="not a run folder"):
        load_run(tmp_path)
    result = _cli("ask", tmp_path / "missing", "why?")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no such run folder" in result.stderr


# -- ask and predict --------------------------------------------------------------------------


def test_ask_json_names_the_passages_read_with_their_scores(bow_run):
    result = _cli("ask", bow_run, "What is the capital of France?", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    ids = [p["id"] for p in answer["passages"]]
    top = load_run(bow_run).retrieve(["What is the capital of France?"], 3)
    assert ids == [toy_corpus()[r].id for r in top.indices[0].tolist()]
    scores = [p["score"] for p in answer["passages"]]
    assert scores == pytest.approx(top.scores[0].tolist()) and scores == sorted(scores)[::-1]
    assert isinstance(answer["answer"], str) and answer["question"].startswith("What")


def test_predict_writes_one_line_per_question_and_its_means_are_the_runs(bow_run, tmp_path):
    out = tmp_path / "preds.jsonl"
    result = _cli("predict", bow_run, "--split", "dev", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [e.id for e in toy_examples()]
    corpus_ids = set(toy_corpus().ids)
    for record in records:
        retrieved = [p["id"] for p in record["retrieved"]]
        assert len(retrieved) == 10 and len(set(retrieved)) == 10 <= len(corpus_ids)
        assert set(retrieved) <= corpus_ids
        scores = [p["score"] for p in record["retrieved"]]
        assert scores == sorted(scores, reverse=True)
        assert isinstance(record["prediction"], str)
        assert {record["em"], record["sub_em"]} <= {0.0, 1.0} and 0 <= record["f1"] <= 1
        rank = record["gold_rank"]
        assert rank is None or retrieved[rank - 1] in record["gold_ids"]
    after = run_metrics_after(bow_run)
    summary = json.loads(result.stdout)
    assert summary["questions"] == 12
    assert (summary["em"], summary["f1"]) == pytest.approx((after["em"], after["f1"]))
    if "sub_em" in after:  # the evaluation reports it too: the same definition
        assert summary["sub_em"] == pytest.approx(after["sub_em"])
    recall_1 = sum(r["gold_rank"] == 1 for r in records) / len(records)
    assert recall_1 == pytest.approx(after["recall@1"])


def test_sub_exact_match_finds_a_reference_inside_the_answer():
    assert sub_exact_match("it is the Nile river", ["The Nile!"]) == 1.0
    assert sub_exact_match("Rome, Italy", ["Paris", "Milan"]) == 0.0
    assert sub_exact_match("the", ["the"]) == 0.0  # nothing left after normalisation


def test_pipeline_answer_without_a_config_reads_one_passage():
    from latentrag.toy.components import TableRetriever

    corpus = Corpus(toy_corpus())
    retriever = TableRetriever(QUESTIONS, len(corpus))
    with torch.no_grad():
        retriever.table.zero_()
        retriever.table[0, 3] = 2.0  # the first question's best passage: madrid
    answer = Pipeline(corpus, retriever).answer(QUESTIONS[0])
    assert answer.text is None and [(p.id, p.score) for p in answer.passages] == [("madrid", 2.0)]
    assert answer.to_json()["passages"][0]["title"] == "Spain"


# -- exports ----------------------------------------------------------------------------------


def test_sentence_transformers_export_encodes_like_the_trained_query_encoder(dpr_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    assert _cli("export", dpr_run, "--to", "sentence-transformers", out).exit_code == 0
    trained = load_run(dpr_run).retriever.query_encoder
    exported = SentenceTransformer(str(out), device="cpu")
    ours = trained.encode(QUESTIONS)
    theirs = exported.encode(QUESTIONS, convert_to_tensor=True, batch_size=5)
    assert (ours - theirs).abs().max().item() < 1e-5
    untrained = Pipeline.from_config(load_run(dpr_run).config, toy_corpus(), index=False)
    moved = (untrained.retriever.query_encoder.encode(QUESTIONS) - ours).abs().max().item()
    assert moved > 1e-4  # training changed the encoder: the comparison above means something


def test_peft_export_gives_the_trained_generators_logits(dpr_run, tmp_path):
    from peft import PeftModel

    from latentrag.toy.tiny_models import tiny_llama, tiny_tokenizer

    out = tmp_path / "adapter"
    assert _cli("export", dpr_run, "--to", "peft", out).exit_code == 0
    generator = load_run(dpr_run).generator
    ids = torch.tensor([generator.tokenizer("what is the capital of france ? paris")["input_ids"]])
    base = tiny_llama(tiny_tokenizer(), seed=0)
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()
        theirs = adapted(ids).logits
        ours = generator.model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - base_logits).abs().max().item() > 1e-4  # the adapter was trained


def test_faiss_export_holds_the_trained_vectors_and_returns_the_retrievers_top_k(dpr_run, tmp_path):
    import faiss

    out = tmp_path / "index"
    assert _cli("export", dpr_run, "--to", "faiss", out).exit_code == 0
    index = faiss.read_index(str(out / "index.faiss"))
    ids = json.loads((out / "ids.json").read_text())
    pipeline = load_run(dpr_run)
    retriever, corpus = pipeline.retriever, toy_corpus()
    trained = retriever.passage_encoder.encode(corpus.texts())
    stored = torch.from_numpy(index.reconstruct_n(0, index.ntotal))
    assert (stored - trained).abs().max().item() < 1e-6 and ids == corpus.ids
    untrained = Pipeline.from_config(pipeline.config, corpus, index=False).retriever
    configured = untrained.passage_encoder.encode(corpus.texts())
    assert (stored - configured).abs().max().item() > 1e-4  # the trained vectors, not these
    _, labels = index.search(retriever.query_encoder.encode(QUESTIONS).numpy(), 3)
    top = retriever.retrieve(QUESTIONS, 3).indices.tolist()
    assert [[ids[i] for i in row] for row in labels.tolist()] == [
        [corpus[r].id for r in row] for row in top
    ]


def test_exports_refuse_what_the_run_lacks_and_a_used_folder(bow_run, tmp_path):
    st = _cli("export", bow_run, "--to", "sentence-transformers", tmp_path / "st")
    assert st.exit_code == 2 and "retriever 'bow' has no transformer query encoder" in st.stderr
    peft = _cli("export", bow_run, "--to", "faiss", tmp_path / "ix")
    assert peft.exit_code == 2 and "keeps no faiss index" in peft.stderr
    assert not (tmp_path / "ix").exists() and not list(tmp_path.glob(".ix.*"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    refused = _cli("export", bow_run, "--to", "peft", used)
    assert refused.exit_code == 2 and "already exists" in refused.stderr


# -- checkpoints ------------------------------------------------------------------------------


def test_keep_optimizer_false_drops_it_from_the_final_checkpoint_only(dpr_run, bow_run):
    intermediate, final = read_checkpoint(dpr_run / "ckpt-1"), read_checkpoint(dpr_run / "ckpt-2")
    assert "optimizer" in intermediate.tensors and intermediate.state["optimizer"] is not None
    assert "optimizer" not in final.tensors and final.state["optimizer"] is None
    assert not (dpr_run / "ckpt-2" / "optimizer.safetensors").exists()
    assert "optimizer" in read_checkpoint(bow_run / "ckpt-2").tensors  # the default keeps it


def test_a_run_resumes_from_a_final_checkpoint_without_optimizer(dpr_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(dpr_run, copy)
    config = tmp_path / "run.toml"
    config.write_text(DPR_RUN.replace("steps = 2", "steps = 3"))
    with pytest.warns(UserWarning, match="no optimizer state"):
        train_run(load_config(config), config, copy, resume=True)
    assert read_checkpoint(copy / "ckpt-3").step == 3


def test_max_grad_norm_zero_turns_clipping_off():
    base = {"retriever": {"name": "bow"}}
    settings = resolve({**base, "train": {"max_grad_norm": 0}}).pipeline.train
    assert settings.max_grad_norm == 0.0
    assert resolve({**base, "train": {"max_grad_norm": None}}).pipeline.train.max_grad_norm == 0
    shown = resolve({**base, "train": {"max_grad_norm": 0}}).to_dict()["train"]
    assert shown["max_grad_norm"] == 0.0  # a saved config re-runs without clipping too
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        resolve({**base, "train": {"max_grad_norm": -1}})

    class Parameters:
        def __init__(self) -> None:
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.weight.grad = torch.tensor([3.0, 4.0])
            self.by_role = {"retriever": [("weight", self.weight)]}

    kept = Parameters()
    norms = {"retriever": torch.tensor(5.0)}
    assert gradients.clip(norms, kept, settings.max_grad_norm) == 5.0
    assert kept.weight.grad.tolist() == [3.0, 4.0]
    clipped = Parameters()
    gradients.clip(norms, clipped, 0.5)
    assert clipped.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_importing_latentrag_stays_light_and_load_run_is_exported():
    import latentrag

    code = "import sys, latentrag\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "load_run" in latentrag.__all__ and latentrag.load_run is load_run
    with pytest.raises(AttributeError, match="no attribute 'load_runs'"):
        latentrag.load_runs  # noqa: B018


def test_relative_data_paths_are_read_from_the_run_folder_else_the_working_directory(
    tmp_path, monkeypatch
):
    from latentrag.experiments.loading import data_base

    data = {"source": "jsonl", "corpus": "passages.jsonl", "dev": "dev.jsonl"}
    config = resolve({"retriever": {"name": "bow"}, "data": data})
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.jsonl").write_text("")
    assert data_base(run, config) == tmp_path  # dev.jsonl is not in the run folder
    (run / "dev.jsonl").write_text("")
    assert data_base(run, config) == run
