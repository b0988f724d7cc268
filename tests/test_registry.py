"""The registry: builtin and third-party plugins, isolation of broken ones, lookups."""

from __future__ import annotations

import importlib

import pytest
from conftest import install_plugin

from latentrag import hookimpl
from latentrag.core.config import StrictModel, resolve
from latentrag.core.errors import PluginError, UnknownComponentError
from latentrag.core.registry import Registry, builtin_manifest
from latentrag.testing import toy_corpus


class EchoConfig(StrictModel):
    scale: float = 1.0


class EchoPlugin:
    """An in-process plugin registering one estimator."""

    @hookimpl
    def register_components(self, register):
        register("estimator", "echo", lambda cfg: ("echo", cfg), EchoConfig, "test double")


def test_builtin_manifest_matches_what_plugins_register():
    registry = Registry().load(entry_points=False)
    broken = {p.name: p.error for p in registry.plugins() if p.error}
    assert not broken, broken
    for entry in builtin_manifest():
        listed = {(c["kind"], c["name"]) for c in entry["components"]}
        info = next(p for p in registry.plugins() if p.name == entry["name"])
        assert set(info.components) == listed, entry["name"]


def test_builtin_plugins_are_loaded_like_third_party_ones():
    for entry in builtin_manifest():
        module = importlib.import_module(entry["module"])
        assert hasattr(module, "register_components"), entry["module"]


def test_in_process_plugin_registers_and_unregisters():
    registry = Registry().load(builtins=False, entry_points=False)
    with registry.registered(EchoPlugin(), "echo-plugin") as info:
        assert info.components == [("estimator", "echo")]
        spec = registry.get("estimator", "echo")
        assert spec.plugin == "echo-plugin"
        assert spec.build(EchoConfig(scale=2.0)) == ("echo", EchoConfig(scale=2.0))
    with pytest.raises(UnknownComponentError):
        registry.get("estimator", "echo")


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    registry = Registry().load(builtins=False, entry_points=False)
    registry.register(EchoPlugin(), "first")
    with pytest.raises(PluginError, match="'first' and 'second'"):
        registry.register(EchoPlugin(), "second")
    assert registry.get("estimator", "echo").plugin == "first"


def test_unknown_name_lists_the_closest_known_names():
    registry = Registry().load(entry_points=False)
    with pytest.raises(UnknownComponentError) as err:
        registry.get("retriever", "bm52")
    assert "did you mean 'bm25'" in str(err.value)
    assert "Known retrievers: bm25, bow, dpr" in str(err.value)


def test_misspelled_hook_is_reported():
    class Misspelled:
        @hookimpl
        def register_component(self, register):  # missing "s"
            pass

    registry = Registry().load(builtins=False, entry_points=False)
    with pytest.raises(PluginError, match="register_component"):
        registry.register(Misspelled(), "typo")


def test_bad_kind_is_reported_and_nothing_half_registered():
    class BadKind:
        @hookimpl
        def register_components(self, register):
            register("estimator", "fine", lambda c: c, EchoConfig, "")
            register("tokenizer", "nope", lambda c: c, EchoConfig, "")

    registry = Registry().load(builtins=False, entry_points=False)
    with pytest.raises(PluginError, match="unknown component kind 'tokenizer'"):
        registry.register(BadKind(), "bad")
    with pytest.raises(UnknownComponentError):
        registry.get("estimator", "fine")


def test_third_party_plugin_through_a_real_entry_point(plugin_site):
    install_plugin(plugin_site, "latentrag_keyword", "keyword")
    registry = Registry().load()
    info = next(p for p in registry.plugins() if p.name == "keyword")
    assert (info.source, info.version, info.error) == ("entry point", "0.1.0", "")
    resolved = resolve(
        {"retriever": {"name": "keyword", "min_length": 4}}, "cfg.toml", registry=registry
    )
    spec, cfg = resolved.component("retriever")
    retriever = spec.build(cfg)
    corpus = toy_corpus()
    retriever.index(corpus)
    top = retriever.retrieve(["Which element has the atomic number eight?"], k=1)
    assert corpus[int(top.indices[0, 0])].id == "oxygen"


def test_broken_third_party_plugin_is_isolated(plugin_site):
    install_plugin(plugin_site, "latentrag_broken", "broken")
    registry = Registry().load()
    broken = next(p for p in registry.plugins() if p.name == "broken")
    assert broken.error == "ImportError: cannot import name 'Frobnicator' from 'somelib'"
    assert registry.get("retriever", "bm25").plugin == "latentrag.bm25"
    with pytest.raises(UnknownComponentError, match="plugins that failed to load: broken"):
        registry.get("retriever", "frobnicator")
