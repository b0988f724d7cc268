"""The `hf-seq2seq` generator (tiny T5): the generator contract, training from config with
topk / jsa / gumbel, Fusion-in-Decoder equal to a hand-computed FiD, G-Rerank over FiD
learning the key -> code task, and G-Rerank inference reading the hard top-k passages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import random
from collections.abc import Sequence

import pytest
import torch
from test_gumbel_rerank import BowPlugin, KeyCodeModel, KeyCodeTask, pretrain_copying_generator
from torch import Tensor

from latentrag.core.config import resolve
from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import default_registry
from latentrag.core.types import Batch, Candidates, Corpus, Example, Passage
from latentrag.plugins.gumbel_rerank import GumbelEstimatorConfig, GumbelRerankConfig
from latentrag.plugins.gumbel_rerank.estimator import GumbelEstimator
from latentrag.plugins.gumbel_rerank.reranker import GumbelReranker
from latentrag.plugins.hf_generator import HFGeneratorConfig
from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator
from latentrag.plugins.hf_seq2seq import HFSeq2SeqConfig
from latentrag.plugins.hf_seq2seq.generator import HFSeq2SeqGenerator
from latentrag.plugins.joint_attention import LOG_ZERO
from latentrag.testing import toy_corpus, toy_examples
from latentrag.testing.checks import check_generator
from latentrag.toy.tiny_models import tiny_t5, tiny_tokenizer
from latentrag.training.loop import Trainer


@pytest.fixture
def bow_registered():
    with default_registry().registered(BowPlugin(), "test-seq2seq-bow"):
        yield


def seq2seq(**options) -> HFSeq2SeqGenerator:
    return HFSeq2SeqGenerator(HFSeq2SeqConfig(**options))


def test_tiny_t5_passes_the_generator_checks(one_thread):
    check_generator(lambda: seq2seq(model="tiny-t5"))


def test_unknown_model_is_refused_by_the_config():
    with pytest.raises(
        ValueError, match="neither one of .tiny-t5., a local folder nor a Hugging Face id"
    ):
        HFSeq2SeqConfig(model="no-such-t5")


BASE = {
    "data": {"source": "toy"},
    "retriever": {"name": "bow"},
    "generator": {"name": "hf-seq2seq", "model": "tiny-t5"},
    "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "seed": 0},
}
ESTIMATORS = {
    "topk": {"estimator": {"name": "topk", "k": 3}},
    "topk-token": {"estimator": {"name": "topk-token", "k": 3}},
    "jsa": {"posterior": {"name": "bow"}, "estimator": {"name": "jsa", "k": 3}},
    "gumbel": {
        "reranker": {
            "name": "gumbel",
            "k": 1,
            "inner": {"name": "cross-encoder", "model": "tiny-random", "max_length": 48},
        },
        "estimator": {"name": "gumbel", "k": 3, "k_keep": 1, "train_generator": True},
    },
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_train_the_seq2seq_generator_from_config(tmp_path, name, one_thread):
    resolved = resolve({**BASE, **ESTIMATORS[name]}, source="seq2seq.toml")
    pipeline = Pipeline.from_config(resolved, toy_corpus())
    before = {n: p.detach().clone() for n, p in pipeline.generator.model.named_parameters()}
    trainer = Trainer(pipeline, resolved, toy_examples(), out_dir=tmp_path, progress=False)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3
    assert losses and all(math.isfinite(v) for v in losses)
    changed = [
        n for n, p in pipeline.generator.model.named_parameters() if not torch.equal(p, before[n])
    ]
    assert len(changed) > 0.5 * len(before)


# -- Fusion-in-Decoder against a hand computation ------------------------------------------


def hand_fid(generator: HFSeq2SeqGenerator, query: str, passages: list[str], target: str):
    """One example, no padding anywhere: encode each "question + passage" alone, put the
    encodings one after the other, decode the answer + EOS, sum its log-probabilities."""
    model, tokenizer = generator.model, generator.tokenizer
    encodings = []
    for passage in passages:
        text = generator.config.template.format(question=query, passage=passage)
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        encodings.append(model.get_encoder()(input_ids=ids).last_hidden_state)
    fused = torch.cat(encodings, dim=1)
    labels = torch.tensor([tokenizer(target, add_special_tokens=False)["input_ids"] + [2]])
    assert tokenizer.eos_token_id == 2
    logits = model(encoder_outputs=(fused,), labels=labels).logits
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()


def test_fid_loss_equals_the_hand_computed_one(one_thread):
    generator = seq2seq(model="tiny-t5")
    corpus, examples = toy_corpus(), toy_examples()[:3]
    queries, targets = [e.question for e in examples], [e.target for e in examples]
    passages = [[corpus[i].text, corpus[i + 3].title, corpus[i + 6].text] for i in range(3)]
    with torch.no_grad():
        got = generator.loglik_joint(queries, passages, targets, torch.zeros(3, 3))
        expected = torch.stack(
            [hand_fid(generator, *row) for row in zip(queries, passages, targets)]
        )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # the hard mask: reading only the kept passages, the others dropped by hand
        keep = torch.tensor([[True, False, True], [False, True, False], [True, True, False]])
        masked = generator.loglik_joint(
            queries, passages, targets, torch.where(keep, 0.0, LOG_ZERO)
        )
        kept = [[p for p, k in zip(row, ks) if k] for row, ks in zip(passages, keep.tolist())]
        by_hand = torch.stack([hand_fid(generator, *row) for row in zip(queries, kept, targets)])
        torch.testing.assert_close(masked, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(masked, got, atol=1e-3)  # the mask did change the loss


# -- G-Rerank over a FiD reader: the key -> code task --------------------------------------

KEY_TEMPLATE = "question {question} key {passage}"


class KeyCodeFiD:
    """The part of `LatentModel` the estimator uses, over a tiny T5 reading FiD style."""

    def __init__(self, task: KeyCodeTask, reranker, generator: HFSeq2SeqGenerator) -> None:
        self.task, self.reranker, self.generator = task, reranker, generator
        self.generator_forwards = 0

    def candidates(self, batch: Batch, source: str, k: int) -> Candidates:
        rows = torch.tensor([self.task.rows[e.id][0][:k] for e in batch.examples])
        return Candidates(rows, torch.zeros(rows.shape))

    def passages(self, candidates: Candidates) -> list[list[str]]:
        return [[self.task.passages[r] for r in row] for row in candidates.indices.tolist()]

    def rerank_scores(self, batch: Batch, candidates: Candidates) -> Tensor:
        return self.reranker.score(batch.questions, self.passages(candidates))

    def joint_loglik(self, batch: Batch, candidates: Candidates, doc_log_mask: Tensor) -> Tensor:
        self.generator_forwards += len(batch)
        passages = self.passages(candidates)
        return self.generator.loglik_joint(batch.questions, passages, batch.targets, doc_log_mask)


def key_code_reader(task: KeyCodeTask, steps: int = 150) -> HFSeq2SeqGenerator:
    """A tiny T5 (its vocabulary covers the task) that copies the code of the one passage
    it can see (gold only), then frozen."""
    config = HFSeq2SeqConfig(model="tiny-t5", template=KEY_TEMPLATE)
    generator = HFSeq2SeqGenerator(config)
    tokenizer = tiny_tokenizer([*task.KEYS, *task.CODES, "key", "code"])
    generator.tokenizer = tokenizer
    generator.model = tiny_t5(tokenizer, hidden=64, heads=4, seed=0).train()
    optimizer = torch.optim.Adam(generator.model.parameters(), lr=3e-3)
    rng = random.Random(0)
    oracle = KeyCodeFiD(task, None, generator)
    for _ in range(steps):
        batch = task.batch(rng, 16)
        log_mask = torch.full((16, task.k), LOG_ZERO)
        log_mask[torch.arange(16), task.gold(batch)] = 0.0
        loss = -oracle.joint_loglik(batch, oracle.candidates(batch, "prior", task.k), log_mask)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    generator.model.zero_grad(set_to_none=True)
    generator.model.eval().requires_grad_(False)
    return generator


def gold_first_rate(model: KeyCodeFiD, batch: Batch) -> float:
    with torch.no_grad():
        scores = model.rerank_scores(batch, model.candidates(batch, "prior", model.task.k))
    return float((scores.argmax(-1) == model.task.gold(batch)).float().mean())


def test_grerank_on_t5_learns_to_find_the_gold_passage_from_the_lm_loss_alone(
    bow_registered, one_thread
):
    task = KeyCodeTask(k=4)
    generator = key_code_reader(task)
    reranker = GumbelReranker(GumbelRerankConfig(inner="test-bow", k=1))
    model = KeyCodeFiD(task, reranker, generator)
    held_out = task.batch(random.Random(123), 200)
    before = gold_first_rate(model, held_out)
    assert before <= 0.4  # about 1/K

    estimator = GumbelEstimator(GumbelEstimatorConfig(k=4, k_keep=1, tau=0.5, seed=0))
    params = [p for m in reranker.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    rng = random.Random(1)
    for _ in range(30):
        out = estimator.loss(task.batch(rng, 16), model)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in generator.model.parameters())  # frozen
    after = gold_first_rate(model, held_out)
    print(f"G-Rerank over FiD-T5, key-code task: gold first {before:.3f} -> {after:.3f}")
    assert after >= 0.9


# -- G-Rerank inference reads the way training reads ----------------------------------------


class FixedPrior(Retriever):
    """A prior that ranks each question's passages in a fixed order (a test double)."""

    def __init__(self, order: dict[str, list[int]]) -> None:
        self.order = order

    def index(self, corpus: Corpus) -> None:
        pass

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        rows = torch.tensor([self.order[q][:k] for q in queries])
        scores = torch.arange(rows.shape[1], 0, -1).float().expand(rows.shape)
        return Candidates(rows, scores.clone())


