"""Turns a config's `[data]` section into a corpus and its question splits.

One reader module per format (`readers` for latentrag JSONL, `beir`, `dpr`, `kilt`,
`squad`, `hf`); each checks that gold and candidate ids are in the corpus and names the
file and line of any problem. See docs/data.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from latentrag.core.errors import ConfigError
from latentrag.core.types import Corpus, Example
from latentrag.data.readers import (
    DataError,
    check_candidate_ids,
    check_gold_ids,
    line_of_id,
    read_examples_jsonl,
    read_passages_jsonl,
)

if TYPE_CHECKING:
    from latentrag.core.config import DataConfig

SPLITS = ("train", "dev", "test")


@dataclass
class Dataset:
    """A corpus and the questions of each split that is available; `paths`: the file each
    split was read from (for errors that name it)."""

    corpus: Corpus
    splits: dict[str, list[Example]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def require_answers(self, *names: str) -> None:
        """DataError naming the file and line of the first question of these splits (those
        present) without answers: what a generator, trained or answering, needs."""
        for name in names:
            missing = next((e for e in self.splits.get(name, ()) if not e.answers), None)
            if missing is None:
                continue
            path = self.paths.get(name, Path(f"<{name} split>"))
            raise DataError(
                path,
                f"missing field 'answers' (question {missing.id!r} has none; the generator "
                "needs them: only retrieval can be evaluated on this split)",
                line_of_id(path, missing.id),
            )

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
        dataset = _read_latentrag(paths)
        dataset.paths = {name: folder / f"{name}.jsonl" for name in SPLITS}
        return dataset
    named = {"corpus": config.corpus, **{n: getattr(config, n) for n in SPLITS}}
    paths = {key: _resolve(value, base) for key, value in named.items() if value}
    reader = _READERS.get(config.format or "")
    if reader is None:
        raise ConfigError(f"data: no reader for source {config.source!r}")
    dataset = reader(config, dict(paths), base)
    dataset.paths = dataset.paths or {n: path for n, path in paths.items() if n != "corpus"}
    return dataset


def _read_latentrag(paths: dict[str, Path], *_: object) -> Dataset:
    paths = dict(paths)
    corpus = read_passages_jsonl(paths.pop("corpus"))
    splits = {}
    for name, path in paths.items():
        splits[name] = read_examples_jsonl(path)
        check_gold_ids(splits[name], corpus, path)
        check_candidate_ids(splits[name], corpus, path)
    return Dataset(corpus, splits)


def _read_beir(config: DataConfig, paths: dict[str, Path], base: Path | None) -> Dataset:
    from latentrag.data.beir import read_beir

    folder = _resolve(config.path or "", base)
    corpus, splits = read_beir(folder)
    return Dataset(corpus, splits, {name: folder / "queries.jsonl" for name in splits})


def _read_dpr(config: DataConfig, paths: dict[str, Path], base: Path | None) -> Dataset:
    from latentrag.data.dpr import read_dpr_passages, read_dpr_questions

    corpus = read_dpr_passages(paths.pop("corpus"))
    splits = {name: read_dpr_questions(path, name, corpus) for name, path in paths.items()}
    return Dataset(corpus, splits)


def _read_kilt(config: DataConfig, paths: dict[str, Path], base: Path | None) -> Dataset:
    from latentrag.data.kilt import read_kilt_passages, read_kilt_questions

    unit = config.unit or "paragraph"
    corpus = read_kilt_passages(paths.pop("corpus"), unit)
    splits = {name: read_kilt_questions(path, corpus, unit) for name, path in paths.items()}
    return Dataset(corpus, splits)


def _read_squad(config: DataConfig, paths: dict[str, Path], base: Path | None) -> Dataset:
    from latentrag.data.squad import read_squad_splits

    corpus, splits = read_squad_splits(paths)
    return Dataset(corpus, splits)


def _read_hf(config: DataConfig, paths: dict[str, Path], base: Path | None) -> Dataset:
    from latentrag.data.hf import read_hf_passages, read_hf_questions

    fields = config.fields or {}
    corpus = read_hf_passages(paths.pop("corpus"), fields)
    splits = {name: read_hf_questions(path, fields, corpus) for name, path in paths.items()}
    return Dataset(corpus, splits)


_READERS = {
    "latentrag": lambda config, paths, base: _read_latentrag(paths),
    "beir": _read_beir,
    "dpr": _read_dpr,
    "kilt": _read_kilt,
    "squad": _read_squad,
    "hf": _read_hf,
}


def corpus_file(config: DataConfig, base: Path | None = None) -> Path | None:
    """The file holding one passage per line, when the format has one (latentrag JSONL,
    BEIR's corpus.jsonl): what `config validate` counts without parsing; else None."""
    if config.format == "latentrag" and config.corpus:
        return _resolve(config.corpus, base)
    if config.format == "beir" and config.path:
        return _resolve(config.path, base) / "corpus.jsonl"
    return None


def _resolve(path: str, base: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if base is not None and not candidate.is_absolute():
        candidate = base / candidate
    return candidate
