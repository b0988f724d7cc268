"""Turns a config's `[data]` section into a corpus and its question splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from latentrag.core.errors import ConfigError
from latentrag.core.types import Corpus, Example
from latentrag.data.readers import check_gold_ids, read_examples_jsonl, read_passages_jsonl

if TYPE_CHECKING:
    from latentrag.core.config import DataConfig

SPLITS = ("train", "dev", "test")


@dataclass
class Dataset:
    """A corpus and the questions of each split that is available."""

    corpus: Corpus
    splits: dict[str, list[Example]] = field(default_factory=dict)

    def split(self, name: str, limit: int | None = None) -> list[Example]:
        if name not in self.splits:
            raise ConfigError(
                f"data: no {name!r} split; available: {', '.join(self.splits) or '(none)'}"
            )
        return self.splits[name][:limit]


def load_dataset(config: DataConfig, base: Path | None = None) -> Dataset:
    """Read the data a config names; relative paths are taken from `base` (the config's folder)."""
    if config.source == "toy":
        from latentrag.toy.corpus import toy_corpus, toy_examples

        examples = toy_examples()
        return Dataset(toy_corpus(), {name: examples for name in SPLITS})
    if config.source == "squad-slice":
        from latentrag.data import squad_slice_dir

        folder = squad_slice_dir()
        paths = {"corpus": folder / "passages.jsonl"}
        paths.update({name: folder / f"{name}.jsonl" for name in SPLITS})
    else:
        named = {"corpus": config.corpus, **{n: getattr(config, n) for n in SPLITS}}
        paths = {key: _resolve(value, base) for key, value in named.items() if value}
    corpus = read_passages_jsonl(paths.pop("corpus"))
    splits = {}
    for name, path in paths.items():
        splits[name] = read_examples_jsonl(path)
        check_gold_ids(splits[name], corpus, path)
    return Dataset(corpus, splits)


def _resolve(path: str, base: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if base is not None and not candidate.is_absolute():
        candidate = base / candidate
    return candidate