def second_ranked_gold(task: KeyCodeTask) -> tuple[Corpus, FixedPrior, Batch]:
    """One question per key whose gold passage the prior ranks 2nd, after a passage with
    another code (every code in a row differs, so reading the 1st is never right)."""
    passages, order, examples = [], {}, []
    for i, key in enumerate(task.KEYS[:8]):
        keys = [task.KEYS[(i + j) % len(task.KEYS)] for j in (1, 0, 5, 7)]  # gold 2nd
        codes = [task.CODES[(i + j) % len(task.CODES)] for j in range(4)]
        order[key] = list(range(len(passages), len(passages) + 4))
        passages += [f"{k} code {c}" for k, c in zip(keys, codes)]
        examples.append(Example(f"q{i}", key, (codes[1],)))
    corpus = Corpus(Passage(f"p{r}", text) for r, text in enumerate(passages))
    return corpus, FixedPrior(order), Batch(examples)


def train_reranker(task: KeyCodeTask, model, steps: int = 30) -> GumbelEstimator:
    estimator = GumbelEstimator(GumbelEstimatorConfig(k=4, k_keep=1, tau=0.5, seed=0))
    params = [p for m in model.reranker.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.05)
    rng = random.Random(1)
    for _ in range(steps):
        out = estimator.loss(task.batch(rng, 16), model)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return estimator


