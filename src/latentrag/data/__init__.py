"""Small datasets shipped with latentrag.

``squad_slice/`` is a 300-paragraph slice of the SQuAD v1.1 dev set (CC BY-SA 4.0; see
``squad_slice/NOTICE``), rebuilt by ``scripts/make_squad_slice.py``. Files:
``passages.jsonl`` (the corpus) and ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` (questions),
in the formats documented in :mod:`latentrag.data.readers`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from latentrag.core.types import Corpus, Example
from latentrag.data.readers import (
    check_gold_ids,
    read_examples_jsonl,
    read_passages_jsonl,
)

__all__ = ["SPLITS", "load_squad_slice", "squad_slice_dir"]

SPLITS = ("train", "dev", "test")


def squad_slice_dir() -> Path:
    """The folder holding the shipped SQuAD slice."""
    folder = files(__name__) / "squad_slice"
    if isinstance(folder, Path):
        return folder
    raise RuntimeError(
        f"latentrag's data is not on the file system ({folder}); install the package unzipped"
    )


def load_squad_slice(split: str) -> tuple[Corpus, list[Example]]:
    """The slice's corpus and the questions of one split ("train", "dev" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    folder = squad_slice_dir()
    corpus = read_passages_jsonl(folder / "passages.jsonl")
    examples = read_examples_jsonl(folder / f"{split}.jsonl")
    check_gold_ids(examples, corpus, folder / f"{split}.jsonl")
    return corpus, examples
