"""BM25 retriever: rank-bm25's BM25Okapi formula over a precomputed sparse weight matrix.

At index time every (term, passage) pair gets its final BM25 weight
``idf(t) * tf*(k1+1) / (tf + k1*(1 - b + b*dl/avgdl))`` in a CSR matrix ``W [V, N]``, so a
batch of queries is scored by one sparse product ``Q [B, V] @ W`` (``Q`` counts each query
term, so a repeated term counts twice, as in rank-bm25). ``idf(t) = log(N - n + 0.5) -
log(n + 0.5)``; a negative idf is replaced by ``epsilon * mean idf`` (rank-bm25's floor).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from latentrag.core.errors import LatentragError, StaleIndexError
from latentrag.core.interfaces import Retriever
from latentrag.core.types import Candidates, Corpus
from latentrag.io.atomic import atomic_file
from latentrag.plugins.bm25 import BM25Config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"
VOCAB = "vocab.json"
PROGRESS_ABOVE = 10_000  # passages: show a progress bar while indexing larger corpora
SCORE_BUDGET = 1 << 20  # dense scores held at once while searching (floats, cache-sized)
WEIGHT_BLOCK = 1 << 20  # entries weighted at once while indexing
DENSE_ROW_SHARE = 1 / 16  # terms in more passages than this share get dense rows
REBUILD_HINT = "rebuild with `latentrag index build`"


# -- building the weight matrix ------------------------------------------------------------


def okapi_idf(doc_freq: np.ndarray, n_docs: int, epsilon: float) -> np.ndarray:
    """rank-bm25's idf per term; terms absent from the corpus (df=0) get 0."""
    present = doc_freq > 0
    idf = np.zeros(len(doc_freq), dtype=np.float64)
    df = doc_freq[present].astype(np.float64)
    idf[present] = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
    if present.any():
        floor = epsilon * idf[present].mean()
        idf[present & (idf < 0)] = floor
    return idf


def term_frequencies(token_ids: np.ndarray, doc_lengths: np.ndarray, vocab_size: int):
    """[V, N] float32 matrix of term counts (coo -> csr sums the repeated (term, doc) pairs)."""
    n_docs = len(doc_lengths)
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int32), doc_lengths)
    ones = np.ones(len(token_ids), dtype=np.float32)
    counts = sp.coo_matrix((ones, (token_ids, doc_of_token)), shape=(vocab_size, n_docs))
    return counts.tocsr()


def bm25_weights(
    token_ids: np.ndarray,
    doc_lengths: np.ndarray,
    vocab_size: int,
    k1: float = 1.5,
    b: float = 0.75,
    epsilon: float = 0.25,
) -> sp.csr_matrix:
    """The [V, N] float32 matrix of BM25 weights from the corpus's concatenated term ids."""
    n_docs = len(doc_lengths)
    if n_docs == 0:
        raise LatentragError("bm25: cannot index an empty corpus")
    weights = term_frequencies(token_ids, doc_lengths, vocab_size)
    doc_freq = np.diff(weights.indptr)
    idf = okapi_idf(doc_freq, n_docs, epsilon)
    avgdl = doc_lengths.sum() / n_docs
    length_norm = k1 * (1 - b + b * doc_lengths / avgdl) if avgdl > 0 else np.zeros(n_docs)
    term_of_entry = np.repeat(np.arange(vocab_size, dtype=np.int32), doc_freq)
    # in float64, a block at a time: exact enough to match rank-bm25, and little memory
    for start in range(0, weights.nnz, WEIGHT_BLOCK):
        block = slice(start, start + WEIGHT_BLOCK)
        freq = weights.data[block].astype(np.float64)
        norm = length_norm[weights.indices[block]]
        weights.data[block] = idf[term_of_entry[block]] * freq * (k1 + 1) / (freq + norm)
    return weights


