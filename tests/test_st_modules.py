"""A sentence-transformers folder is read whole: Transformer, Pooling in each of its modes,
Dense, Normalize, max_seq_length and named prompts. Tiny models saved with
sentence-transformers' own `save()` give the vectors `SentenceTransformer.encode` gives;
what this package cannot load fails with one line naming the model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers import BertTokenizer

from latentrag.cli import main
from latentrag.core.errors import ConfigError
from latentrag.core.types import Corpus, Passage
from latentrag.plugins.dpr import DPRConfig
from latentrag.plugins.dpr.retriever import DPRRetriever
from latentrag.plugins.encoders import load_sentence_encoder, tiny_random_bert, tiny_vocab
from latentrag.plugins.st_layout import read_layout

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules import Dense, Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

PROMPTS = {"query": "query: ", "passage": "passage: "}
PASSAGES = [
    "paris is the capital of france",
    "the nile is a river in africa",
    "a short one",
    "the war of the year was long and the city was the capital of the state " * 3,
]
QUERIES = ["what is the capital of france", "which river", "war"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT (transformers format) the sentence-transformers models are built on."""
    directory = tmp_path_factory.mktemp("bert")
    model, tokenizer = tiny_random_bert(seed=7)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_st(
    directory: Path,
    bert_dir: Path,
    pooling="mean",
    dense: list[Dense] | None = None,
    normalize: bool = True,
    max_seq_length: int | None = 64,
    **options,
) -> st.SentenceTransformer:
    modules = [Transformer(str(bert_dir), max_seq_length=max_seq_length)]
    modules.append(Pooling(32, pooling_mode=pooling))
    modules += dense or []
    modules += [Normalize()] if normalize else []
    model = st.SentenceTransformer(modules=modules, device="cpu", prompts=PROMPTS, **options)
    model.save(str(directory))
    return model


def dense(in_features: int, out_features: int, activation: nn.Module, seed: int = 0) -> Dense:
    torch.manual_seed(seed)
    return Dense(in_features, out_features, activation_function=activation)


def max_diff(ours: torch.Tensor, theirs) -> float:
    return (ours - torch.as_tensor(theirs)).abs().max().item()


def corpus() -> Corpus:
    return Corpus(Passage(id=f"p{i}", text=text) for i, text in enumerate(PASSAGES))


MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


@pytest.mark.parametrize("pooling", [*MODES, ("cls", "mean", "max")])
def test_vectors_and_prompts_equal_sentence_transformers(tmp_path, bert_dir, pooling):
    width = 32 * (1 if isinstance(pooling, str) else len(pooling))
    model = save_st(tmp_path, bert_dir, pooling, [dense(width, 16, nn.Tanh())])
    config = DPRConfig(
        model=str(tmp_path),
        query_prompt_name="query",
        passage_prompt_name="passage",
        precision="float32",
    )
    retriever = DPRRetriever(config)
    retriever.index(corpus())
    assert retriever.passage_encoder.dim == 16 and retriever.passage_encoder.normalize

    expected = model.encode(PASSAGES, prompt_name="passage", convert_to_tensor=True)
    passage_diff = max_diff(retriever._vectors, expected)
    queries = retriever.query_encoder.encode(retriever._query_texts(QUERIES))
    expected_queries = model.encode(QUERIES, prompt_name="query", convert_to_tensor=True)
    query_diff = max_diff(queries, expected_queries)
    # one text per batch: no padding here, padding in sentence-transformers' batch
    unpadded = retriever.query_encoder.encode(PASSAGES, batch_size=1)
    plain_diff = max_diff(unpadded, model.encode(PASSAGES))
    print(f"{pooling}: max |diff| passages {passage_diff:.1e} queries {query_diff:.1e}")
    assert max(passage_diff, query_diff, plain_diff) < ATOL
    # the prompts changed the vectors, and the differentiable path gives the same numbers
    assert max_diff(queries, model.encode(QUERIES, convert_to_tensor=True)) > 1e-3
    with torch.no_grad():
        embedded = retriever.query_encoder.embed(retriever._query_texts(QUERIES))
    assert max_diff(embedded, expected_queries) < ATOL


