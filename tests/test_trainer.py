import json
import os
import random
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from latentrag import hookimpl
from latentrag.core.config import (
    ComponentSection,
    PipelineConfig,
    ResolvedConfig,
    StrictModel,
    TrainConfig,
    resolve,
)
from latentrag.core.errors import ConfigError
from latentrag.core.interfaces import Estimator, EstimatorOutput, Generator, Retriever
from latentrag.core.pipeline import Pipeline
from latentrag.core.registry import Registry
from latentrag.core.types import Candidates
from latentrag.testing import toy_corpus, toy_examples
from latentrag.training.checkpoint import list_checkpoints, read_checkpoint
from latentrag.training.determinism import DataOrder
from latentrag.training.errors import TrainingError
from latentrag.training.loop import Trainer

BUCKETS = 97


def token_ids(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % BUCKETS for w in text.lower().split()] or [0]


def bags(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [token_ids(t) for t in texts]
    offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
    return torch.tensor([t for i in ids for t in i]), offsets


class ToyRetriever(Retriever, nn.Module):
    """Dual bag-of-embeddings encoder with dropout (so training uses the torch RNG)."""

    def __init__(self, dim: int = 16, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.query = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.passage = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.dropout = nn.Dropout(dropout)
        self.texts: list[str] = []
        self.refreshes = 0

    def trainable_modules(self):
        return {"query": self.query, "passage": self.passage}

    def index(self, corpus):
        self.texts = corpus.texts()

    def refresh(self):
        self.refreshes += 1

    def score(self, queries, passage_rows):
        q = self.dropout(self.query(*bags(list(queries))))
        rows = passage_rows.reshape(-1).tolist()
        p = self.passage(*bags([self.texts[r] for r in rows])).view(*passage_rows.shape, -1)
        return torch.einsum("bd,bkd->bk", q, p)

    def retrieve(self, queries, k):
        rows = torch.arange(len(self.texts)).expand(len(queries), -1)
        scores = self.score(queries, rows)
        top = scores.topk(min(k, len(self.texts)), dim=-1)
        return Candidates(rows.gather(1, top.indices), top.values)


class ToyGenerator(Generator, nn.Module):
    """log p(y|x,h) = logsigmoid(sum of weights of (passage word, answer word) pairs)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.head = nn.EmbeddingBag(BUCKETS, 1, mode="sum")

    def trainable_modules(self):
        return {"head": self.head}

    def loglik(self, queries, passages, targets, reduce="sum"):
        pairs = [
            " ".join(f"{p}:{t}" for p in passage.split()[:6] for t in target.split())
            for row, target in zip(passages, targets)
            for passage in row
        ]
        logits = self.head(*bags(pairs)).view(len(passages), -1)
        return nn.functional.logsigmoid(logits)

    def token_logprobs(self, queries, passages, targets):
        raise NotImplementedError

    def generate(self, queries, passages, max_new_tokens=16):
        return [row[0].split()[-1] for row in passages]


class ToyEstimator(Estimator):
    """Exact marginal likelihood over the whole corpus, a mean over examples.

    noise: multiplies each example's loss by a random weight drawn from python, numpy and
    torch (so resume must restore all three RNGs). nan_at: the call that returns NaN.
    poison: a role whose gradient is made infinite while the loss stays finite.
    """

    def __init__(self, trains=("retriever", "generator"), noise=False, nan_at=None, poison=None):
        self.trains = tuple(trains)
        self.noise = noise
        self.nan_at = nan_at
        self.poison = poison
        self.calls = 0

    def loss(self, batch, model):
        self.calls += 1
        candidates = model.candidates(batch, "corpus", 0)
        joint = model.prior_logprobs(batch, candidates)
        if model.generator is not None:
            joint = joint + model.loglik(batch, candidates)
        per_example = -torch.logsumexp(joint, dim=-1)
        diagnostics = {"acceptance_rate": 0.5}
        if self.noise:
            weight = 1 + 0.1 * torch.rand(len(batch)) + random.random() + np.random.rand()
            per_example = per_example * weight
            diagnostics["acceptance_rate"] = float(torch.rand(()))
        loss = per_example.mean()
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        if self.poison:
            module = next(iter(model.roles()[self.poison].trainable_modules().values()))
            total = sum(p.sum() for p in module.parameters())
            loss = loss + torch.sqrt(total - total.detach())  # value 0, gradient inf
        return EstimatorOutput(loss, diagnostics, generator_forwards=len(batch))

    def extra_state(self):
        return {"calls": self.calls}

    def load_extra_state(self, state):
        self.calls = state["calls"]


def make_pipeline(seed=0, generator=True, dropout=0.0, **estimator):
    torch.manual_seed(seed)
    retriever = ToyRetriever(dropout=dropout)
    gen = ToyGenerator() if generator else None
    pipeline = Pipeline(toy_corpus(), retriever, gen, estimator=ToyEstimator(**estimator))
    pipeline.index()
    return pipeline


def config(**train) -> ResolvedConfig:
    """A resolved config for the hand-built pipelines below (no component to resolve)."""
    defaults = {"steps": 4, "batch_size": 4, "lr": 0.05, "seed": 0}
    settings = PipelineConfig(
        retriever=ComponentSection(name="toy"), train=TrainConfig(**(defaults | train))
    )
    return ResolvedConfig(settings, components={})


def params(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{role}.{prefix}.{name}": p.detach().clone()
        for role, c in pipeline.roles().items()
        for prefix, m in c.trainable_modules().items()
        for name, p in m.named_parameters()
    }


def metric_lines(path, drop=("wall_s",)):
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in drop} for line in lines]


def train(tmp_path, pipeline, examples=None, dev=None, resume=False, **settings):
    trainer = Trainer(
        pipeline, config(**settings), examples or toy_examples(), dev, tmp_path, progress=False
    )
    return trainer, trainer.train(resume=resume)


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(5, seed=3)
    first = order.take(5)
    assert sorted(first) == [0, 1, 2, 3, 4]
    assert order.position() == {"epoch": 1, "index": 0}
    second = order.take(3) + order.take(2)
    assert sorted(second) == [0, 1, 2, 3, 4] and second != first
    again = DataOrder(5, seed=3, epoch=1, index=3)
    assert again.take(2) == second[3:]
    assert DataOrder(5, seed=4).take(5) != first


def test_takes_a_resolved_config_only(tmp_path):
    with pytest.raises(TypeError, match="Trainer takes a ResolvedConfig .*not PipelineConfig"):
        Trainer(make_pipeline(), config().pipeline, toy_examples(), out_dir=tmp_path)


def test_a_given_measure_is_what_evaluations_report(tmp_path):
    asked = []

    def measure(pipeline, examples, *, qa):
        asked.append((len(examples), qa, torch.is_grad_enabled()))
        return {"size": float(len(examples))}

    pipeline, dev = make_pipeline(), toy_examples()[:5]
    trainer = Trainer(
        pipeline, config(steps=3, eval_every=2), toy_examples(), dev, tmp_path, measure=measure
    )
    result = trainer.train()
    assert asked == [(5, False, False), (5, True, False)]  # step 2; step 3, the last, answers
    assert result["size"] == 5.0 and trainer.final_metrics == {"size": 5.0}


def test_loss_decreases_on_a_learnable_toy(tmp_path):
    trainer, result = train(tmp_path, make_pipeline(), steps=30, batch_size=6)
    losses = [line["loss"] for line in metric_lines(tmp_path)]
    assert len(losses) == 30 and result["step"] == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_per_component_learning_rates(tmp_path):
    pipeline = make_pipeline()
    trainer = Trainer(
        pipeline,
        config(lrs={"retriever": 0.01, "generator": 0.002}, weight_decay=0.1),
        toy_examples(),
        out_dir=tmp_path,
        progress=False,
    )
    groups = {(g["role"], g["weight_decay"]): g for g in trainer.optimizer.param_groups}
    assert set(groups) == {("retriever", 0.1), ("generator", 0.1)}
    assert groups[("retriever", 0.1)]["lr"] == 0.01 and groups[("generator", 0.1)]["lr"] == 0.002
    prior_params = {id(p) for p in pipeline.retriever.parameters()}
    assert {id(p) for p in groups[("retriever", 0.1)]["params"]} == prior_params
    with pytest.raises(ConfigError, match=r"train.lrs: unknown role 'decoder'"):
        resolve({"retriever": {"name": "bm25"}, "train": {"lrs": {"decoder": 0.1}}})
    with pytest.raises(ConfigError, match="unknown role 'retreiver'; did you mean 'retriever'"):
        resolve({"retriever": {"name": "bm25"}, "train": {"lrs": {"retreiver": 0.1}}})


def test_frozen_roles_get_no_gradient_and_do_not_change(tmp_path):
    pipeline = make_pipeline(trains=("retriever",))
    before = params(pipeline)
    trainer, _ = train(tmp_path, pipeline, steps=2)
    after = params(pipeline)
    for name, param in pipeline.generator.head.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(after[f"generator.head.{name}"], before[f"generator.head.{name}"])
    assert not torch.equal(after["retriever.query.weight"], before["retriever.query.weight"])
    assert [g["role"] for g in trainer.optimizer.param_groups] == ["retriever"]
    assert set(read_checkpoint(tmp_path / "ckpt-2").tensors["model"]) == {
        "retriever.query.weight",
        "retriever.passage.weight",
    }


def grads(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{role}.{prefix}.{name}": p.grad.clone()
        for role, c in pipeline.roles().items()
        for prefix, m in c.trainable_modules().items()
        for name, p in m.named_parameters()
    }


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    # no clipping, so the gradients left after the last step can be compared too (Adam's
    # update alone would hide a wrong scale)
    whole = make_pipeline()
    train(tmp_path / "a", whole, steps=2, batch_size=4, grad_accum=1, max_grad_norm=None)
    split = make_pipeline()
    _, result = train(
        tmp_path / "b", split, steps=2, batch_size=2, grad_accum=2, max_grad_norm=None
    )
    for first, second in ((params(whole), params(split)), (grads(whole), grads(split))):
        assert first.keys() == second.keys()
        for name in first:
            assert torch.allclose(first[name], second[name], atol=1e-6, rtol=0), name
    assert metric_lines(tmp_path / "a")[1]["loss"] == pytest.approx(result["loss"], abs=1e-6)


def test_resume_is_bitwise_identical(tmp_path):
    settings = dict(steps=6, batch_size=5, checkpoint_every=3, eval_every=2)
    dev = toy_examples()[:4]
    reference = make_pipeline(dropout=0.2, noise=True)
    train(tmp_path / "whole", reference, dev=dev, **settings)

    crashing = make_pipeline(dropout=0.2, noise=True)
    crashing.estimator.poison = None
    original_loss = crashing.estimator.loss

    def crash_on_fifth_call(batch, model):
        if crashing.estimator.calls == 4:  # the 5th optimizer step: after step 4 was logged
            raise KeyboardInterrupt
        return original_loss(batch, model)

    crashing.estimator.loss = crash_on_fifth_call
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", crashing, dev=dev, **settings)
    assert [line["step"] for line in metric_lines(tmp_path / "resumed")] == [1, 2, 2, 3, 4, 4]
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [3]

    resumed = make_pipeline(dropout=0.2, noise=True)  # a fresh process, in effect
    _, result = train(tmp_path / "resumed", resumed, dev=dev, resume=True, **settings)
    assert result["step"] == 6
    expected, got = params(reference), params(resumed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert metric_lines(tmp_path / "resumed") == metric_lines(tmp_path / "whole")
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [3, 6]


def test_resume_without_checkpoint_starts_over_and_fresh_run_refuses_old_checkpoints(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint"):
        train(tmp_path, make_pipeline(), steps=1, resume=True)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(tmp_path, make_pipeline(), steps=1)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    pipeline = make_pipeline(nan_at=3)
    with pytest.raises(TrainingError) as info:
        train(tmp_path, pipeline, steps=5, checkpoint_every=1)
    assert str(info.value) == (
        f"step 3: non-finite loss (nan); training stopped (last checkpoint: {tmp_path}/ckpt-2)"
    )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert [line["step"] for line in metric_lines(tmp_path)] == [1, 2]


def test_nonfinite_gradient_names_the_component(tmp_path):
    pipeline = make_pipeline(poison="generator")
    with pytest.raises(TrainingError, match=r"^step 1: non-finite gradient in the generator"):
        train(tmp_path, pipeline, steps=2)


def test_skip_nonfinite_steps(tmp_path):
    pipeline = make_pipeline(nan_at=2)
    trainer, result = train(tmp_path, pipeline, steps=4, on_nonfinite="skip")
    lines = metric_lines(tmp_path)
    assert [line["skipped"] for line in lines] == [False, True, False, False]
    assert lines[1]["loss"] is None and "grad_norm" not in lines[1]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1]
    assert result["skipped_steps"] == 1
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}


def test_keeps_the_last_n_checkpoints(tmp_path):
    trainer = Trainer(
        make_pipeline(),
        config(steps=4, checkpoint_every=1),
        toy_examples(),
        None,
        tmp_path,
        progress=False,
        keep_last=3,
    )
    trainer.train()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 4]


def test_checkpoint_holds_position_rng_and_estimator_state(tmp_path):
    train(tmp_path, make_pipeline(), steps=2, batch_size=5, checkpoint_every=1)
    checkpoint = read_checkpoint(tmp_path / "ckpt-2")
    assert checkpoint.state["position"] == {"epoch": 0, "index": 10}
    assert checkpoint.state["estimator"] == {"calls": 2}
    assert set(checkpoint.state["rng"]) >= {"python", "numpy", "torch"}
    assert any(k.startswith("optim.state.0.") for k in checkpoint.tensors["optimizer"])
    assert (tmp_path / "latest").read_text() == "ckpt-2\n"


def test_eval_and_refresh_happen_on_schedule(tmp_path):
    pipeline = make_pipeline()
    pipeline.posterior = ToyRetriever()
    pipeline.posterior.refresh_every = 3  # a retriever's own interval wins (DPR has one)
    dev = toy_examples()[:3]
    _, result = train(tmp_path, pipeline, dev=dev, steps=4, eval_every=2, refresh_index_every=2)
    assert (pipeline.retriever.refreshes, pipeline.posterior.refreshes) == (2, 1)
    evals = [line for line in metric_lines(tmp_path) if "eval" in line]
    assert [line["step"] for line in evals] == [2, 4]
    ks = (1, 5, 20)
    retrieval = {f"{m}@{k}" for m in ("hit", "recall") for k in ks} | {"mrr@10", "ndcg@10"}
    assert set(evals[0]["eval"]) == retrieval
    assert set(evals[-1]["eval"]) == retrieval | {"em", "f1", "sub_em"}  # the run's result
    assert result["recall@1"] == evals[-1]["eval"]["recall@1"]


def test_trains_a_pipeline_built_from_a_config(tmp_path):
    class ToyPlugin:
        @hookimpl
        def register_components(self, register):
            class Empty(StrictModel):
                pass

            class EstimatorConfig(StrictModel):
                trains: list[str] = ["retriever"]

            register("retriever", "toy", lambda cfg: ToyRetriever(), Empty)
            register("estimator", "toy", lambda cfg: ToyEstimator(cfg.trains), EstimatorConfig)

    registry = Registry().load(builtins=False, entry_points=False)
    with registry.registered(ToyPlugin(), "toy"):
        data = {
            "retriever": {"name": "toy"},
            "estimator": {"name": "toy"},
            "train": {"steps": 3, "lrs": {"prior": 0.1}},
        }
        resolved = resolve(data, registry=registry)
        pipeline = Pipeline.from_config(resolved, toy_corpus())
        trainer = Trainer(pipeline, resolved, toy_examples(), out_dir=tmp_path, progress=False)
        result = trainer.train()
    assert result["step"] == 3
    saved = read_checkpoint(tmp_path / "ckpt-3").state["config"]
    assert saved["train"]["lrs"] == {"retriever": 0.1} and saved["estimator"]["name"] == "toy"


def test_resume_is_bitwise_identical_with_jsa_bow_and_tiny_llama(tmp_path):
    pytest.importorskip("transformers")
    data = {
        "retriever": {"name": "bow", "dim": 16, "buckets": 256},
        "posterior": {"name": "bow", "dim": 16, "buckets": 256, "seed": 1},
        "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
        "estimator": {"name": "jsa", "k": 3, "samples": 2},
        "train": {"steps": 4, "batch_size": 3, "checkpoint_every": 2, "lr": 1e-3},
    }

    def run(out_dir, steps, resume=False):
        resolved = resolve(data | {"train": data["train"] | {"steps": steps}})
        pipeline = Pipeline.from_config(resolved, toy_corpus())
        trainer = Trainer(pipeline, resolved, toy_examples(), out_dir=out_dir, progress=False)
        trainer.train(resume=resume)
        return pipeline

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 2)  # stopped at step 2, then extended to 4
    resumed = run(tmp_path / "resumed", 4, resume=True)
    for role in ("retriever", "posterior", "generator"):
        expected, got = whole.roles()[role].state_dict(), resumed.roles()[role].state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), role
    assert metric_lines(tmp_path / "resumed") == metric_lines(tmp_path / "whole")
    chain = read_checkpoint(tmp_path / "resumed" / "ckpt-4").state["estimator"]
    assert chain == whole.estimator.extra_state()


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    dev = toy_examples()[:3]
    _, first = train(tmp_path, make_pipeline(), dev=dev, steps=2)
    lines = metric_lines(tmp_path, drop=())
    pipeline = make_pipeline(seed=1)
    _, again = train(tmp_path, pipeline, dev=dev, steps=2, resume=True)
    assert metric_lines(tmp_path, drop=()) == lines
    assert again == first
    assert torch.equal(
        pipeline.retriever.query.weight,
        read_checkpoint(tmp_path / "ckpt-2").tensors["model"]["retriever.query.weight"],
    )


def test_warns_when_resume_cannot_match_the_index_refreshes(tmp_path):
    with pytest.warns(UserWarning, match="checkpoint_every=3 is not a multiple"):
        Trainer(
            make_pipeline(),
            config(checkpoint_every=3, refresh_index_every=2),
            toy_examples(),
            out_dir=tmp_path,
        )


def test_resume_is_bitwise_identical_with_a_refreshed_dense_index(tmp_path):
    pytest.importorskip("faiss")
    data = {
        "retriever": {"name": "dpr", "model": "tiny-random", "refresh_every": 1},
        "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
        "estimator": {"name": "topk", "k": 3},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "lr": 1e-2},
    }

    def run(out_dir, steps, resume=False):
        resolved = resolve(data | {"train": data["train"] | {"steps": steps}})
        pipeline = Pipeline.from_config(resolved, toy_corpus())
        trainer = Trainer(pipeline, resolved, toy_examples(), out_dir=out_dir, progress=False)
        trainer.train(resume=resume)
        return pipeline

    whole = run(tmp_path / "whole", 2)
    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 2, resume=True)
    for role in ("retriever", "generator"):
        expected, got = whole.roles()[role].state_dict(), resumed.roles()[role].state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), role
    questions = [e.question for e in toy_examples()]
    assert torch.equal(whole.retrieve(questions, 3).indices, resumed.retrieve(questions, 3).indices)
    assert metric_lines(tmp_path / "resumed") == metric_lines(tmp_path / "whole")


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(tmp_path, make_pipeline(), steps=1)
    with pytest.raises(TrainingError, match=r"ckpt-1 does not fit this run: .*12 examples.* 6"):
        train(tmp_path, make_pipeline(), examples=toy_examples()[:6], steps=2, resume=True)
    with pytest.raises(TrainingError, match=r"ckpt-1 does not fit this run"):
        train(tmp_path, make_pipeline(generator=False), steps=2, resume=True)
