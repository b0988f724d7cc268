"""DPR's separate question and context encoders (`query_model` / `passage_model`): tiny
DPRQuestionEncoder / DPRContextEncoder checkpoints saved to folders give, through the dpr
retriever built from a TOML config, their pooler outputs as vectors (not normalised) and
retrieve by inner product; a missing or unloadable one fails `config validate` in one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import BertTokenizer, DPRContextEncoder, DPRQuestionEncoder
from transformers import DPRConfig as HFDPRConfig

from latentrag.cli import main
from latentrag.core.config import read_toml, resolve
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.retriever import DPRRetriever
from latentrag.plugins.encoders import tiny_bert_config, tiny_random_bert, tiny_vocab
from latentrag.testing import toy_corpus, toy_examples

QUESTIONS = [e.question for e in toy_examples()][:5]


def save_dpr(directory: Path, model_class, projection_dim: int, seed: int) -> Path:
    tokenizer = BertTokenizer(vocab=tiny_vocab())
    config = HFDPRConfig(**tiny_bert_config(len(tokenizer)).to_dict())
    config.projection_dim = projection_dim
    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=[0, 8], ids=["no-projection", "projection-8"])
def checkpoints(request, tmp_path_factory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp(f"dpr{request.param}")
    question = save_dpr(root / "question", DPRQuestionEncoder, request.param, seed=1)
    context = save_dpr(root / "context", DPRContextEncoder, request.param, seed=2)
    return question, context, request.param


def pooler_outputs(model_class, directory: Path, texts: list[str]) -> torch.Tensor:
    """What the checkpoint itself gives: pooler_output of its own forward."""
    model = model_class.from_pretrained(directory).eval()
    tokens = BertTokenizer.from_pretrained(directory)(
        texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**tokens).pooler_output


def write_config(path: Path, retriever: str) -> Path:
    path.write_text(f'[data]\nsource = "toy"\n[retriever]\nname = "dpr"\n{retriever}')
    return path


def build_from_toml(path: Path, registry) -> DPRRetriever:
    spec, config = resolve(read_toml(path), str(path), registry).component("retriever")
    return spec.build(config)


def test_vectors_are_the_checkpoints_pooler_outputs(tmp_path, checkpoints, latentrag_registry):
    question, context, projection = checkpoints
    path = write_config(
        tmp_path / "dpr.toml",
        f'query_model = "{question}"\npassage_model = "{context}"\nprecision = "float32"\n',
    )
    retriever = build_from_toml(path, latentrag_registry)
    corpus = toy_corpus()
    retriever.index(corpus)
    assert retriever.passage_encoder.dim == (projection or 32)
    assert not retriever.query_encoder.normalize and not retriever.passage_encoder.normalize

    expected_passages = pooler_outputs(DPRContextEncoder, context, corpus.texts())
    passage_diff = (retriever._vectors - expected_passages).abs().max().item()
    queries = retriever.query_encoder.encode(QUESTIONS)
    expected_queries = pooler_outputs(DPRQuestionEncoder, question, QUESTIONS)
    query_diff = (queries - expected_queries).abs().max().item()
    print(
        f"projection {projection}: max |diff| passages {passage_diff:.1e} queries {query_diff:.1e}"
    )
    assert passage_diff < 1e-6 and query_diff < 1e-6
    assert (retriever._vectors.norm(dim=-1) - 1).abs().max() > 1e-2  # inner product, raw
    # the question encoder is not the context encoder read twice
    assert (
        pooler_outputs(DPRQuestionEncoder, question, QUESTIONS[:1]) - queries[:1]
    ).abs().max() < 1e-6
    assert (retriever.passage_encoder.encode(QUESTIONS) - queries).abs().max() > 1e-3

    found = retriever.retrieve(QUESTIONS, 3)
    scores = expected_queries @ expected_passages.T
    assert found.indices.tolist() == scores.topk(3).indices.tolist()
    torch.testing.assert_close(found.scores, scores.topk(3).values, atol=1e-5, rtol=0)
    with torch.no_grad():
        scored = retriever.score(QUESTIONS, found.indices)
    torch.testing.assert_close(scored, found.scores, atol=1e-5, rtol=0)


def test_only_the_question_encoder_trains_by_default(checkpoints):
    question, context, _ = checkpoints
    config = DPRConfig(query_model=str(question), passage_model=str(context))
    retriever = DPRRetriever(config)
    assert list(retriever.trainable_modules()) == ["query_encoder"]
    assert not any(p.requires_grad for p in retriever.passage_encoder.parameters())
    trained = DPRRetriever(config.model_copy(update={"train_passage_encoder": True}))
    assert list(trained.trainable_modules()) == ["query_encoder", "passage_encoder"]
    assert trained.query_encoder.embed(QUESTIONS[:2]).requires_grad


def test_an_asymmetric_pair_of_plain_folders(tmp_path):
    folders = []
    for seed in (3, 4):
        model, tokenizer = tiny_random_bert(seed)
        folders.append(tmp_path / f"bert{seed}")
        model.save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    config = DPRConfig(
        query_model=str(folders[0]),
        passage_model=str(folders[1]),
        normalize=True,
        precision="float32",
    )
    retriever = DPRRetriever(config)
    corpus = toy_corpus()
    retriever.index(corpus)
    from latentrag.plugins.encoders import load_sentence_encoder

    expected = load_sentence_encoder(str(folders[1]), normalize=True).encode(corpus.texts())
    torch.testing.assert_close(retriever._vectors, expected, atol=1e-6, rtol=0)
    other = load_sentence_encoder(str(folders[0]), normalize=True).encode(corpus.texts())
    assert (retriever._vectors - other).abs().max() > 1e-3
    assert json.loads((folders[1] / "config.json").read_text())["model_type"] == "bert"


def validate(path: Path):
    return CliRunner().invoke(main, ["config", "validate", str(path)])


def reader_checkpoint(directory: Path) -> Path:
    save_dpr(directory, DPRContextEncoder, 0, seed=5)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["DPRReader"]}))
    return directory


@pytest.mark.parametrize(
    ("retriever", "message"),
    [
        ('query_model = "{q}"\npassage_model = "{absent}"\n', "retriever.passage_model: "),
        ('query_model = "{q}"\npassage_model = "{reader}"\n', "must name DPRQuestionEncoder"),
        ('query_model = "{q}"\n', "query_model and passage_model are set together"),
        (
            'query_model = "{q}"\npassage_model = "{c}"\nshared_encoders = true\n',
            "shared_encoders = true cannot be used with query_model",
        ),
        (
            'model = "tiny-random"\nquery_model = "{q}"\npassage_model = "{c}"\n',
            "give either model or query_model / passage_model",
        ),
    ],
)
def test_a_missing_or_unknown_checkpoint_fails_config_validate(
    tmp_path, checkpoints, retriever, message
):
    question, context, _ = checkpoints
    names = {"q": question, "c": context, "absent": tmp_path / "absent"}
    names["reader"] = reader_checkpoint(tmp_path / "reader") if "reader" in retriever else ""
    path = write_config(tmp_path / "c.toml", retriever.format(**names))
    result = validate(path)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {path}: ")
    assert message in result.output
    ok = write_config(
        tmp_path / "ok.toml", f'query_model = "{question}"\npassage_model = "{context}"\n'
    )
    assert validate(ok).exit_code == 0
