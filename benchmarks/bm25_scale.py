"""BM25 at scale on synthetic corpora: latentrag vs bm25s (numba, numpy) vs rank-bm25.

    .venv/bin/python benchmarks/bm25_scale.py [--sizes 10000,100000,1000000] [--rounds 3]

Passages draw ~60 term ids (Poisson) from a Zipfian vocabulary of 50k terms (s=1.1);
queries draw 8 ids from the same distribution (ids absent from the corpus dropped); fixed
seed. Every library gets the same pre-tokenized lists of int ids, top-10, one thread
(OMP/MKL/OpenBLAS/numba, torch, bm25s n_threads=0).

Each library builds its index in its own worker process and answers with each of its
backends from that one index (latentrag: numba, its pruned search, and numpy, the
exhaustive search used without numba; bm25s: numba and numpy): build time, index size
(in-memory arrays; a pickle for rank-bm25, which has no on-disk format) and peak RSS
growth over the input (VmHWM reset through /proc/self/clear_refs once the input is
built; an engine's peak is taken after its first answer, before the worker's next engine
ran). Then the workers take turns answering all the queries, `--rounds` times, and each
keeps its best queries/second: the machine is shared, and alternating exposes every
library to the same neighbours. Query time includes turning the query lists into the
library's input and is the process's CPU time (time.process_time). rank-bm25 (pure
Python, 100x slower) answers fewer queries, once, and only up to --rank-bm25-max-docs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("DISABLE_TQDM", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
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
WORKERS = ("latentrag", "bm25s", "rank-bm25")
#: the rows of the table: (worker, backend)
ENGINES = (
    ("latentrag", "auto"),
    ("latentrag", "numpy"),  # without numba: the exhaustive search, same results
    ("bm25s", "numba"),
    ("bm25s", "numpy"),
    ("rank-bm25", "python"),
)


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


# -- the libraries (in worker processes) -------------------------------------------------------


def run_latentrag(docs):
    from latentrag.plugins.bm25 import kernels
    from latentrag.plugins.bm25.index import BM25Index

    flat, lengths = flatten(docs)
    index = BM25Index.build(flat, lengths, int(flat.max()) + 1)

    def search(batch, backend):
        return index.search(*flatten(batch), K, backend=backend)

    backend = "numba" if kernels.NUMBA_AVAILABLE else "numpy"
    return search, index.nbytes, {"auto": backend}


def run_bm25s(docs):
    import bm25s

    model = bm25s.BM25(k1=1.5, b=0.75, method="robertson", backend="numba", auto_compile=False)
    model.index(docs, show_progress=False)
    by_backend = {"numba": model, "numpy": copy.copy(model)}  # the same index arrays
    by_backend["numpy"].backend = "numpy"

    def search(batch, backend):
        return by_backend[backend].retrieve(
            batch, k=K, n_threads=0, show_progress=False, backend_selection=backend
        )

    size = sum(model.scores[key].nbytes for key in ("data", "indices", "indptr"))
    return search, size, {}


def run_rank_bm25(docs):
    import rank_bm25

    model = rank_bm25.BM25Okapi(docs)

    def search(batch, backend):
        return [np.argpartition(model.get_scores(q), -K)[-K:] for q in batch]

    return search, len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)), {}


RUNNERS = {"latentrag": run_latentrag, "bm25s": run_bm25s, "rank-bm25": run_rank_bm25}
#: imported before the clock and the memory count start
MODULES = {"latentrag": "latentrag.plugins.bm25.index", "bm25s": "bm25s", "rank-bm25": "rank_bm25"}


def worker(library: str, n_docs: int, n_queries: int) -> None:
    """Build, report, then answer `run BACKEND` lines with queries/second until `quit`."""
    import torch

    torch.set_num_threads(1)
    importlib.import_module(MODULES[library])
    docs, queries = synthetic(n_docs, n_queries)
    tokens = sum(map(len, docs))
    rss_before, _ = memory_kb()
    reset_peak()
    start = time.process_time()
    search, size, aliases = RUNNERS[library](docs)
    build_s = time.process_time() - start
    del docs
    gc.collect()
    report = {"docs": n_docs, "tokens": tokens, "build_s": build_s, "index_mb": size / 2**20}
    warm = set()
    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "quit":
            break
        backend = arguments[0]
        if backend not in warm:  # compile / warm up, then the peak includes a search
            search(queries[:2], aliases.get(backend, backend))
            warm.add(backend)
        start = time.process_time()
        search(queries, aliases.get(backend, backend))
        elapsed = time.process_time() - start
        _, peak = memory_kb()
        answer = {**report, "peak_mb": (peak - rss_before) / 1024, "queries": len(queries)}
        answer |= {"qps": len(queries) / elapsed, "backend": aliases.get(backend, backend)}
        print(json.dumps(answer), flush=True)


# -- the driver -----------------------------------------------------------------------------


class Worker:
    """A worker process, asked for one timing at a time."""

    def __init__(self, library: str, n_docs: int, n_queries: int) -> None:
        command = [sys.executable, __file__, "--worker", library, str(n_docs), str(n_queries)]
        self.library = library
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, backend: str) -> dict | None:
        try:
            self.process.stdin.write(f"run {backend}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        self.process.wait()


def queries_for(library: str, n_docs: int, args) -> int:
    if library != "rank-bm25":
        return args.queries
    if n_docs > args.rank_bm25_max_docs:
        return 0
    return args.rank_bm25_queries if n_docs <= 10_000 else args.rank_bm25_queries_large


def measure(n_docs: int, args) -> dict[tuple[str, str], dict]:
    """Best (highest q/s) answer of each engine over the rounds, engines taking turns."""
    workers = {
        library: Worker(library, n_docs, queries_for(library, n_docs, args))
        for library in WORKERS
        if queries_for(library, n_docs, args)
    }
    best: dict[tuple[str, str], dict] = {}
    first_peak: dict[tuple[str, str], float] = {}  # before the worker's later engines ran
    try:
        for round_ in range(args.rounds):
            for library, backend in ENGINES:
                if library not in workers or (library == "rank-bm25" and round_ > 0):
                    continue
                answer = workers[library].run(backend)
                if answer is None:
                    print(f"{n_docs:>9} {library} {backend}: the worker failed", flush=True)
                    workers.pop(library).close()
                    continue
                first_peak.setdefault((library, backend), answer["peak_mb"])
                if answer["qps"] > best.get((library, backend), {"qps": 0.0})["qps"]:
                    best[(library, backend)] = answer | {"peak_mb": first_peak[(library, backend)]}
    finally:
        for process in workers.values():
            process.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="timings per engine, best kept")
    parser.add_argument("--rank-bm25-queries", type=int, default=200, help="at <=10k passages")
    parser.add_argument("--rank-bm25-queries-large", type=int, default=20, help="above 10k")
    parser.add_argument("--rank-bm25-max-docs", type=int, default=100_000)
    parser.add_argument("--worker", nargs=3, metavar=("LIBRARY", "DOCS", "QUERIES"))
    args = parser.parse_args()
    if args.worker:
        library, n_docs, n_queries = args.worker
        worker(library, int(n_docs), int(n_queries))
        return

    print(f"best of {args.rounds} alternating rounds; x: latentrag's q/s over the row's")
    header = f"{'passages':>9} {'engine':>15} {'build s':>8} {'index MB':>9} "
    header += f"{'peak MB':>8} {'queries':>7} {'q/s':>9} {'x':>7}"
    print(header)
    for n_docs in (int(s) for s in args.sizes.split(",")):
        best = measure(n_docs, args)
        ours = best.get(("latentrag", "auto"), {}).get("qps")
        shown = set()
        for (library, _), r in best.items():
            name = library if library == "rank-bm25" else f"{library}-{r['backend']}"
            if name in shown:  # latentrag without numba: "auto" is numpy already
                continue
            shown.add(name)
            ratio = f"{ours / r['qps']:7.2f}" if ours else f"{'':>7}"
            print(
                f"{r['docs']:>9} {name:>15} {r['build_s']:8.2f} {r['index_mb']:9.1f} "
                f"{r['peak_mb']:8.0f} {r['queries']:>7} {r['qps']:9.1f} {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
