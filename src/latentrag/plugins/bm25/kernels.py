"""Exact top-k BM25 search with dynamic pruning, one query at a time.

The functions are written in the subset of Python that numba compiles. With numba
installed (an optional dependency) they are compiled on first use and cached on disk;
without it `index.py` searches with its exhaustive numpy path instead, and these run as
plain Python only in tests on small corpora.

A query is answered a block of passages at a time (BLOCK consecutive rows), so that the
block's sums stay in the CPU cache. When all its weights are >= 0 (otherwise every
passage is scored: partial sums are then no lower bounds):

1. Seed: one pass over the sparse terms' postings keeps the k passages with the best
   sparse sums; their exact scores (dense terms added by lookups in the dense tf rows)
   give theta, a lower bound on the final k-th best score.
2. Each block: the sparse postings are added into the block's sums (exact). If the dense
   terms' largest weights could lift an untouched passage to theta, or too many touched
   ones, the block's dense tf rows are swept with float32 arithmetic (it vectorises) and
   only passages whose approximate score comes within a bound on the float32 error of
   theta are scored exactly; otherwise only touched passages whose sum plus that bound
   reaches theta are. Theta rises with the k-th best exact score found.
3. Fewer than k passages with a positive score: the rest are the lowest rows (score 0).

Exact scores always add the terms in one order (sparse terms by ascending id, then dense
terms by ascending id), as the numpy path does, so both give identical floats.

Tuples passed around: query (terms, counts, lo, mid, hi): terms[lo:mid] sparse,
terms[mid:hi] dense; index (idf, upper, norm by length, lengths, sparse_ptr, sparse_docs,
sparse_tfs, slot, dense); params (k1 + 1, and in float32: k1 + 1, k1 * (1 - b),
k1 * b / avgdl); work (sums, touched, block scores, block norms, cursors); heap (scores,
rows) of the k best so far, worst at the root.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # optional: the numpy path in index.py is used instead
    numba = None

NUMBA_AVAILABLE = numba is not None

#: relative slack on comparisons of float64 bounds (their rounding error is ~1e-16)
SLACK = 1e-9
#: per-term relative error allowance of the float32 sweep (its true error is < 1e-6)
SWEEP_SLACK = 1e-6
#: passages per block (the block's sums and scores stay in the L1/L2 cache)
BLOCK = 4096
#: passages checked at once for scores near theta in a swept block
SCAN = 64
#: looking up a touched passage's dense terms costs about this many sweep steps
SWEEP_RATIO = 16
#: queries with a positive idf below this are scored exhaustively (a weight could round
#: to 0, and a zero sum marks an untouched passage)
TINY_WEIGHT = 1e-20


def jit(function=None, *, inline: bool = False):
    """numba.njit (cached, GIL released, numpy's float semantics so loops vectorise) when
    numba is installed, else the function itself. `inline`: numba does not inline calls
    between cached functions, and small hot helpers pay for the call otherwise."""
    if function is None:
        return lambda f: jit(f, inline=inline)
    if numba is None:
        return function
    options = {"cache": True, "nogil": True, "error_model": "numpy"}
    if inline:
        options["inline"] = "always"
    return numba.njit(**options)(function)


# -- small helpers ---------------------------------------------------------------------------


@jit(inline=True)
def weight(idf, tf, k1p1, norm):
    """One term's BM25 weight in one passage (rank-bm25's expression and order)."""
    return idf * ((tf * k1p1) / (tf + norm))


@jit(inline=True)
def worse(score_a, doc_a, score_b, doc_b):
    """Does (score_a, doc_a) rank below (score_b, doc_b)? Higher score first, then lower row."""
    return score_a < score_b or (score_a == score_b and doc_a > doc_b)


@jit(inline=True)
def below(bound, theta):
    """Is `bound` surely below theta, rounding error included?"""
    return bound < theta - SLACK * abs(theta)


@jit(inline=True)
def offer(heap, size, k, score, doc):
    """Offer a passage to the k best kept in the heap; return the heap's new size."""
    scores, docs = heap
    if size < k:
        i = size
        while i > 0 and worse(score, doc, scores[(i - 1) >> 1], docs[(i - 1) >> 1]):
            scores[i], docs[i] = scores[(i - 1) >> 1], docs[(i - 1) >> 1]
            i = (i - 1) >> 1
        scores[i], docs[i] = score, doc
        return size + 1
    if not worse(scores[0], docs[0], score, doc):
        return size
    i = 0
    while 2 * i + 1 < size:
        child = 2 * i + 1
        right = child + 1
        if right < size and worse(scores[right], docs[right], scores[child], docs[child]):
            child = right
        if not worse(scores[child], docs[child], score, doc):
            break
        scores[i], docs[i] = scores[child], docs[child]
        i = child
    scores[i], docs[i] = score, doc
    return size