def causal_key_code_reader(task: KeyCodeTask):
    """The decoder-only test's copying tiny Llama, as an hf-causal-lm generator whose
    template splits into that test's joint prompt; the wrapper to train its reranker."""
    tokenizer = tiny_tokenizer([*task.KEYS, *task.CODES, "key", "code"])
    config = HFGeneratorConfig(
        model="tiny-llama",
        prompt_template="key {passage} question {question} answer",
        passage_cache_mb=0,
    )
    generator = HFCausalLMGenerator(config)
    generator.model = pretrain_copying_generator(task, tokenizer)
    generator.tokenizer = tokenizer
    return generator, lambda reranker: KeyCodeModel(task, reranker, generator.model, tokenizer)


def fid_key_code_reader(task: KeyCodeTask):
    generator = key_code_reader(task)
    return generator, lambda reranker: KeyCodeFiD(task, reranker, generator)


@pytest.mark.parametrize("reader", [fid_key_code_reader, causal_key_code_reader])
def test_grerank_inference_reads_the_second_ranked_passage_through_the_hard_mask(
    bow_registered, one_thread, reader
):
    task = KeyCodeTask(k=4)
    generator, training_model = reader(task)
    reranker = GumbelReranker(GumbelRerankConfig(inner="test-bow", k=1))
    estimator = train_reranker(task, training_model(reranker))
    corpus, prior, batch = second_ranked_gold(task)
    codes = [e.target for e in batch.examples]

    plain = Pipeline(corpus, prior, generator)
    plain.index()
    assert not plain.reads_jointly
    top1 = plain.predict(batch, passages=1, max_new_tokens=1)
    grerank = Pipeline(corpus, prior, generator, reranker=reranker, estimator=estimator)
    grerank.index()
    assert grerank.reads_jointly
    joint = grerank.predict(batch, passages=1, max_new_tokens=1)
    top1_em = sum(a == c for a, c in zip(top1, codes)) / len(codes)
    joint_em = sum(a == c for a, c in zip(joint, codes)) / len(codes)
    print(f"2nd-ranked gold: EM top-1 reading {top1_em:.2f}, G-Rerank hard top-k {joint_em:.2f}")
    assert joint_em == 1.0
    assert top1_em == 0.0
    joint_reads = []
    read_jointly = generator.generate_joint
    generator.generate_joint = lambda *args: joint_reads.append(args[2]) or read_jointly(*args)
    answer = grerank.answer(batch.examples[0].question, max_new_tokens=1)
    assert len(joint_reads) == 1 and joint_reads[0].shape == (1, 4)  # all K under the mask
    assert answer.text == codes[0]  # `latentrag ask` reads as predict does
    gold_row = prior.order[batch.examples[0].question][1]
    assert [p.id for p in answer.passages] == [corpus[gold_row].id]  # what the mask kept
    assert plain.answer(batch.examples[0].question, max_new_tokens=1).text != codes[0]


