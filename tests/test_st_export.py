"""`export --to sentence-transformers` writes every module the query encoder computes with:
pooling modes, Dense layers, Normalize, lowercasing, and the retriever's prefixes as named
prompts; a DPR checkpoint's pooler output becomes [CLS] pooling plus its projection. Loaded
with `SentenceTransformer`, the export encodes as the retriever does."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
from torch import nn
from transformers import DPRContextEncoder, DPRQuestionEncoder

from latentrag.core.pipeline import Pipeline
from latentrag.experiments.export import export_sentence_transformers
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.retriever import DPRRetriever
from latentrag.testing import toy_corpus

st = pytest.importorskip("sentence_transformers")
from test_dpr_checkpoints import pooler_outputs, save_dpr  # noqa: E402
from test_st_modules import PASSAGES, QUERIES, bert_dir, dense, save_st  # noqa: E402, F401


def exported(retriever: DPRRetriever, out) -> st.SentenceTransformer:
    export_sentence_transformers(Pipeline(toy_corpus(), retriever), out)
    return st.SentenceTransformer(str(out), device="cpu")


def test_dense_heads_pooling_modes_and_prefixes_survive_the_export(bert_dir, tmp_path):  # noqa: F811
    head = [dense(64, 24, nn.Tanh(), seed=1), dense(24, 16, nn.Identity(), seed=2)]
    save_st(tmp_path / "model", bert_dir, pooling=("cls", "max"), dense=head)
    config = DPRConfig(
        model=str(tmp_path / "model"),
        query_prefix="query: ",
        passage_prefix="passage: ",
        precision="float32",
    )
    retriever = DPRRetriever(config)
    model = exported(retriever, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert [
        m["type"].rsplit(".", 1)[1]
        for m in json.loads((tmp_path / "out" / "modules.json").read_text())
    ] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    ours = retriever.query_encoder.encode(["query: " + q for q in QUERIES])
    theirs = model.encode(QUERIES, prompt_name="query", convert_to_tensor=True)
    assert ours.shape == (len(QUERIES), 16)
    assert (ours - theirs).abs().max().item() < 1e-5
    ours = retriever.passage_encoder.encode(["passage: " + p for p in PASSAGES])
    theirs = model.encode(PASSAGES, prompt_name="passage", convert_to_tensor=True)
    assert (ours - theirs).abs().max().item() < 1e-5
    unprompted = model.encode(QUERIES, convert_to_tensor=True)
    assert (unprompted - retriever.query_encoder.encode(QUERIES)).abs().max().item() < 1e-5


@pytest.mark.parametrize("projection", [0, 8])
def test_a_dpr_question_encoder_exports_as_cls_pooling_and_its_projection(tmp_path, projection):
    question = save_dpr(tmp_path / "question", DPRQuestionEncoder, projection, seed=3)
    context = save_dpr(tmp_path / "context", DPRContextEncoder, projection, seed=4)
    config = DPRConfig(query_model=str(question), passage_model=str(context), precision="float32")
    model = exported(DPRRetriever(config), tmp_path / "out")
    theirs = model.encode(QUERIES, convert_to_tensor=True)
    expected = pooler_outputs(DPRQuestionEncoder, question, QUERIES)
    assert theirs.shape == (len(QUERIES), projection or 32)
    assert (theirs - expected).abs().max().item() < 1e-5  # not normalised, as DPR searches