@jit(inline=True)
def add_dense(score, doc, query, index, k1p1):
    """`score` plus the weights in `doc` of the query's dense terms (ascending id)."""
    terms, counts, _, mid, hi = query
    idf, norms, lengths, slot, dense = index[0], index[2], index[3], index[7], index[8]
    norm = norms[lengths[doc]]
    for j in range(mid, hi):
        tf = dense[slot[terms[j]], doc]
        if tf != 0:
            score += counts[j] * weight(idf[terms[j]], tf, k1p1, norm)
    return score


# -- the batch -----------------------------------------------------------------------------


@jit
def search_batch(query_ptr, terms, counts, n_sparse, k, index, params, out_docs, out_scores):
    """Top-k (rows, scores) of every query, best first, into out_docs/out_scores [B, k].

    Query q's terms are terms[query_ptr[q]:query_ptr[q+1]] with their counts: its first
    n_sparse[q] terms are sparse (ascending id), the rest dense (ascending id).
    """
    cursors = np.empty(max(n_sparse.max(), 1) if n_sparse.shape[0] else 1, np.int64)
    work = (
        np.zeros(BLOCK),
        np.empty(BLOCK, np.int64),
        np.empty(BLOCK, np.float32),
        np.empty(BLOCK, np.float32),
        cursors,
    )
    heap = (np.empty(k), np.empty(k, np.int64))
    for q in range(query_ptr.shape[0] - 1):
        lo, hi = query_ptr[q], query_ptr[q + 1]
        query = (terms, counts, lo, lo + n_sparse[q], hi)
        if needs_exhaustive(query, index):
            size = exhaustive(query, k, index, params, heap)
        else:
            size = pruned(query, k, index, params, work, heap)
        emit(heap, size, out_docs[q], out_scores[q])


@jit
def needs_exhaustive(query, index):
    """A negative weight, or a positive one so small that it might round to 0."""
    terms, _, lo, _, hi = query
    for j in range(lo, hi):
        value = index[0][terms[j]]
        if value < 0 or 0 < value < TINY_WEIGHT:
            return True
    return False


@jit
def exhaustive(query, k, index, params, heap):
    """Score every passage, adding the terms in the canonical order."""
    terms, counts, lo, mid, hi = query
    idf, norms, k1p1 = index[0], index[2], params[0]
    lengths, sparse_ptr, sparse_docs, sparse_tfs, slot, dense = index[3:]
    acc = np.zeros(lengths.shape[0])
    for j in range(lo, mid):
        term, count = terms[j], counts[j]
        for p in range(sparse_ptr[term], sparse_ptr[term + 1]):
            doc = sparse_docs[p]
            acc[doc] += count * weight(idf[term], sparse_tfs[p], k1p1, norms[lengths[doc]])
    for j in range(mid, hi):
        term, count = terms[j], counts[j]
        row = dense[slot[term]]
        for doc in range(acc.shape[0]):
            if row[doc] != 0:
                acc[doc] += count * weight(idf[term], row[doc], k1p1, norms[lengths[doc]])
    size = 0
    for doc in range(acc.shape[0]):
        size = offer(heap, size, k, acc[doc], doc)
    return size


# -- pruned search ---------------------------------------------------------------------------


