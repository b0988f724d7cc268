"""BM25 retriever: rank-bm25's BM25Okapi formula, exact top-k with dynamic pruning.

The index layout and the scoring are in `index.py`, the pruned search in `kernels.py`
(compiled with numba when installed; an exhaustive numpy search gives the same results
otherwise). This module tokenizes, keeps the vocabulary, and saves/loads the index.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentrag.core.errors import LatentragError, StaleIndexError
from latentrag.core.interfaces import Retriever
from latentrag.core.types import Candidates, Corpus
from latentrag.io.atomic import atomic_file
from latentrag.plugins.bm25 import BM25Config
from latentrag.plugins.bm25.index import BM25Index, term_ids

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ARRAYS = "index.npz"
VOCAB = "vocab.json"
PROGRESS_ABOVE = 10_000  # passages: show a progress bar while indexing larger corpora
REBUILD_HINT = "rebuild with `latentrag index build`"


# -- the component -------------------------------------------------------------------------


class BM25Retriever(Retriever):
    """Sparse lexical retriever (not trainable)."""

    def __init__(self, config: BM25Config | None = None) -> None:
        self.config = config or BM25Config()
        self.tokenizer = self.config.tokenizer()
        self._index: BM25Index | None = None
        self.vocab: dict[str, int] = {}
        self._fingerprint: str | None = None

    # -- indexing ---------------------------------------------------------------------------

    def index(self, corpus: Corpus) -> None:
        """Load the index saved in `index_dir` (refusing a stale one), else build and save."""
        self._fingerprint = corpus.fingerprint()
        directory = self.config.index_dir
        if directory and (Path(directory) / MANIFEST).exists():
            self.load(Path(directory))
            return
        self.build(corpus)

    def build(self, corpus: Corpus) -> None:
        """Build the index from scratch, overwriting any saved one in `index_dir`."""
        self._build(corpus, self._fingerprint)
        if self.config.index_dir:
            self.save(Path(self.config.index_dir))

    def _build(self, corpus: Corpus, fingerprint: str | None = None) -> None:
        """Tokenize and index the whole corpus (`fingerprint`: its known fingerprint)."""
        texts = corpus.texts()
        progress = tqdm(
            texts, desc="bm25 index", unit="passage", disable=len(texts) <= PROGRESS_ABOVE
        )
        docs = [self.tokenizer(text) for text in progress]
        vocab: dict[str, int] = {}
        ids, lengths = term_ids(docs, vocab, grow=True)
        cfg = self.config
        index = BM25Index.build(ids, lengths, len(vocab), cfg.k1, cfg.b, cfg.epsilon)
        self._set_index(index, vocab, fingerprint or corpus.fingerprint())

    def _set_index(self, index: BM25Index, vocab: dict[str, int], fingerprint: str) -> None:
        self._index = index
        self.vocab = vocab
        self._fingerprint = fingerprint

    @property
    def built(self) -> BM25Index:
        if self._index is None:
            raise LatentragError("bm25: no index yet; call index(corpus) or load(directory) first")
        return self._index

    # -- searching --------------------------------------------------------------------------

    def query_terms(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated term ids of the queries' tokens (-1: not in the corpus) and their
        per-query token counts."""
        return term_ids(self.tokenizer.batch(queries), self.vocab, grow=False)

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        """Top-k rows per query (exact BM25 ranking, ties to the lower row)."""
        index = self.built
        indices, scores = index.search(*self.query_terms(queries), k)
        return Candidates(torch.from_numpy(indices), torch.from_numpy(scores))

    def score(self, queries: Sequence[str], passage_rows: torch.Tensor) -> torch.Tensor:
        """BM25 scores [B, K] of the given rows (plain values: BM25 has no parameters)."""
        rows = passage_rows.detach().cpu().numpy().astype(np.int64)
        n_docs = self.built.n_docs
        if rows.ndim != 2 or rows.shape[0] != len(queries):
            raise LatentragError(
                f"bm25: passage_rows must be [B={len(queries)}, K], got {list(rows.shape)}"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= n_docs):
            raise LatentragError(
                f"bm25: passage rows must lie in [0, {n_docs}), got {rows.min()}..{rows.max()}"
            )
        return torch.from_numpy(self.built.score_pairs(*self.query_terms(queries), rows))

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the index arrays, vocabulary and manifest; each file replaces its old
        version atomically, and the manifest (what `load` trusts) goes last."""
        index = self.built
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)
        with atomic_file(directory / ARRAYS) as handle:
            np.savez(handle, **index.arrays())
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        with atomic_file(directory / VOCAB) as handle:
            handle.write(json.dumps(terms, ensure_ascii=False).encode("utf-8"))
        with atomic_file(directory / MANIFEST) as handle:
            handle.write(json.dumps(self._manifest(), indent=2).encode("utf-8"))

    def _manifest(self) -> dict[str, object]:
        return {
            "format": "latentrag-bm25",
            "format_version": FORMAT_VERSION,
            "corpus_fingerprint": self._fingerprint,
            "n_docs": self.built.n_docs,
            "n_terms": len(self.vocab),
            "config": self.config.index_settings(),
        }

    def load(self, directory: Path, corpus: Corpus | None = None) -> None:
        """Load a saved index; refuse one built for another corpus or with other settings.

        The corpus to check against is `corpus`, else the one last given to `index`.
        """
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise LatentragError(f"{directory / MANIFEST}: no such file (not a bm25 index?)")
        manifest = _read_json(directory / MANIFEST)
        expected = corpus.fingerprint() if corpus is not None else self._fingerprint
        self._check_manifest(directory, manifest, expected)
        try:
            with np.load(directory / ARRAYS, allow_pickle=False) as stored:
                index = BM25Index.from_arrays(dict(stored))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise StaleIndexError(
                f"{directory / ARRAYS}: unreadable ({exc}); {REBUILD_HINT}"
            ) from None
        terms = _read_json(directory / VOCAB)
        if (index.vocab_size, index.n_docs) != (len(terms), manifest["n_docs"]):
            raise StaleIndexError(f"bm25 index {directory} is inconsistent; {REBUILD_HINT}")
        vocab = {term: row for row, term in enumerate(terms)}
        self._set_index(index, vocab, manifest["corpus_fingerprint"])

    def _check_manifest(self, directory: Path, manifest: dict, fingerprint: str | None) -> None:
        where = f"stale index {directory}"
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StaleIndexError(
                f"{where}: format version {manifest.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; {REBUILD_HINT}"
            )
        built_for = manifest.get("corpus_fingerprint")
        if fingerprint is not None and built_for != fingerprint:
            raise StaleIndexError(
                f"{where}: built for corpus {str(built_for)[:12]}, this corpus is "
                f"{fingerprint[:12]}; {REBUILD_HINT}"
            )
        stored, wanted = (
            _flatten(manifest.get("config", {})),
            _flatten(self.config.index_settings()),
        )
        for key in sorted(set(stored) | set(wanted)):
            if stored.get(key) != wanted.get(key):
                raise StaleIndexError(
                    f"{where}: built with {key}={stored.get(key)!r}, this config has "
                    f"{key}={wanted.get(key)!r}; {REBUILD_HINT}"
                )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StaleIndexError(f"{path}: unreadable ({exc}); {REBUILD_HINT}") from None


def _flatten(settings: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