def test_dense_stack_with_residual_and_gelu(tmp_path, bert_dir):
    torch.manual_seed(3)
    layers = [dense(32, 32, nn.GELU(), seed=1), dense(32, 8, nn.Identity(), seed=2)]
    layers[0].use_residual = True  # config key use_residual, saved when not default
    model = save_st(tmp_path, bert_dir, "mean", layers, normalize=False)
    encoder = load_sentence_encoder(str(tmp_path))
    assert not encoder.normalize and encoder.dim == 8
    assert [m.activation_name for m in encoder.head] == ["GELU", "Identity"]
    assert max_diff(encoder.encode(PASSAGES), model.encode(PASSAGES)) < ATOL
    assert encoder.settings()["head"] == ["GELU", "Identity"]


def test_dense_is_differentiable(tmp_path, bert_dir):
    save_st(tmp_path, bert_dir, "mean", [dense(32, 16, nn.Tanh())])
    encoder = load_sentence_encoder(str(tmp_path)).train()
    encoder.embed(QUERIES).sum().backward()
    grads = [p.grad for p in encoder.head[0].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    clone = encoder.clone()
    assert clone.head[0].linear.weight is not encoder.head[0].linear.weight
    torch.testing.assert_close(clone.head[0].linear.weight, encoder.head[0].linear.weight)


def test_max_seq_length_is_the_default_max_length(tmp_path, bert_dir):
    model = save_st(tmp_path, bert_dir, "mean", max_seq_length=16)
    long_text = [PASSAGES[-1]]
    encoder = load_sentence_encoder(str(tmp_path))
    assert encoder.max_length == 16
    assert max_diff(encoder.encode(long_text), model.encode(long_text)) < ATOL
    longer = load_sentence_encoder(str(tmp_path), max_length=64)
    assert max_diff(longer.encode(long_text), model.encode(long_text)) > 1e-3
    config = DPRConfig(model=str(tmp_path), precision="float32")
    assert DPRRetriever(config).passage_encoder.settings()["max_length"] == 16
    assert DPRRetriever(config.model_copy(update={"max_length": 64})).query_encoder.max_length == 64
    # the sentence_bert_config.json key of sentence-transformers < 5
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 12}')
    assert read_layout(str(tmp_path)).max_length == 12
    legacy = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert legacy.max_seq_length == 12
    assert (
        max_diff(load_sentence_encoder(str(tmp_path)).encode(long_text), legacy.encode(long_text))
        < ATOL
    )


def test_a_model_without_a_max_length_or_normalize_gets_the_defaults(bert_dir):
    encoder = load_sentence_encoder(str(bert_dir))  # plain transformers: mean, not normalised
    assert (encoder.max_length, encoder.normalize, encoder.pooling) == (128, False, "mean")
    model = st.SentenceTransformer(str(bert_dir), device="cpu")  # its own reading of it
    model.max_seq_length = 128
    assert max_diff(encoder.encode(PASSAGES), model.encode(PASSAGES)) < ATOL
    tiny = load_sentence_encoder("tiny-random")
    assert (tiny.max_length, tiny.normalize) == (128, True)


def test_normalize_overrides_what_the_model_declares(tmp_path, bert_dir):
    save_st(tmp_path, bert_dir, "mean", [dense(32, 16, nn.Tanh())])
    declared = load_sentence_encoder(str(tmp_path)).encode(PASSAGES)
    raw = load_sentence_encoder(str(tmp_path), normalize=False).encode(PASSAGES)
    assert (raw.norm(dim=-1) - 1).abs().max() > 1e-2
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), declared)
    plain = load_sentence_encoder(str(bert_dir), normalize=True).encode(PASSAGES)
    torch.testing.assert_close(plain.norm(dim=-1), torch.ones(len(PASSAGES)))


def test_the_default_prompt_applies_unless_a_prefix_or_prompt_is_given(tmp_path, bert_dir):
    model = save_st(tmp_path, bert_dir, "mean", default_prompt_name="query")
    retriever = DPRRetriever(DPRConfig(model=str(tmp_path), precision="float32"))
    assert (retriever.query_prefix, retriever.passage_prefix) == ("query: ", "query: ")
    retriever.index(corpus())
    assert max_diff(retriever._vectors, model.encode(PASSAGES)) < ATOL  # ST's default too
    config = DPRConfig(model=str(tmp_path), passage_prompt_name="", query_prefix="q: ")
    assert config.prefixes() == ("q: ", "")