@jit
def pruned(query, k, index, params, work, heap):
    """Exact top-k of one query whose weights are all >= 0 (work's sums are 0 before and
    after)."""
    terms, counts, lo, mid, hi = query
    sums, touched = work[0], work[1]
    dense_upper, total_upper = 0.0, 0.0
    for j in range(lo, hi):
        total_upper += counts[j] * index[1][terms[j]]
        if j >= mid:
            dense_upper += counts[j] * index[1][terms[j]]
    theta, kept = -np.inf, -1
    if lo < mid < hi:
        theta, kept = seed(query, k, index, params, work, heap)
    margin = SWEEP_SLACK * (10 + hi - lo) * total_upper
    n_docs = index[3].shape[0]
    start_cursors(query, index, work[4])
    size = 0
    for start in range(0, n_docs if lo < hi else 0, BLOCK):  # 2. block by block
        stop = min(start + BLOCK, n_docs)
        if kept >= 0:  # a corpus of one block: its sums are still there from the seed
            n_touched, kept = kept, -1
        else:
            n_touched = add_sparse(query, start, stop, index, params[0], work)
        if size == k:
            theta = max(theta, heap[0][0])
        if mid == hi:  # no dense terms: the sparse sums are the scores
            for i in range(n_touched):
                size = offer(heap, size, k, sums[touched[i]], start + touched[i])
        elif needs_sweep(dense_upper, theta, sums, touched, n_touched, stop - start):
            bounds = (theta, margin)
            size = sweep(query, k, index, params, start, stop, bounds, work, n_touched, heap, size)
        else:
            bounds = (theta, dense_upper)
            size = score_touched(
                query, k, index, params, start, bounds, work, n_touched, heap, size
            )
        for i in range(n_touched):
            sums[touched[i]] = 0.0
    if size < k:
        size = fill_zeros(k, n_docs, heap, size)
    return size


@jit
def seed(query, k, index, params, work, heap):
    """1. (theta, kept): theta is the worst exact score of the k passages with the best
    sparse sums (-inf when fewer than k passages have a positive sum); a corpus of one
    block keeps its sums in work, and kept is then its number of touched passages (else
    -1)."""
    sums, touched = work[0], work[1]
    n_docs = index[3].shape[0]
    start_cursors(query, index, work[4])
    size, n_touched = 0, 0
    for start in range(0, n_docs, BLOCK):
        n_touched = add_sparse(query, start, min(start + BLOCK, n_docs), index, params[0], work)
        for i in range(n_touched):
            size = offer(heap, size, k, sums[touched[i]], start + touched[i])
            if n_docs > BLOCK:
                sums[touched[i]] = 0.0
    kept = n_touched if n_docs <= BLOCK else -1
    if size < k:
        return -np.inf, kept
    theta = np.inf
    for i in range(size):
        theta = min(theta, add_dense(heap[0][i], heap[1][i], query, index, params[0]))
    return theta, kept


@jit(inline=True)
def start_cursors(query, index, cursors):
    """Each sparse term's cursor at the start of its postings."""
    terms, _, lo, mid, _ = query
    for j in range(lo, mid):
        cursors[j - lo] = index[4][terms[j]]


@jit(inline=True)
def add_sparse(query, start, stop, index, k1p1, work):
    """2. The sparse terms' postings in rows start..stop added into the block's sums
    (exact, terms in order); returns how many passages were touched (offsets listed)."""
    terms, counts, lo, mid, _ = query
    idf, norms, lengths = index[0], index[2], index[3]
    sparse_ptr, sparse_docs, sparse_tfs = index[4], index[5], index[6]
    sums, touched, cursors = work[0], work[1], work[4]
    n_touched = 0
    for j in range(lo, mid):
        term, count = terms[j], counts[j]
        if idf[term] == 0:  # adds nothing (and would not mark its passages touched)
            continue
        p, end = cursors[j - lo], sparse_ptr[term + 1]
        while p < end and sparse_docs[p] < stop:
            doc = sparse_docs[p]
            if sums[doc - start] == 0.0:  # weights are > 0: a zero sum is untouched
                touched[n_touched] = doc - start
                n_touched += 1
            norm = norms[lengths[doc]]
            sums[doc - start] += count * weight(idf[term], sparse_tfs[p], k1p1, norm)
            p += 1
        cursors[j - lo] = p
    return n_touched


@jit(inline=True)
def needs_sweep(dense_upper, theta, sums, touched, n_touched, width):
    """Sweep the block when an untouched passage could reach theta, or when the touched
    passages that could are too many to look up one by one."""
    if not below(dense_upper, theta):
        return True
    survivors = 0
    for i in range(n_touched):
        survivors += not below(sums[touched[i]] + dense_upper, theta)
    return survivors * SWEEP_RATIO > width