def test_joint_generation_of_one_unmasked_passage_is_ordinary_generation(one_thread):
    corpus, examples = toy_corpus(), toy_examples()[:3]
    queries = [e.question for e in examples]
    passages = [[corpus[i].text] for i in range(3)]
    t5 = seq2seq(model="tiny-t5")
    texts = [t5.config.template.format(question=q, passage=p[0]) for q, p in zip(queries, passages)]
    encoded = t5.tokenizer(texts, padding=True, return_tensors="pt")
    out = t5.model.generate(**encoded, max_new_tokens=5, do_sample=False)
    expected = [a.strip() for a in t5.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert t5.generate_joint(queries, passages, torch.zeros(3, 1), 5) == expected
    causal = HFCausalLMGenerator(HFGeneratorConfig(model="tiny-llama", passage_cache_mb=0))
    expected = causal.generate(queries, passages, 5)
    assert causal.generate_joint(queries, passages, torch.zeros(3, 1), 5) == expected
    assert any(expected)  # something was generated


def test_a_t5_in_the_local_hub_cache_loads_by_id_and_a_missing_id_is_one_line(
    tmp_path, monkeypatch
):
    from test_hf_ids import save_to_hub_cache

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    tokenizer = tiny_tokenizer()
    save_to_hub_cache(cache, "tiny-org/tiny-t5", tiny_t5(tokenizer, seed=3), tokenizer)
    generator = seq2seq(model="tiny-org/tiny-t5")
    saved = tiny_t5(tokenizer, seed=3).state_dict()
    loaded = generator.model.state_dict()
    assert set(saved) == set(loaded) and all(loaded[k].equal(saved[k]) for k in saved)
    with pytest.raises(ValueError, match="'tiny-org/absent' is not in the Hugging Face cache"):
        HFSeq2SeqConfig(model="tiny-org/absent")