def term_ids(
    docs: Sequence[Sequence[str]], vocab: dict[str, int], grow: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated term ids and per-doc lengths; unknown terms are added (grow) or dropped."""
    if grow:
        ids = [vocab.setdefault(t, len(vocab)) for doc in docs for t in doc]
        lengths = [len(doc) for doc in docs]
    else:
        known = [[vocab[t] for t in doc if t in vocab] for doc in docs]
        ids = [i for doc in known for i in doc]
        lengths = [len(doc) for doc in known]
    return np.array(ids, dtype=np.int32), np.array(lengths, dtype=np.int64)


# -- searching -----------------------------------------------------------------------------


def query_matrix(token_ids: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """[B, V] term counts from the query row of each token (rows sorted; repeats count)."""
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    data = np.ones(len(token_ids), dtype=np.float32)
    queries = sp.csr_matrix((data, token_ids, indptr), shape=shape)
    queries.sum_duplicates()
    return queries


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best columns by score desc then column asc: (indices, scores)."""
    values, picked = torch.topk(torch.from_numpy(scores), k, dim=1)
    values, picked = values.numpy(), picked.numpy()
    _prefer_low_columns_on_ties(scores, picked, values)
    order = np.lexsort((picked, -values), axis=1)
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(values, order, axis=1)


def _prefer_low_columns_on_ties(scores: np.ndarray, picked: np.ndarray, values: np.ndarray):
    """topk keeps arbitrary members of a tie at the k-th score; keep the lowest columns."""
    k = picked.shape[1]
    boundary = values.min(axis=1)
    crowded = np.flatnonzero(np.count_nonzero(scores >= boundary[:, None], axis=1) > k)
    for row in crowded:
        above = np.flatnonzero(scores[row] > boundary[row])
        tied = np.flatnonzero(scores[row] == boundary[row])[: k - len(above)]
        picked[row] = np.concatenate([above, tied])
        values[row] = scores[row, picked[row]]


@dataclass
class BM25Index:
    """The weight matrix [V, N], the term -> row vocabulary, and dense copies of the
    rows of frequent terms.

    Scattering a posting list into the score buffer costs about 16 times more per entry
    than adding a dense row, so terms found in more than 1/16 of the passages are scored
    from dense rows (which take at most as much memory as the sparse matrix).
    """

    weights: sp.csr_matrix
    vocab: dict[str, int]

    def __post_init__(self) -> None:
        doc_freq = np.diff(self.weights.indptr)
        by_freq = np.argsort(-doc_freq, kind="stable")
        frequent = by_freq[doc_freq[by_freq] > self.n_docs * DENSE_ROW_SHARE]
        sparse_bytes = self.weights.data.nbytes + self.weights.indices.nbytes
        frequent = np.sort(frequent[: sparse_bytes // (4 * self.n_docs)])
        self.dense_slot = np.full(self.weights.shape[0], -1, dtype=np.int64)
        self.dense_slot[frequent] = np.arange(len(frequent))
        self.dense_rows = self.weights[frequent].toarray()

    @property
    def n_docs(self) -> int:
        return self.weights.shape[1]

    def search(
        self, token_ids: np.ndarray, lengths: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages of each query: (indices int64 [B,k], scores float32 [B,k])."""
        n_queries = len(lengths)
        rows = np.repeat(np.arange(n_queries), lengths)
        slots = self.dense_slot[token_ids]
        frequent = slots >= 0
        dense_q = query_matrix(slots[frequent], rows[frequent], (n_queries, len(self.dense_rows)))
        sparse_q = query_matrix(
            token_ids[~frequent], rows[~frequent], (n_queries, self.weights.shape[0])
        )
        chunk = max(1, SCORE_BUDGET // self.n_docs)
        indices = np.empty((n_queries, k), dtype=np.int64)
        scores = np.empty((n_queries, k), dtype=np.float32)
        for start in range(0, n_queries, chunk):
            part = slice(start, min(start + chunk, n_queries))
            dense = self._scores(dense_q[part], sparse_q[part])
            indices[part], scores[part] = top_k(dense, k)
        return indices, scores

    def _scores(self, dense_q: sp.csr_matrix, sparse_q: sp.csr_matrix) -> np.ndarray:
        """Dense [b, N] scores: frequent terms from dense rows, the others sparse."""
        if len(self.dense_rows):
            out = np.asarray(dense_q @ self.dense_rows, dtype=np.float32)
        else:
            out = np.zeros((dense_q.shape[0], self.n_docs), dtype=np.float32)
        rare = sparse_q @ self.weights  # csr: unique (row, column) pairs, so += is safe
        out[np.repeat(np.arange(rare.shape[0]), np.diff(rare.indptr)), rare.indices] += rare.data
        return out


# -- the component -------------------------------------------------------------------------


class BM25Retriever(Retriever):
    """Sparse lexical retriever (not trainable)."""

    def __init__(self, config: BM25Config | None = None) -> None:
        self.config = config or BM25Config()
        self.tokenizer = self.config.tokenizer()
        self._index: BM25Index | None = None
        self._fingerprint: str | None = None
        self._by_doc: sp.csr_matrix | None = None  # [N, V], built on first score()

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
        """Tokenize and weight the whole corpus (`fingerprint`: its known fingerprint)."""
        texts = corpus.texts()
        progress = tqdm(
            texts, desc="bm25 index", unit="passage", disable=len(texts) <= PROGRESS_ABOVE
        )
        docs = [self.tokenizer(text) for text in progress]
        vocab: dict[str, int] = {}
        ids, lengths = term_ids(docs, vocab, grow=True)
        cfg = self.config
        weights = bm25_weights(ids, lengths, len(vocab), cfg.k1, cfg.b, cfg.epsilon)
        self._set_index(BM25Index(weights, vocab), fingerprint or corpus.fingerprint())

    def _set_index(self, index: BM25Index, fingerprint: str) -> None:
        self._index = index
        self._fingerprint = fingerprint
        self._by_doc = None

    @property
    def built(self) -> BM25Index:
        if self._index is None:
            raise LatentragError("bm25: no index yet; call index(corpus) or load(directory) first")
        return self._index

    # -- searching --------------------------------------------------------------------------

    def query_terms(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated known-term ids of the queries and their per-query counts."""
        return term_ids(self.tokenizer.batch(queries), self.built.vocab, grow=False)

    def retrieve(self, queries: Sequence[str], k: int) -> Candidates:
        n_docs = self.built.n_docs
        if not 1 <= k <= n_docs:
            raise LatentragError(f"bm25: k={k} must be between 1 and the corpus size ({n_docs})")
        indices, scores = self.built.search(*self.query_terms(queries), k)
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
        if self._by_doc is None:
            self._by_doc = self.built.weights.T.tocsr()
        ids, lengths = self.query_terms(queries)
        shape = (len(queries), len(self.built.vocab))
        counts = query_matrix(ids, np.repeat(np.arange(len(queries)), lengths), shape)
        queries_per_pair = counts[np.repeat(np.arange(len(queries)), rows.shape[1])]
        pairs = queries_per_pair.multiply(self._by_doc[rows.ravel()])
        values = np.asarray(pairs.sum(axis=1), dtype=np.float32).reshape(rows.shape)
        return torch.from_numpy(values)

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write weights, vocabulary and manifest; each file replaces its old version
        atomically, and the manifest (what `load` trusts) goes last."""
        index = self.built
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)
        with atomic_file(directory / WEIGHTS) as handle:
            sp.save_npz(handle, index.weights, compressed=False)
        terms = sorted(index.vocab, key=index.vocab.__getitem__)
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
            "n_terms": len(self.built.vocab),
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
            weights = sp.load_npz(directory / WEIGHTS).tocsr().astype(np.float32, copy=False)
        except (OSError, ValueError) as exc:
            raise StaleIndexError(
                f"{directory / WEIGHTS}: unreadable ({exc}); {REBUILD_HINT}"
            ) from None
        terms = _read_json(directory / VOCAB)
        if weights.shape != (len(terms), manifest["n_docs"]):
            raise StaleIndexError(f"bm25 index {directory} is inconsistent; {REBUILD_HINT}")
        vocab = {term: row for row, term in enumerate(terms)}
        self._set_index(BM25Index(weights, vocab), manifest["corpus_fingerprint"])

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
