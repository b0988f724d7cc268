"""docs/gpu.md's configs work as written: with tiny models saved under the Hub ids they name
(in a temporary Hugging Face cache, offline), each passes `config validate` and trains a step
on the CPU with the toy data; one id missing from the cache fails validation in one line."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from latentrag.cli import main

GUIDE = Path(__file__).parents[1] / "docs" / "gpu.md"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def guide_configs() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [block for block in blocks if "data" in tomllib.loads(block)]


def model_ids(block: str) -> set[str]:
    return set(re.findall(r'model = "([\w.-]+/[\w.-]+)"', block))


def save(cache: Path, model_id: str, model, tokenizer) -> None:
    repo = cache / ("models--" + model_id.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / COMMIT)
    tokenizer.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def tiny_stand_ins() -> dict:
    """A tiny model of the right kind for every id the guide names."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertForSequenceClassification,
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
    )

    from latentrag.plugins.encoders import tiny_bert_config, tiny_random_bert
    from latentrag.toy.tiny_models import tiny_llama, tiny_t5, tiny_tokenizer

    bert, bert_tokenizer = tiny_random_bert(seed=5)
    words = tiny_tokenizer()
    dpr = DPRConfig(**tiny_bert_config(len(bert_tokenizer)).to_dict(), projection_dim=0)
    reranker_config = tiny_bert_config(len(bert_tokenizer))
    reranker_config.num_labels = 1
    bart = BartConfig(
        vocab_size=len(words),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        pad_token_id=words.pad_token_id,
        eos_token_id=words.eos_token_id,
        bos_token_id=words.eos_token_id,
        decoder_start_token_id=words.pad_token_id,
        forced_eos_token_id=None,
        max_position_embeddings=512,
    )
    return {
        "intfloat/e5-small-v2": (bert, bert_tokenizer),
        "Qwen/Qwen2.5-0.5B-Instruct": (tiny_llama(words, seed=5), words),
        "facebook/dpr-question_encoder-single-nq-base": (DPRQuestionEncoder(dpr), bert_tokenizer),
        "facebook/dpr-ctx_encoder-single-nq-base": (DPRContextEncoder(dpr), bert_tokenizer),
        "facebook/bart-base": (BartForConditionalGeneration(bart), words),
        "cross-encoder/ms-marco-MiniLM-L-6-v2": (
            BertForSequenceClassification(reranker_config),
            bert_tokenizer,
        ),
        "google/flan-t5-base": (tiny_t5(words, seed=5), words),
    }


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    for model_id, (model, tokenizer) in tiny_stand_ins().items():
        save(cache, model_id, model, tokenizer)
    return cache


@pytest.fixture
def hub(saved_cache, tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    shutil.copytree(saved_cache, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_the_guide_names_a_stand_in_for_every_model():
    named = set().union(*(model_ids(block) for block in guide_configs()))
    assert len(guide_configs()) == 3
    assert named == set(tiny_stand_ins())


@pytest.mark.parametrize("number", range(3))
def test_a_guide_config_validates_and_trains_a_step(hub, tmp_path, number, one_thread):
    config = tmp_path / "guide.toml"
    config.write_text(guide_configs()[number])
    checked = CliRunner().invoke(main, ["config", "validate", str(config)])
    assert checked.exit_code == 0, checked.output
    overrides = ["data.source=toy", "train.steps=1", "train.batch_size=2", "train.device=cpu"]
    overrides += ["train.precision=fp32", "estimator.k=4"]  # the toy corpus has 12
    args = ["train", str(config), "--out", str(tmp_path / "run")]
    for override in overrides:
        args += ["--set", override]
    trained = CliRunner().invoke(main, args)
    assert trained.exit_code == 0, trained.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses) == 1 and losses[0] == losses[0]  # one step, a number (not NaN)


def test_a_model_missing_from_the_cache_fails_validation_in_one_line(hub, tmp_path):
    shutil.rmtree(hub / "models--google--flan-t5-base")
    config = tmp_path / "guide.toml"
    config.write_text(guide_configs()[2])
    result = CliRunner().invoke(main, ["config", "validate", str(config)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "generator.model" in result.output and "google/flan-t5-base" in result.output
