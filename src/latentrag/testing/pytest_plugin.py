"""pytest plugin (entry point "pytest11"): fixtures for testing latentrag components.

Installed with latentrag, so a plugin author's tests get these fixtures with no conftest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from latentrag.core.registry import Registry
from latentrag.core.types import Corpus, Example
from latentrag.toy.corpus import toy_corpus, toy_examples


@pytest.fixture
def latentrag_registry() -> Iterator[Registry]:
    """A fresh registry with the builtin plugins; register test plugins with
    ``with latentrag_registry.registered(MyPlugin(), "mine"): ...``."""
    yield Registry().load(entry_points=False)


@pytest.fixture
def tiny_corpus() -> Corpus:
    """A dozen short passages about distinct topics."""
    return toy_corpus()


@pytest.fixture
def tiny_examples() -> list[Example]:
    """Questions about `tiny_corpus`, each with one gold passage."""
    return toy_examples()


@pytest.fixture
def tiny_generator():
    """The `hf-causal-lm` generator on a tiny random Llama (built in memory, no download)."""
    from latentrag.plugins.hf_generator import HFGeneratorConfig
    from latentrag.plugins.hf_generator.generator import HFCausalLMGenerator

    return HFCausalLMGenerator(HFGeneratorConfig(model="tiny-llama"))


@pytest.fixture
def tiny_retriever(tiny_corpus):
    """A small trainable `bow` retriever, already indexed over `tiny_corpus`."""
    from latentrag.plugins.bow import BowConfig
    from latentrag.plugins.bow.retriever import BowRetriever

    retriever = BowRetriever(BowConfig())
    retriever.index(tiny_corpus)
    return retriever
