"""Public testing helpers for plugin authors: a toy corpus, tiny models, conformance checks.

The toy corpus, tiny models and table components live in `latentrag.toy` (a non-test module
the library itself uses); this package re-exports them for plugin authors and adds the
conformance checks. `checks` and `latentrag.toy.tiny_models` import torch and transformers,
so they are loaded on first use: the pytest plugin that imports this package must not slow
every pytest start.
"""

from __future__ import annotations

import importlib

from latentrag.toy.corpus import toy_corpus, toy_examples

_LAZY = {
    "check_config_round_trip": "latentrag.testing.checks",
    "check_estimator": "latentrag.testing.checks",
    "check_generator": "latentrag.testing.checks",
    "check_reranker": "latentrag.testing.checks",
    "check_retriever": "latentrag.testing.checks",
    "ConformanceError": "latentrag.testing.checks",
    "toy_pipeline": "latentrag.testing.checks",
    "PaddedModel": "latentrag.testing.checks",
    "TableReranker": "latentrag.testing.checks",
    "tiny_llama": "latentrag.toy.tiny_models",
    "tiny_gpt2": "latentrag.toy.tiny_models",
    "tiny_tokenizer": "latentrag.toy.tiny_models",
    "TableGenerator": "latentrag.toy.components",
    "TableRetriever": "latentrag.toy.components",
}

__all__ = ["toy_corpus", "toy_examples", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