def test_prompt_names_are_checked_against_the_model(tmp_path, bert_dir):
    save_st(tmp_path, bert_dir, "mean")
    with pytest.raises(
        ValueError,
        match="has no prompt 'question' \\(its prompts: 'document', 'passage', 'query'\\)",
    ):
        DPRConfig(model=str(tmp_path), query_prompt_name="question")
    with pytest.raises(ValueError, match="either query_prefix or query_prompt_name"):
        DPRConfig(model=str(tmp_path), query_prompt_name="query", query_prefix="q: ")
    with pytest.raises(ValueError, match="has no prompt 'query' \\(its prompts: none\\)"):
        DPRConfig(model="tiny-random", query_prompt_name="query")


def test_include_prompt_false_with_a_prompt_is_refused(tmp_path, bert_dir):
    save_st(tmp_path, bert_dir, "mean")
    pooling = tmp_path / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "include_prompt": False}))
    DPRRetriever(DPRConfig(model=str(tmp_path)))  # without a prompt it changes nothing
    with pytest.raises(ConfigError, match="include_prompt = false"):
        DPRRetriever(DPRConfig(model=str(tmp_path), query_prompt_name="query"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: edit_json(
                d / "modules.json",
                lambda m: m.append({"path": "", "type": "my_package.Whitening"}),
            ),
            "unsupported sentence-transformers module type 'my_package.Whitening'",
        ),
        (
            lambda d: edit_json(
                d / "modules.json",
                lambda m: m.insert(
                    2, {"path": "", "type": "sentence_transformers.models.LayerNorm"}
                ),
            ),
            "unsupported sentence-transformers module type 'sentence_transformers.models.Layer",
        ),
        (
            lambda d: edit_json(
                d / "2_Dense" / "config.json",
                lambda c: c.update(activation_function="my_package.Swish"),
            ),
            "unsupported Dense activation_function 'my_package.Swish'",
        ),
        (
            lambda d: edit_json(
                d / "1_Pooling" / "config.json", lambda c: c.update(pooling_mode="median")
            ),
            "unsupported pooling mode 'median'",
        ),
    ],
)
def test_what_cannot_be_loaded_fails_in_one_line(tmp_path, bert_dir, edit, message):
    folder = tmp_path / "model"
    save_st(folder, bert_dir, "mean", [dense(32, 16, nn.Tanh())])
    edit(folder)
    with pytest.raises(ConfigError) as error:
        load_sentence_encoder(str(folder))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"model {str(folder)!r}: ")
    # and `config validate` says so, exit 2, before anything loads
    path = tmp_path / "c.toml"
    path.write_text(f'[data]\nsource = "toy"\n[retriever]\nname = "dpr"\nmodel = "{folder}"\n')
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert (
        result.output.startswith(f"error: {path}: retriever.model: ") and message in result.output
    )


def test_do_lower_case_lowercases_before_tokenizing(tmp_path, bert_dir):
    cased = tmp_path / "cased"
    model, _ = tiny_random_bert(seed=7)
    model.save_pretrained(cased)
    BertTokenizer(vocab=tiny_vocab(), do_lower_case=False).save_pretrained(cased)
    folder = tmp_path / "model"
    save_st(folder, cased, "mean")
    (folder / "sentence_bert_config.json").write_text(
        '{"max_seq_length": 32, "do_lower_case": true}'  # sentence-transformers < 5
    )
    encoder = load_sentence_encoder(str(folder))
    texts = ["PARIS is the Capital", "The NILE"]
    assert encoder.settings()["lowercase"] is True
    assert max_diff(encoder.encode(texts), encoder.encode([t.lower() for t in texts])) < ATOL
    expected = st.SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert max_diff(encoder.encode(texts), expected) < ATOL
    unlowered = load_sentence_encoder(str(cased))
    assert max_diff(unlowered.encode(texts), unlowered.encode([t.lower() for t in texts])) > 1e-3
