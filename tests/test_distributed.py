"""Data-parallel training under torchrun (gloo on CPU): two processes sharing each global
batch take the same steps as one process reading the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from latentrag.cli import main
from latentrag.testing import toy_examples
from latentrag.training import distributed
from latentrag.training.checkpoint import read_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

CONFIG = """\
[data]
source = "toy"
[retriever]
name = "bow"
dim = 16
buckets = 256
{posterior}
[generator]
name = "hf-causal-lm"
model = "tiny-llama"
[estimator]
{estimator}
[train]
steps = {steps}
batch_size = 4
checkpoint_every = 2
lr = 1e-3
"""
TOPK = 'name = "topk"\nk = 3'
JSA = 'name = "jsa"\nk = 3\nsamples = 2'
POSTERIOR = '[posterior]\nname = "bow"\ndim = 16\nbuckets = 256\nseed = 1'


def write_config(folder: Path, estimator: str, posterior: str = "", steps: int = 4) -> Path:
    path = folder / "config.toml"
    path.write_text(CONFIG.format(estimator=estimator, posterior=posterior, steps=steps))
    return path


def torchrun(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(TORCHRUN), "--nproc_per_node=2", "--standalone", "-m", "latentrag.cli"]
    result = subprocess.run(
        [*command, "train", str(config), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "wall_s"} for line in lines]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    config = write_config(tmp_path, TOPK)
    torchrun(config, tmp_path / "two")
    alone = CliRunner().invoke(main, ["train", str(config), "--out", str(tmp_path / "one")])
    assert alone.exit_code == 0, alone.output

    final = "ckpt-4/model.safetensors"
    one = safetensors.torch.load((tmp_path / "one" / final).read_bytes())
    two = safetensors.torch.load((tmp_path / "two" / final).read_bytes())
    assert one.keys() == two.keys()
    for key in one:
        assert not torch.equal(one[key], torch.zeros_like(one[key])), key
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), key
    # rank 0 alone wrote the log: one line per step (averaged over ranks) and the eval line
    lines_one, lines_two = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two")
    assert [line["step"] for line in lines_two] == [1, 2, 3, 4, 4]
    for a, b in zip(lines_one[:4], lines_two[:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["generator_forwards"] == a["generator_forwards"]  # a total, not a mean
    assert lines_two[-1]["eval"] == pytest.approx(lines_one[-1]["eval"], abs=1e-6)
    state = read_checkpoint(tmp_path / "two" / "ckpt-4").state
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["position"] == {"epoch": 1, "index": 4}  # 16 examples of 12 drawn in all


def test_jsa_chains_stay_whole_on_every_rank_and_resume_is_exact(tmp_path):
    config = write_config(tmp_path, JSA, POSTERIOR, steps=4)
    whole = tmp_path / "whole"
    torchrun(config, whole)
    ranks = read_checkpoint(whole / "ckpt-2").state["ranks"]
    caches = [rank["estimator"]["cache"] for rank in ranks]
    # 2 steps of 4 examples, two per rank: every visited example's chain is on both ranks
    assert len(caches[0]) == 8 and caches[0] == caches[1]
    assert set(caches[0]) <= {e.id for e in toy_examples()}
    assert ranks[0]["estimator"]["rng"] != ranks[1]["estimator"]["rng"]  # own noise per rank
    assert ranks[0]["rng"]["torch"] != ranks[1]["rng"]["torch"]

    # a run stopped after step 2, resumed by two processes, ends as the whole run did
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "ckpt-2", resumed / "ckpt-2")
    shutil.copy(whole / "metrics.jsonl", resumed / "metrics.jsonl")
    torchrun(config, resumed, "--resume")
    for name in ("model.safetensors", "optimizer.safetensors"):
        expected = safetensors.torch.load((whole / "ckpt-4" / name).read_bytes())
        got = safetensors.torch.load((resumed / "ckpt-4" / name).read_bytes())
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    states = [read_checkpoint(run / "ckpt-4").state for run in (whole, resumed)]
    assert states[0]["ranks"] == states[1]["ranks"]
    assert metric_lines(resumed) == metric_lines(whole)


def test_batch_must_divide_among_the_processes(tmp_path, monkeypatch):
    config = write_config(tmp_path, TOPK)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    result = CliRunner().invoke(
        main, ["train", str(config), "--out", str(tmp_path / "out"), "--set", "train.batch_size=3"]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {config}: train.batch_size: 3 does not divide among the 2 processes "
        "(WORLD_SIZE); use a multiple of 2"
    )


def test_shards_and_rank_seeds():
    rows = list(range(8))
    assert [distributed.shard(rows, r, 2) for r in range(2)] == [rows[:4], rows[4:]]
    assert distributed.shard(rows, 3, 4) == [6, 7]
    assert distributed.rank_seed(5, 0) == 5
    seeds = {distributed.rank_seed(5, r) for r in range(1, 4)}
    assert len(seeds) == 3 and all(0 <= s < 2**32 for s in seeds)


def test_changed_entries_are_the_per_example_updates():
    before = {"cache": {"a": "p1", "b": "p2"}, "rng": [1, 2]}
    after = {"cache": {"a": "p1", "b": "p3", "c": "p4"}, "rng": [3, 4]}
    assert distributed.changed_entries(before, after) == {"cache": {"b": "p3", "c": "p4"}}
    # alone (no process group) merging is the identity
    assert distributed.merge_example_state(before, after) == after


# -- train.data_parallel: DistributedDataParallel against the exact all-reduce -------------

CHECKS = Path(__file__).with_name("torchrun_checks.py")
MODES = {"exact": "", "ddp": 'data_parallel = "ddp"\n'}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch (2 gloo processes) for every check below: the sharded-encoding
    and gradient-averaging checks of torchrun_checks.py, then four toy trainings: top-K
    (grad_accum 1) and JSA (grad_accum 2) under the exact and the ddp path."""
    root = tmp_path_factory.mktemp("launched")
    runs = {"topk": (TOPK, "", 1), "jsa": (JSA, POSTERIOR, 2)}
    configs = []
    for mode, line in MODES.items():
        for name, (estimator, posterior, accum) in runs.items():
            text = CONFIG.format(estimator=estimator, posterior=posterior, steps=4)
            config = root / f"{name}-{mode}.toml"
            config.write_text(text + f"grad_accum = {accum}\n" + line)
            configs.append(str(config))
    command = [str(TORCHRUN), "--nproc_per_node=2", "--standalone", str(CHECKS), str(root)]
    result = subprocess.run(
        [*command, *configs], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # the trainers really took the path their config names
        trainers = json.loads((root / f"rank{rank}.json").read_text())["trainers"]
        assert [t["mode"] for t in trainers] == ["exact", "exact", "ddp", "ddp"]
        assert [t["ddp"] for t in trainers] == [False, False, True, True]
    return root


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load((run / "ckpt-4" / "model.safetensors").read_bytes())


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("estimator", ["topk", "jsa"])
def test_ddp_trains_the_parameters_the_exact_path_trains(launched, estimator):
    exact, ddp = launched / f"{estimator}-exact", launched / f"{estimator}-ddp"
    first = safetensors.torch.load((exact / "ckpt-2" / "model.safetensors").read_bytes())
    assert max_difference(first, final_weights(exact)) > 1e-4  # the runs did train
    assert max_difference(final_weights(exact), final_weights(ddp)) <= 1e-6  # measured: 0
    for a, b in zip(metric_lines(exact)[:4], metric_lines(ddp)[:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_ddp_on_two_processes_matches_one_process(launched):
    config = launched / "topk-ddp.toml"
    alone = CliRunner().invoke(main, ["train", str(config), "--out", str(launched / "one")])
    assert alone.exit_code == 0, alone.output
    one, two = final_weights(launched / "one"), final_weights(launched / "topk-ddp")
    assert max_difference(one, two) <= 1e-6  # measured 2.4e-7, as the exact path


def test_ddp_averages_gradients_as_the_exact_path_does(launched):
    """Two micro-batches (no_sync on the first), a parameter used on rank 0 only and one
    used nowhere: DDP's gradients equal the exact all-reduce's, and the unused parameter
    keeps no gradient in both (so AdamW's weight decay leaves it alone, as alone)."""
    for rank in (0, 1):
        grads = json.loads((launched / f"rank{rank}.json").read_text())["gradients"]
        assert grads["ddp"] == grads["exact"]
        assert grads["exact"]["never"] is None
        # rank 0's contribution to `rank0`, x[:, :2] summed over 2 micro-batches, halved
        assert grads["exact"]["rank0"] == [(1.0 + 2.0) / 2, (2.0 + 2.0) / 2]


def test_ddp_does_not_hang_on_a_rank_whose_loss_is_nan_without_a_graph(launched):
    """The trainer skips backward for such a loss (the step is then skipped or stops): DDP
    gives that rank a zero path to every parameter so the others' all-reduce completes. The
    used parameters' gradients equal the exact path's; the unused one gets zeros, not None
    (harmless: a non-finite loss never reaches the optimizer)."""
    for rank in (0, 1):
        grads = json.loads((launched / f"rank{rank}.json").read_text())["nan_gradients"]
        for name in ("used.weight", "used.bias", "rank0"):
            assert grads["ddp"][name] == grads["exact"][name], name
        assert grads["exact"]["never"] is None and grads["ddp"]["never"] == [0.0, 0.0]


def test_sharded_encoding_encodes_a_share_per_rank_and_gathers_all(launched):
    reports = [json.loads((launched / f"rank{r}.json").read_text())["encoding"] for r in (0, 1)]
    assert [report["8"]["encoded"] for report in reports] == [4, 4]
    assert [report["7"]["encoded"] for report in reports] == [4, 3]
    assert [report["1"]["encoded"] for report in reports] == [1, 1]  # fewer texts than ranks
    assert all(entry["equal"] for report in reports for entry in report.values())


def test_a_dense_index_refresh_encodes_half_the_corpus_per_rank(launched):
    from latentrag.plugins.dpr import DPRConfig
    from latentrag.plugins.dpr.retriever import DPRRetriever
    from latentrag.toy.corpus import toy_corpus

    reports = [json.loads((launched / f"rank{r}.json").read_text()) for r in (0, 1)]
    refreshes = [report["dense_refresh"] for report in reports]
    assert [refresh["encoded"] for refresh in refreshes] == [6, 6]  # 12 toy passages
    alone = DPRRetriever(DPRConfig(model="tiny-random", precision="float32"))
    alone.index(toy_corpus())
    alone.refresh()
    for refresh in refreshes:  # every rank holds the whole corpus, as one process encodes it
        assert torch.allclose(torch.tensor(refresh["vectors"]), alone._vectors, atol=1e-6)
