"""The bm25 index: term frequencies laid out for pruned search, weights computed exactly.

A passage's score is rank-bm25's BM25Okapi: the sum over query terms (a repeated term
counts that many times) of ``idf(t) * tf*(k1+1) / (tf + k1*(1 - b + b*dl/avgdl))``, with
``idf(t) = log(N - n + 0.5) - log(n + 0.5)`` and a negative idf replaced by
``epsilon * mean idf``. Weights are not stored: each is computed in float64 from the
stored term frequency and the passage's length factor, which keeps the index small and
every score exact. Terms are of two kinds:

- sparse (in at most `dense_share` of the passages): a posting list of (row, tf) sorted by
  row, 5 bytes a posting for tf < 256;
- dense (the frequent rest): a row of N term frequencies (1 byte a passage), for O(1)
  lookups and for sweeps over all passages that vectorise.

`kernels.py` searches this layout with dynamic pruning when numba is installed; the numpy
path below scores every passage, summing the terms in the same order (sparse terms by
ascending id, then dense terms by ascending id), so both return identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import scipy.sparse as sp

from latentrag.core.errors import LatentragError
from latentrag.plugins.bm25 import kernels

DENSE_SHARE = 1 / 16  # terms in more passages than this share get dense rows
ENTRY_BLOCK = 1 << 20  # postings processed at once while building
SCORE_BUDGET = 1 << 21  # float64 scores held at once by the numpy path
BACKENDS = ("auto", "numba", "numpy", "python")


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


def length_norms(doc_lengths: np.ndarray, k1: float, b: float) -> np.ndarray:
    """``k1 * (1 - b + b * dl / avgdl)`` for every length dl from 0 to the longest passage,
    as rank-bm25 computes it per passage (a passage's norm is this table at its length)."""
    avgdl = doc_lengths.sum() / len(doc_lengths)
    lengths = np.arange(int(doc_lengths.max(initial=0)) + 1, dtype=np.float64)
    if avgdl == 0:
        return np.full(len(lengths), k1 * (1 - b))
    return k1 * (1 - b + b * lengths / avgdl)


def length_dtype(max_length: int) -> type:
    """uint16 when every passage is shorter than 65536 tokens, else uint32."""
    return np.uint16 if max_length <= np.iinfo(np.uint16).max else np.uint32


def saturation(tfs: np.ndarray, norms: np.ndarray, k1: float) -> np.ndarray:
    """``tf*(k1+1) / (tf + norm)`` in float64 (kernels.weight's expression without idf)."""
    tfs = tfs.astype(np.float64)
    return (tfs * (k1 + 1.0)) / (tfs + norms)


def term_frequencies(token_ids: np.ndarray, doc_lengths: np.ndarray, vocab_size: int):
    """[V, N] csr matrix of term counts (coo -> csr sums the repeated (term, doc) pairs)."""
    n_docs = len(doc_lengths)
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int32), doc_lengths)
    # a count is at most its passage's length
    ones = np.ones(len(token_ids), dtype=length_dtype(int(np.max(doc_lengths, initial=0))))
    counts = sp.coo_matrix((ones, (token_ids, doc_of_token)), shape=(vocab_size, n_docs))
    return counts.tocsr()


def round_up_float32(values: np.ndarray) -> np.ndarray:
    """float32 values no smaller than the given float64 ones (bounds stay bounds)."""
    rounded = values.astype(np.float32)
    low = rounded < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def tf_dtype(max_tf: float) -> type:
    """The smallest unsigned type that holds every term frequency."""
    for dtype in (np.uint8, np.uint16):
        if max_tf <= np.iinfo(dtype).max:
            return dtype
    return np.uint32


