"""Model settings name Hugging Face ids found in the local HF cache (offline): each of dpr,
cross-encoder and hf-causal-lm loads a tiny model saved in a cache layout by its id, and an id
missing from the cache fails at `config validate` with one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.core.config import resolve
from latentrag.core.pipeline import Pipeline
from latentrag.testing import toy_corpus

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_to_hub_cache(cache: Path, model_id: str, model, tokenizer) -> Path:
    """Save as the hub does: models--org--name/snapshots/<commit>/ and refs/main."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from latentrag.plugins.encoders import tiny_random_bert
    from latentrag.toy.tiny_models import tiny_llama, tiny_tokenizer

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_to_hub_cache(cache, "tiny-org/tiny-bert", *tiny_random_bert(seed=3))
    tokenizer = tiny_tokenizer()
    save_to_hub_cache(cache, "tiny-org/tiny-llama", tiny_llama(tokenizer, seed=3), tokenizer)
    return cache


def sections(model_kind: str) -> dict:
    data = {"data": {"source": "toy"}, "retriever": {"name": "bm25"}}
    if model_kind == "dpr":
        data["retriever"] = {"name": "dpr", "model": "tiny-org/tiny-bert", "precision": "float32"}
    elif model_kind == "cross-encoder":
        data["reranker"] = {"name": "cross-encoder", "model": "tiny-org/tiny-bert"}
        data["reranker"]["precision"] = "float32"
    else:
        data["generator"] = {"name": "hf-causal-lm", "model": "tiny-org/tiny-llama"}
    return data


def test_dpr_loads_a_cached_id(hub_cache):
    from latentrag.plugins.encoders import tiny_random_bert

    pipeline = Pipeline.from_config(resolve(sections("dpr")), toy_corpus())
    encoder = pipeline.retriever.query_encoder
    saved, _ = tiny_random_bert(seed=3)
    loaded = dict(encoder.named_parameters())
    weight = next(v for k, v in loaded.items() if k.endswith("word_embeddings.weight"))
    assert weight.equal(saved.embeddings.word_embeddings.weight)  # the cached weights
    assert pipeline.retriever.retrieve(["a question"], 2).indices.shape == (1, 2)


def test_cross_encoder_loads_a_cached_id(hub_cache):
    from latentrag.plugins.encoders import tiny_random_bert

    pipeline = Pipeline.from_config(resolve(sections("cross-encoder")), toy_corpus())
    saved, _ = tiny_random_bert(seed=3)
    params = dict(pipeline.reranker.named_parameters())
    weight = next(v for k, v in params.items() if k.endswith("word_embeddings.weight"))
    assert weight.equal(saved.embeddings.word_embeddings.weight)


def test_hf_causal_lm_loads_a_cached_id(hub_cache):
    from latentrag.toy.tiny_models import tiny_llama, tiny_tokenizer

    pipeline = Pipeline.from_config(resolve(sections("generator")), toy_corpus(), index=False)
    saved = tiny_llama(tiny_tokenizer(), seed=3).state_dict()
    loaded = pipeline.generator.model.state_dict()
    assert set(saved) == set(loaded) and all(loaded[k].equal(saved[k]) for k in saved)
    other = tiny_llama(tiny_tokenizer(), seed=4).state_dict()
    assert not all(other[k].equal(saved[k]) for k in saved)  # seed matters: not a default


@pytest.mark.parametrize(
    ("kind", "key"),
    [("dpr", "retriever.model"), ("cross-encoder", "reranker.model"), ("hf", "generator.model")],
)
def test_a_missing_id_fails_config_validate_with_one_line(hub_cache, tmp_path, kind, key):
    section = {"dpr": "retriever", "cross-encoder": "reranker", "hf": "generator"}[kind]
    name = {"dpr": "dpr", "cross-encoder": "cross-encoder", "hf": "hf-causal-lm"}[kind]
    path = tmp_path / "c.toml"
    text = '[data]\nsource = "toy"\n'
    if section != "retriever":
        text += '[retriever]\nname = "bm25"\n'
    path.write_text(text + f'[{section}]\nname = "{name}"\nmodel = "no-org/absent-model"\n')
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"error: {path}: {key}: ")
    assert "'no-org/absent-model' is not in the Hugging Face cache" in result.output
    # the same id, once cached, validates
    assert resolve({"data": {"source": "toy"}, **sections(kind)}).components