@jit
def score_touched(query, k, index, params, start, bounds, work, n_touched, heap, size):
    """Exact scores of the block's touched passages whose sum plus the dense terms' largest
    weights reaches theta; bounds = (theta, that sum of largest weights)."""
    theta, dense_upper = bounds
    sums, touched = work[0], work[1]
    for i in range(n_touched):
        partial = sums[touched[i]]
        if below(partial + dense_upper, theta):
            continue
        score = add_dense(partial, start + touched[i], query, index, params[0])
        if not below(score, theta):
            size = offer(heap, size, k, score, start + touched[i])
            if size == k:
                theta = max(theta, heap[0][0])
    return size


@jit
def sweep(query, k, index, params, start, stop, bounds, work, n_touched, heap, size):
    """The block's float32 scores (dense terms plus the sparse sums), then exact scores for
    the passages within `margin` (the float32 error) of theta; bounds = (theta, margin)."""
    terms, counts, _, mid, hi = query
    idf, lengths, slot, dense = index[0], index[3], index[7], index[8]
    sums, touched = work[0], work[1]
    width = stop - start
    block, norms = work[2][:width], work[3][:width]
    float32_norms(lengths[start:stop], params[2], params[3], norms)
    for j in range(mid, hi):
        coef = np.float32(counts[j] * idf[terms[j]])
        saturation(dense[slot[terms[j]], start:stop], norms, block, coef, params[1], j == mid)
    for i in range(n_touched):
        block[touched[i]] += np.float32(sums[touched[i]])
    theta, margin = bounds
    cut = theta - margin - SLACK * abs(theta)
    for first in range(0, width, SCAN):
        last = min(first + SCAN, width)
        left = count_at_least(block[first:last], cut)
        i = first
        while left > 0 and i < last:  # theta may rise meanwhile: stop at the end anyway
            if block[i] >= cut:
                left -= 1
                if block[i] > 0:
                    score = add_dense(sums[i], start + i, query, index, params[0])
                    if not below(score, theta):
                        size = offer(heap, size, k, score, start + i)
                        if size == k and heap[0][0] > theta:
                            theta = heap[0][0]
                            cut = theta - margin - SLACK * abs(theta)
            i += 1
    return size


@jit
def float32_norms(lengths, base, per_length, out):
    """k1 * (1 - b + b * dl / avgdl) per passage, in float32."""
    for i in range(out.shape[0]):
        out[i] = base + per_length * np.float32(lengths[i])


@jit
def saturation(tfs, norms, scores, coef, k1p1, first):
    """scores (+)= coef * tf*(k1+1) / (tf + norm), in float32 (a loop that vectorises)."""
    if first:
        for i in range(scores.shape[0]):
            tf = np.float32(tfs[i])
            scores[i] = coef * ((tf * k1p1) / max(tf + norms[i], np.float32(1e-30)))
    else:
        for i in range(scores.shape[0]):
            tf = np.float32(tfs[i])
            scores[i] += coef * ((tf * k1p1) / max(tf + norms[i], np.float32(1e-30)))


@jit
def count_at_least(values, cut):
    """How many values are >= cut (a loop that vectorises, unlike max with its NaN rules)."""
    count = 0
    for i in range(values.shape[0]):
        count += values[i] >= cut
    return count


# -- the end -------------------------------------------------------------------------------


@jit
def fill_zeros(k, n_docs, heap, size):
    """Complete the heap with the lowest rows not in it (they all score 0)."""
    listed = heap[1][:size].copy()
    doc = 0
    while size < k and doc < n_docs:
        if not (listed == doc).any():
            size = offer(heap, size, k, 0.0, doc)
        doc += 1
    return size


@jit
def emit(heap, size, out_docs, out_scores):
    """Write the heap's passages best first (insertion sort: k is small)."""
    scores, docs = heap[0][:size].copy(), heap[1][:size].copy()
    for i in range(1, size):
        score, doc = scores[i], docs[i]
        j = i - 1
        while j >= 0 and worse(scores[j], docs[j], score, doc):
            scores[j + 1], docs[j + 1] = scores[j], docs[j]
            j -= 1
        scores[j + 1], docs[j + 1] = score, doc
    out_docs[:size] = docs
    out_scores[:size] = scores
