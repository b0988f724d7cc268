"""Public testing helpers for plugin authors: a toy corpus, tiny models, conformance checks.

`latentrag.testing.checks` (conformance checks) and `latentrag.testing.tiny_models` (tiny
random transformers) import torch and transformers, so they are loaded on first use: the
pytest plugin that imports this package must not slow every pytest start.
"""

from __future__ import annotations

import importlib

from .toy import toy_corpus, toy_examples

_LAZY = {
    "check_config_round_trip": "checks",
    "check_estimator": "checks",
    "check_generator": "checks",
    "check_reranker": "checks",
    "check_retriever": "checks",
    "ConformanceError": "checks",
    "toy_pipeline": "checks",
    "tiny_llama": "tiny_models",
    "tiny_gpt2": "tiny_models",
    "tiny_tokenizer": "tiny_models",
}

__all__ = ["toy_corpus", "toy_examples", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