@dataclass
class BM25Index:
    """Postings, dense rows and per-term/per-passage factors (see the module docstring)."""

    k1: float
    b: float
    doc_lengths: np.ndarray  # uint16/32 [N]
    idf: np.ndarray  # float64 [V]
    upper: np.ndarray  # float32 [V]: each term's largest weight, rounded up
    slot: np.ndarray  # int16/32 [V]: the dense row of a term, -1 for sparse terms
    sparse_ptr: np.ndarray  # int32/64 [V+1] (empty ranges for dense terms)
    sparse_docs: np.ndarray  # int32
    sparse_tfs: np.ndarray  # uint8/16/32
    dense: np.ndarray  # [F, N] term frequencies of the dense terms

    def __post_init__(self) -> None:
        self.norms = length_norms(self.doc_lengths, self.k1, self.b)  # by passage length
        avgdl = self.doc_lengths.sum() / max(self.n_docs, 1)
        per_length = self.k1 * self.b / avgdl if avgdl > 0 else 0.0
        f32 = np.float32
        # k1 + 1, then in float32 (for the sweeps) k1 + 1, k1 * (1 - b), k1 * b / avgdl
        self.params = (
            self.k1 + 1.0,
            f32(self.k1 + 1.0),
            f32(self.k1 * (1 - self.b)),
            f32(per_length),
        )

    # -- building -----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        token_ids: np.ndarray,
        doc_lengths: np.ndarray,
        vocab_size: int,
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
        dense_share: float | None = None,
    ) -> BM25Index:
        """Index a corpus given as concatenated term ids and per-passage lengths (terms in
        more than `dense_share` of the passages, default DENSE_SHARE, get dense rows)."""
        n_docs = len(doc_lengths)
        if n_docs == 0:
            raise LatentragError("bm25: cannot index an empty corpus")
        counts = term_frequencies(token_ids, doc_lengths, vocab_size)
        doc_freq = np.diff(counts.indptr)
        idf = okapi_idf(doc_freq, n_docs, epsilon)
        doc_lengths = np.asarray(doc_lengths)
        doc_lengths = doc_lengths.astype(length_dtype(int(doc_lengths.max(initial=0))))
        tfs = counts.data.astype(tf_dtype(counts.data.max(initial=0)))
        norm = length_norms(doc_lengths, k1, b)[doc_lengths]
        upper = _upper_saturation(counts.indptr, counts.indices, tfs, norm, k1)
        is_dense = doc_freq > n_docs * (DENSE_SHARE if dense_share is None else dense_share)
        return cls(
            k1=k1,
            b=b,
            doc_lengths=doc_lengths,
            idf=idf,
            upper=round_up_float32(np.maximum(idf, 0) * upper),
            **_split_terms(counts.indptr, counts.indices, tfs, is_dense, n_docs),
        )

    # -- properties -----------------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        return len(self.doc_lengths)

    @property
    def vocab_size(self) -> int:
        return len(self.idf)

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays (what searching needs)."""
        arrays = [getattr(self, f.name) for f in fields(self) if f.name not in ("k1", "b")]
        return sum(a.nbytes for a in arrays) + self.norms.nbytes

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything `from_arrays` needs, for saving."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        saved["k1"], saved["b"] = np.float64(self.k1), np.float64(self.b)
        return saved

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BM25Index:
        """Rebuild from `arrays()`; raises ValueError when they do not fit together."""
        values = {f.name: arrays[f.name] for f in fields(cls)}
        values["k1"], values["b"] = float(values["k1"]), float(values["b"])
        index = cls(**values)
        index.check()
        return index

    def check(self) -> None:
        """Raise ValueError when the arrays do not describe one consistent index."""
        n_terms, n_dense = len(self.idf), len(self.dense)
        problems = [
            len(self.upper) != n_terms or len(self.slot) != n_terms,
            len(self.sparse_ptr) != n_terms + 1 or self.sparse_ptr[-1] != len(self.sparse_docs),
            len(self.sparse_tfs) != len(self.sparse_docs),
            self.dense.ndim != 2 or self.dense.shape[1] != self.n_docs,
            int((self.slot >= 0).sum()) != n_dense,
        ]
        if any(problems):
            raise ValueError("arrays of different sizes")

    # -- searching ------------------------------------------------------------------------

    def query_arrays(self, token_ids: np.ndarray, lengths: np.ndarray):
        """Per query: its distinct terms (sparse ones first, each kind by ascending id) and
        their counts; ids outside the vocabulary (e.g. -1) are dropped. Returns (ptr,
        terms, counts float64, number of sparse terms)."""
        n_queries, n_terms = len(lengths), self.vocab_size
        rows = np.repeat(np.arange(n_queries, dtype=np.int64), lengths)
        token_ids = np.asarray(token_ids, dtype=np.int64)
        known = (token_ids >= 0) & (token_ids < n_terms)
        rows, token_ids = rows[known], token_ids[known]
        # one sort key: query, then sparse before dense, then term id
        keys = (rows * 2 + (self.slot[token_ids] >= 0)) * n_terms + token_ids
        keys.sort()
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, len(keys))).astype(np.float64)
        keys = keys[starts]
        rows, kind_and_term = np.divmod(keys, 2 * n_terms)
        ptr = np.zeros(n_queries + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_queries), out=ptr[1:])
        sparse = kind_and_term < n_terms
        n_sparse = np.bincount(rows[sparse], minlength=n_queries).astype(np.int64)
        return ptr, kind_and_term % n_terms, counts, n_sparse

    def search(
        self, token_ids: np.ndarray, lengths: np.ndarray, k: int, backend: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows of each query, best first, ties to the lower row:
        (rows int64 [B, k], scores float32 [B, k]).

        backend: "numba" (pruned, compiled), "python" (the same kernels from a plain
        Python loop, all plain Python without numba: for tests), "numpy" (exhaustive),
        "auto" (numba when installed, else numpy).
        """
        if backend not in BACKENDS:
            raise LatentragError(f"bm25: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "numba" if kernels.NUMBA_AVAILABLE else "numpy"
        if backend == "numba" and not kernels.NUMBA_AVAILABLE:
            raise LatentragError(
                "bm25: backend 'numba' needs numba (pip install 'latentrag[fast]')"
            )
        if not 1 <= k <= self.n_docs:
            raise LatentragError(
                f"bm25: k={k} must be between 1 and the corpus size ({self.n_docs})"
            )
        ptr, terms, counts, n_sparse = self.query_arrays(token_ids, lengths)
        rows = np.empty((len(lengths), k), dtype=np.int64)
        scores = np.empty((len(lengths), k), dtype=np.float32)
        if backend == "numpy":
            self._search_numpy(ptr, terms, counts, k, rows, scores)
            return rows, scores
        search = kernels.search_batch
        if backend == "python":
            search = getattr(search, "py_func", search)
        search(ptr, terms, counts, n_sparse, k, self._kernel_index(), self.params, rows, scores)
        return rows, scores

    def _kernel_index(self) -> tuple[np.ndarray, ...]:
        """The arrays in the order the kernels take them."""
        names = ("idf", "upper", "norms", "doc_lengths", "sparse_ptr", "sparse_docs")
        names += ("sparse_tfs", "slot", "dense")
        return tuple(getattr(self, name) for name in names)

    def postings(self, term: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows ascending, float64 weights) of one term."""
        row = self.slot[term]
        if row < 0:
            span = slice(self.sparse_ptr[term], self.sparse_ptr[term + 1])
            docs, tfs = self.sparse_docs[span], self.sparse_tfs[span]
        else:
            docs = np.flatnonzero(self.dense[row])
            tfs = self.dense[row, docs]
        return docs, self.idf[term] * saturation(tfs, self.norms[self.doc_lengths[docs]], self.k1)

    def _search_numpy(self, ptr, terms, counts, k, rows, scores) -> None:
        """Exhaustive: every passage's score in float64, a chunk of queries at a time."""
        chunk = max(1, SCORE_BUDGET // self.n_docs)
        for start in range(0, len(ptr) - 1, chunk):
            stop = min(start + chunk, len(ptr) - 1)
            dense_scores = np.zeros((stop - start, self.n_docs))
            cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            for query in range(start, stop):
                for j in range(ptr[query], ptr[query + 1]):
                    term = int(terms[j])
                    if term not in cache:
                        cache[term] = self.postings(term)
                    docs, weights = cache[term]
                    dense_scores[query - start, docs] += counts[j] * weights
            rows[start:stop], best = top_k(dense_scores, k)
            scores[start:stop] = best

    def score_pairs(self, token_ids: np.ndarray, lengths: np.ndarray, docs: np.ndarray):
        """Exact float32 scores [B, K] of the given rows [B, K], equal to `search`'s."""
        ptr, terms, counts, _ = self.query_arrays(token_ids, lengths)
        out = np.zeros(docs.shape, dtype=np.float64)
        for query in range(len(docs)):
            for j in range(ptr[query], ptr[query + 1]):
                out[query] += counts[j] * self._weights_at(int(terms[j]), docs[query])
        return out.astype(np.float32)

    def _weights_at(self, term: int, docs: np.ndarray) -> np.ndarray:
        """Weights of one term in the given rows (0 where the term is absent)."""
        row = self.slot[term]
        if row >= 0:
            tfs = self.dense[row, docs]
        else:
            span = slice(self.sparse_ptr[term], self.sparse_ptr[term + 1])
            listed = self.sparse_docs[span]
            where = np.minimum(np.searchsorted(listed, docs), max(len(listed) - 1, 0))
            found = len(listed) > 0
            tfs = np.where(found & (listed[where] == docs), self.sparse_tfs[span][where], 0)
        weights = self.idf[term] * saturation(tfs, self.norms[self.doc_lengths[docs]], self.k1)
        return np.where(tfs > 0, weights, 0.0)


def _split_terms(indptr, indices, tfs, is_dense, n_docs) -> dict[str, np.ndarray]:
    """The sparse terms' postings and the dense terms' rows (the fields of those names)."""
    n_dense = int(is_dense.sum())
    slot = np.full(len(is_dense), -1, dtype=np.int16 if n_dense < 2**15 else np.int32)
    slot[is_dense] = np.arange(n_dense)
    doc_freq = np.diff(indptr)
    sparse_ptr = np.zeros(len(is_dense) + 1, dtype=np.int64)
    np.cumsum(np.where(is_dense, 0, doc_freq), out=sparse_ptr[1:])
    if sparse_ptr[-1] < 2**31:
        sparse_ptr = sparse_ptr.astype(np.int32)
    dense = np.zeros((n_dense, n_docs), dtype=tfs.dtype)
    for row, term in enumerate(np.flatnonzero(is_dense)):
        span = slice(indptr[term], indptr[term + 1])
        dense[row, indices[span]] = tfs[span]
    sparse = ~np.repeat(is_dense, doc_freq)
    return {
        "slot": slot,
        "sparse_ptr": sparse_ptr,
        "sparse_docs": indices[sparse].astype(np.int32, copy=False),
        "sparse_tfs": tfs[sparse],
        "dense": dense,
    }


def _upper_saturation(indptr, indices, tfs, norm, k1) -> np.ndarray:
    """Each term's largest saturation (0 for absent terms), a block of terms at a time."""
    n_terms = len(indptr) - 1
    upper = np.zeros(n_terms)
    for first, stop in _term_blocks(indptr):
        span = slice(indptr[first], indptr[stop])
        values = saturation(tfs[span], norm[indices[span]], k1)
        starts = indptr[first:stop] - indptr[first]
        present = np.flatnonzero(np.diff(indptr[first : stop + 1]) > 0)
        if len(present):
            upper[first + present] = np.maximum.reduceat(values, starts[present])
    return upper


def _term_blocks(indptr: np.ndarray):
    """(first term, end term) ranges holding about ENTRY_BLOCK postings each."""
    n_terms = len(indptr) - 1
    first = 0
    while first < n_terms:
        stop = int(np.searchsorted(indptr, indptr[first] + ENTRY_BLOCK, side="right")) - 1
        stop = min(max(stop, first + 1), n_terms)
        yield first, stop
        first = stop


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best columns by score desc then column asc: (columns, float32 scores)."""
    picked = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, picked, axis=1)
    boundary = values.min(axis=1)
    crowded = np.flatnonzero(np.count_nonzero(scores >= boundary[:, None], axis=1) > k)
    for row in crowded:  # a tie at the k-th score: keep the lowest columns
        above = np.flatnonzero(scores[row] > boundary[row])
        tied = np.flatnonzero(scores[row] == boundary[row])[: k - len(above)]
        picked[row] = np.concatenate([above, tied])
        values[row] = scores[row, picked[row]]
    order = np.lexsort((picked, -values), axis=1)
    picked = np.take_along_axis(picked, order, axis=1)
    return picked, np.take_along_axis(values, order, axis=1).astype(np.float32)


def term_ids(
    docs: Sequence[Sequence[str]], vocab: dict[str, int], grow: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated term ids and per-doc token counts; unknown terms are added (grow) or
    get id -1 (which searching and scoring ignore)."""
    if grow:
        ids = [vocab.setdefault(t, len(vocab)) for doc in docs for t in doc]
    else:
        ids = [vocab.get(t, -1) for doc in docs for t in doc]
    lengths = [len(doc) for doc in docs]
    return np.array(ids, dtype=np.int32), np.array(lengths, dtype=np.int64)
