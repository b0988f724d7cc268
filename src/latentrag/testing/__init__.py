"""Public testing helpers for plugin authors: a toy corpus, tiny models, conformance checks."""

from .toy import toy_corpus, toy_examples

__all__ = ["toy_corpus", "toy_examples"]
