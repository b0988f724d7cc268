import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from latentrag.training import checkpoint as ckpt
from latentrag.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    flatten_optimizer,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer,
)


def make_checkpoint(step: int) -> Checkpoint:
    generator = torch.Generator().manual_seed(step)
    weight = torch.randn(4, 3, generator=generator)
    model = {
        "prior.weight": weight,
        "prior.tied": weight,  # shares storage, as tied embeddings do
        "prior.transposed": weight.t(),  # not contiguous
        "generator.half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "generator.count": torch.tensor([step, 7], dtype=torch.long),
    }
    state = {"step": step, "position": {"epoch": 1, "index": 3}, "note": "ü"}
    return Checkpoint(step, {"model": model}, state)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_bitwise(tmp_path):
    original = make_checkpoint(3)
    path = save_checkpoint(tmp_path, original)
    assert path == tmp_path / "ckpt-3"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
    ]
    loaded = read_checkpoint(path)
    assert loaded.step == 3
    assert loaded.state == original.state
    assert_same_tensors(loaded.tensors["model"], original.tensors["model"])
    assert (tmp_path / "latest").read_text() == "ckpt-3\n"


def test_keeps_last_n_and_points_latest_at_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, make_checkpoint(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "latest").read_text() == "ckpt-4\n"
    assert load_latest(tmp_path).step == 4


def test_rewriting_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(2))
    replacement = make_checkpoint(2)
    replacement.state["note"] = "second"
    save_checkpoint(tmp_path, replacement)
    assert read_checkpoint(tmp_path / "ckpt-2").state["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-2", "latest"]


def test_crash_at_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = make_checkpoint(1)
    save_checkpoint(tmp_path, first)
    real_replace = os.replace

    def crash(src, dst):
        if str(src).endswith("ckpt-2.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, make_checkpoint(2))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "ckpt-2") in message and "Input/output error" in message
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1", "latest"]
    assert (tmp_path / "latest").read_text() == "ckpt-1\n"
    loaded = load_latest(tmp_path)
    assert loaded.step == 1 and not loaded.notes
    assert_same_tensors(loaded.tensors["model"], first.tensors["model"])


def test_full_disk_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make_checkpoint(1))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_checkpoint(tmp_path, make_checkpoint(2))
    assert "\n" not in str(info.value) and "ckpt-2" in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1", "latest"]
    assert load_latest(tmp_path).step == 1


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(1))
    save_checkpoint(tmp_path, make_checkpoint(2))
    weights = tmp_path / "ckpt-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        read_checkpoint(tmp_path / "ckpt-2")
    with pytest.warns(UserWarning, match="model.safetensors"):
        loaded = load_latest(tmp_path)
    assert loaded.step == 1
    assert len(loaded.notes) == 1 and str(weights) in loaded.notes[0]


def _rewrite_manifest(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = ckpt._sha256(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json: invalid JSON"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda p: (p / "state.json").write_text("[1, 2"), "state.json: sha256 mismatch"),
        (
            lambda p: ((p / "model.safetensors").write_bytes(b"\xff" * 16), _rewrite_manifest(p)),
            "unreadable safetensors",
        ),
        (
            lambda p: ((p / "state.json").write_text("[1, 2"), _rewrite_manifest(p)),
            "state.json: invalid JSON",
        ),
    ],
)
def test_damage_is_detected_with_a_one_line_message(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, make_checkpoint(5))
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_no_checkpoint_and_only_damaged_ones(tmp_path):
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "absent") is None
    path = save_checkpoint(tmp_path, make_checkpoint(1))
    (path / "state.json").write_text("{}")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_state_that_is_not_json_is_refused(tmp_path):
    bad = Checkpoint(1, {}, {"loss": float("nan")})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, bad)
    assert list_checkpoints(tmp_path) == []


def _trained_adamw(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(
        [{"params": [model.weight], "lr": 0.1, "name": "a"}, {"params": [model.bias]}],
        lr=0.01,
        weight_decay=0.1,
    )
    return model, optimizer


def _step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).pow(2).sum().backward()
    optimizer.step()


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    model, optimizer = _trained_adamw(0)
    for _ in range(2):
        _step(model, optimizer, x)
    tensors, meta = flatten_optimizer(optimizer.state_dict())
    assert set(tensors) == {
        f"optim.state.{i}.{name}" for i in (0, 1) for name in ("step", "exp_avg", "exp_avg_sq")
    }
    save_checkpoint(tmp_path, Checkpoint(2, {"optimizer": tensors}, {"optimizer": meta}))
    loaded = read_checkpoint(tmp_path / "ckpt-2")

    copy, restored = _trained_adamw(99)
    copy.load_state_dict(model.state_dict())
    state = unflatten_optimizer(loaded.tensors["optimizer"], loaded.state["optimizer"])
    restored.load_state_dict(state)
    assert restored.param_groups[0]["lr"] == 0.1 and restored.param_groups[0]["name"] == "a"
    for _ in range(2):
        _step(model, optimizer, x)
        _step(copy, restored, x)
    assert torch.equal(model.weight, copy.weight) and torch.equal(model.bias, copy.bias)


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = json.loads(json.dumps(capture_rng()))
    draws = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    restore_rng(state)
    again = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2])
