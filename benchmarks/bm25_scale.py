"""BM25 at scale on synthetic corpora: latentrag vs bm25s vs rank-bm25, single thread.

    .venv/bin/python benchmarks/bm25_scale.py [--sizes 10000,100000,1000000]

Passages draw ~60 term ids (Poisson) from a Zipfian vocabulary of 50k terms (s=1.1);
queries draw 8 ids from the same distribution (ids absent from the corpus dropped); fixed
seed. Every library gets the same pre-tokenized lists of int ids. Each (library, size)
runs in its own process: build time (from the id lists), index size (in-memory arrays; a
pickle for rank-bm25, which has no on-disk format), peak RSS growth over the input
(VmHWM reset through /proc/self/clear_refs after the input is built) and queries/second
(top-10, including turning the query lists into the library's input). Times are the
process's CPU seconds (time.process_time), single thread: the machine is shared.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("DISABLE_TQDM", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

VOCAB = 50_000
ZIPF_S = 1.1
PASSAGE_TOKENS = 60
QUERY_TOKENS = 8
K = 10
SEED = 1234
LIBRARIES = ("latentrag", "bm25s", "rank-bm25")


def synthetic(n_docs: int, n_queries: int) -> tuple[list[list[int]], list[list[int]]]:
    """Corpus and queries as lists of int ids; corpus ids renumbered 0..V'-1 (bm25s needs
    contiguous ids)."""
    rng = np.random.default_rng(SEED)
    weights = np.arange(1, VOCAB + 1, dtype=np.float64) ** -ZIPF_S
    weights /= weights.sum()
    lengths = np.maximum(rng.poisson(PASSAGE_TOKENS, n_docs), 1)
    flat = rng.choice(VOCAB, size=int(lengths.sum()), p=weights)
    present = np.bincount(flat, minlength=VOCAB) > 0
    renumber = np.cumsum(present) - 1
    queries_flat = rng.choice(VOCAB, size=n_queries * QUERY_TOKENS, p=weights)
    queries = [
        [int(renumber[t]) for t in row if present[t]]
        for row in queries_flat.reshape(n_queries, QUERY_TOKENS)
    ]
    ids = renumber[flat].tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    docs = [ids[start:stop] for start, stop in itertools.pairwise(bounds)]
    return docs, [q for q in queries if q]


def flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=lengths.sum())
    return flat, lengths


def memory_kb() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in kB."""
    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle)
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# -- one library, in a worker process -------------------------------------------------------


def run_latentrag(docs, queries):
    from latentrag.plugins.bm25.retriever import BM25Index, bm25_weights

    def build():
        flat, lengths = flatten(docs)
        return BM25Index(bm25_weights(flat, lengths, int(flat.max()) + 1), vocab={})

    def search(index, batch):
        return index.search(*flatten(batch), K)

    def size(index):
        w = index.weights
        return w.data.nbytes + w.indices.nbytes + w.indptr.nbytes + index.dense_rows.nbytes

    return build, search, size


def run_bm25s(docs, queries):
    import bm25s

    def build():
        model = bm25s.BM25(k1=1.5, b=0.75, method="robertson")
        model.index(docs, show_progress=False)
        return model

    def search(model, batch):
        return model.retrieve(
            batch, k=K, n_threads=0, show_progress=False, backend_selection="numpy"
        )

    def size(model):
        return sum(model.scores[key].nbytes for key in ("data", "indices", "indptr"))

    return build, search, size


def run_rank_bm25(docs, queries):
    import rank_bm25

    def build():
        return rank_bm25.BM25Okapi(docs)

    def search(model, batch):
        return [np.argpartition(model.get_scores(q), -K)[-K:] for q in batch]

    def size(model):
        return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))

    return build, search, size


RUNNERS = {"latentrag": run_latentrag, "bm25s": run_bm25s, "rank-bm25": run_rank_bm25}


def worker(library: str, n_docs: int, n_queries: int) -> dict:
    import torch

    torch.set_num_threads(1)
    docs, queries = synthetic(n_docs, n_queries)
    build, search, size = RUNNERS[library](docs, queries)
    rss_before, _ = memory_kb()
    reset_peak()
    start = time.process_time()
    index = build()
    build_s = time.process_time() - start
    search(index, queries[:2])  # warm-up
    start = time.process_time()
    search(index, queries)
    query_s = time.process_time() - start
    _, peak = memory_kb()
    return {
        "library": library,
        "docs": n_docs,
        "tokens": sum(map(len, docs)),
        "build_s": build_s,
        "index_mb": size(index) / 2**20,
        "peak_mb": (peak - rss_before) / 1024,
        "queries": len(queries),
        "qps": len(queries) / query_s,
    }


# -- the driver -----------------------------------------------------------------------------


def queries_for(library: str, n_docs: int, args) -> int:
    if library != "rank-bm25":
        return args.queries
    if n_docs > args.rank_bm25_max_docs:
        return 0
    return args.rank_bm25_queries if n_docs <= 10_000 else args.rank_bm25_queries_large


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rank-bm25-queries", type=int, default=200, help="at <=10k passages")
    parser.add_argument("--rank-bm25-queries-large", type=int, default=20, help="above 10k")
    parser.add_argument("--rank-bm25-max-docs", type=int, default=100_000)
    parser.add_argument("--worker", nargs=3, metavar=("LIBRARY", "DOCS", "QUERIES"))
    args = parser.parse_args()
    if args.worker:
        library, n_docs, n_queries = args.worker
        print(json.dumps(worker(library, int(n_docs), int(n_queries))))
        return

    header = f"{'passages':>9} {'library':>10} {'build s':>8} {'index MB':>9} "
    header += f"{'peak MB':>8} {'queries':>7} {'q/s':>9} {'latentrag x':>11}"
    print(header)
    for n_docs in (int(s) for s in args.sizes.split(",")):
        rows = []
        for library in LIBRARIES:
            n_queries = queries_for(library, n_docs, args)
            if not n_queries:
                continue
            command = [sys.executable, __file__, "--worker", library, str(n_docs), str(n_queries)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{n_docs:>9} {library:>10} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ours = next((r["qps"] for r in rows if r["library"] == "latentrag"), None)
        for r in rows:
            ratio = f"{ours / r['qps']:11.1f}" if ours else f"{'':>11}"
            print(
                f"{r['docs']:>9} {r['library']:>10} {r['build_s']:8.2f} {r['index_mb']:9.1f} "
                f"{r['peak_mb']:8.0f} {r['queries']:>7} {r['qps']:9.1f} {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
