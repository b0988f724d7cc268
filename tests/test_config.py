"""Configs: strict validation per component, overrides, every error collected."""

from __future__ import annotations

import tomllib

import pytest

from latentrag.core.config import apply_overrides, load_config, parse_override, resolve
from latentrag.core.errors import ConfigError
from latentrag.io.toml_writer import dumps


def write(tmp_path, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_component_sections_are_validated_by_their_own_models(tmp_path):
    path = write(tmp_path, '[retriever]\nname = "bm25"\nk1 = 1.2\n[train]\nsteps = 5\n')
    resolved = load_config(path)
    spec, cfg = resolved.component("retriever")
    assert (spec.name, cfg.k1, resolved.pipeline.train.steps) == ("bm25", 1.2, 5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[retriever]\nname = "bm25"\nk2 = 1.0\n', "cfg.toml: retriever.k2: unknown key"),
        ('[retriever]\nname = "bm25"\n[train]\nstepz = 1\n', "cfg.toml: train.stepz: unknown key"),
        ('[retriever]\nname = "bm25"\nk1 = "high"\n', "cfg.toml: retriever.k1: Input should be"),
        ('[retriever]\nname = "bm25"\n[train]\nsteps = -1\n', "cfg.toml: train.steps: Input"),
        ('[retriever]\nname = "bm52"\n', "did you mean 'bm25'"),
        ("[train]\nsteps = 1\n", "cfg.toml: retriever: required key is missing"),
        ('[retriever\nname = "bm25"\n', "cfg.toml: invalid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    text = '[retriever]\nname = "bm25"\nk1 = "x"\n[estimator]\nname = "jsb"\n[train]\nlr = 0\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any("retriever.k1" in line for line in lines)
    assert any("estimator.name" in line and "'jsa'" in line for line in lines)
    assert any("train.lr" in line for line in lines)


def test_overrides_are_parsed_as_toml_values():
    assert parse_override("estimator.samples=4") == (["estimator", "samples"], 4)
    assert parse_override("train.lrs.prior=1e-5") == (["train", "lrs", "prior"], 1e-5)
    assert parse_override("retriever.name=bm25") == (["retriever", "name"], "bm25")
    assert parse_override('x.y="a b"') == (["x", "y"], "a b")
    data = apply_overrides({"estimator": {"name": "jsa"}}, ["estimator.samples=4"])
    assert data == {"estimator": {"name": "jsa", "samples": 4}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("estimator.samples")


def test_resolved_config_round_trips_through_toml():
    resolved = resolve({"retriever": {"name": "bm25"}, "train": {"lrs": {"retriever": 1e-5}}})
    text = dumps(resolved.to_dict())
    again = resolve(tomllib.loads(text))
    assert again.to_dict() == resolved.to_dict()
    assert again.pipeline.train.lrs == {"retriever": 1e-5}


def test_estimator_needing_a_posterior_is_refused_without_one(tmp_path):
    text = (
        '[retriever]\nname = "bm25"\n[generator]\nname = "hf-causal-lm"\n'
        '[estimator]\nname = "jsa"\n'
    )
    with pytest.raises(ConfigError, match=r"posterior: required by estimator 'jsa'"):
        load_config(write(tmp_path, text))
