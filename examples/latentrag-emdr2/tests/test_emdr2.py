"""The example plugin passes latentrag's conformance checks and plugs into the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from latentrag_emdr2 import Emdr2Config, Emdr2Estimator

from latentrag.core.config import resolve
from latentrag.core.types import Batch
from latentrag.testing.checks import check_config_round_trip, check_estimator, toy_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_conformance():
    check_config_round_trip(Emdr2Config())
    check_estimator(lambda: Emdr2Estimator(Emdr2Config(k=4)))


def test_retriever_gradient_treats_reader_likelihoods_as_constants():
    pipeline, examples = toy_pipeline()
    batch = Batch(examples[:2])
    estimator = Emdr2Estimator(Emdr2Config(k=5, reader_weight=0.0))
    estimator.loss(batch, pipeline).loss.backward()
    ours = pipeline.retriever.table.grad.clone()
    assert pipeline.generator.logits.grad is None or pipeline.generator.logits.grad.abs().sum() == 0

    pipeline.retriever.table.grad = None
    cand = pipeline.candidates(batch, "prior", 5)
    with torch.no_grad():
        reader = pipeline.loglik(batch, cand)
    log_prior = pipeline.prior_logprobs(batch, cand, 0.1)
    (-torch.logsumexp(log_prior + reader, -1).mean()).backward()
    torch.testing.assert_close(ours, pipeline.retriever.table.grad)


def test_config_names_it_next_to_builtins():
    resolved = resolve(
        {
            "retriever": {"name": "bm25"},
            "generator": {"name": "hf-causal-lm", "model": "tiny-llama"},
            "estimator": {"name": "emdr2", "k": 3},
        }
    )
    spec, cfg = resolved.component("estimator")
    assert (spec.plugin, cfg.k) == ("emdr2", 3)


def test_listed_by_latentrag_components():
    out = subprocess.run(
        [sys.executable, "-m", "latentrag.cli", "components"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if " emdr2 " in x)
    assert line.startswith("estimator") and "emdr2" in line.split()[2]


def test_sweep_grid_includes_it_beside_builtin_estimators(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[data]\nsource = "toy"\n[retriever]\nname = "bow"\n'
        '[generator]\nname = "hf-causal-lm"\nmodel = "tiny-llama"\n'
        '[estimator]\nname = "topk"\nk = 3\n[train]\nsteps = 2\nbatch_size = 2\n'
        "[eval]\nrecall_at = [1, 3]\nmax_new_tokens = 2\n"
    )
    out = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "latentrag.cli", "sweep", str(config),
         "--grid", "estimator.name=topk,emdr2", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    csv = (out / "results.csv").read_text()
    assert "emdr2" in csv and "topk" in csv
    assert "failed" not in csv
