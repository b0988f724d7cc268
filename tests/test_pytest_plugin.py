"""The fixtures latentrag's pytest plugin gives plugin authors."""

from __future__ import annotations

import torch

import latentrag.testing as testing
from latentrag import hookimpl
from latentrag.core.config import StrictModel


def test_tiny_corpus_and_examples(tiny_corpus, tiny_examples):
    assert len(tiny_corpus) == 12
    assert all(tiny_corpus.index_of(g) >= 0 for e in tiny_examples for g in e.gold_ids)


def test_tiny_models(tiny_generator, tiny_retriever, tiny_corpus):
    loglik = tiny_generator.loglik(["What?"], [[tiny_corpus[0].text]], ["Paris"])
    assert loglik.shape == (1, 1) and bool(loglik < 0)
    found = tiny_retriever.retrieve(["capital of France"], 3)
    assert found.indices.shape == (1, 3) and found.indices.dtype == torch.long


def test_registered_plugin_is_removed_after(latentrag_registry):
    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("estimator", "noop", lambda c: c, StrictModel, "")

    with latentrag_registry.registered(Plugin(), "noop-plugin"):
        assert latentrag_registry.get("estimator", "noop").plugin == "noop-plugin"
    assert all(s.name != "noop" for s in latentrag_registry.components("estimator"))


def test_lazy_exports():
    assert testing.check_retriever.__module__ == "latentrag.testing.checks"
    assert testing.tiny_tokenizer.__module__ == "latentrag.toy.tiny_models"
