"""BM25 on SQuAD v1.1 dev: latentrag vs bm25s (numba, numpy) vs rank-bm25, single thread.

    .venv/bin/python benchmarks/bm25.py [--squad PATH] [--rank-bm25-queries N] [--rounds 5]

All get the same tokens (latentrag's tokenizer). Query time includes tokenizing the
questions, for all; index build time is reported separately. Times are the process's CPU
seconds (time.process_time), single thread (numba too): the machine is shared, and wall
time would also measure the neighbours. latentrag and bm25s with each of their backends
(numba and numpy; one index each) take turns answering all the questions,
`--rounds` times, and each keeps its best: alternating exposes them to the same
neighbours. rank-bm25 runs once. bm25s runs with method="robertson" (Okapi's idf
log((N-n+.5)/(n+.5)) and tf saturation; it clips negative idf to 0 where rank-bm25 floors
it to epsilon * mean idf, and drops the constant (k1+1)).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_TQDM", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
import rank_bm25  # noqa: E402
import torch  # noqa: E402

from latentrag.core.types import Corpus, Passage  # noqa: E402
from latentrag.plugins.bm25 import BM25Config, kernels  # noqa: E402
from latentrag.plugins.bm25.retriever import BM25Retriever  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 10
TIE_TOLERANCE = 1e-6


def read_squad(path: Path) -> tuple[list[str], list[str]]:
    """Unique paragraph contexts (first-seen order) and every question."""
    data = json.loads(path.read_text("utf-8"))["data"]
    contexts: dict[str, None] = {}
    questions: list[str] = []
    for article in data:
        for paragraph in article["paragraphs"]:
            contexts.setdefault(paragraph["context"])
            questions.extend(qa["question"] for qa in paragraph["qas"])
    return list(contexts), questions


def timed(fn, *args, **kwargs):
    start = time.process_time()
    result = fn(*args, **kwargs)
    return result, time.process_time() - start


def rank_bm25_top(model: rank_bm25.BM25Okapi, tokenizer, questions: list[str]):
    """Top-K rows and all scores per question, best first (ties: lower row first)."""
    tops, scores = [], []
    for question in questions:
        row_scores = model.get_scores(tokenizer(question))
        tops.append(np.lexsort((np.arange(len(row_scores)), -row_scores))[:K])
        scores.append(row_scores)
    return np.array(tops), scores


def agrees(ours: np.ndarray, reference: np.ndarray, reference_scores: np.ndarray) -> bool:
    """Same top-K, where passages whose reference scores tie within tolerance may swap."""
    if np.array_equal(ours, reference):
        return True
    return bool(
        np.all(np.abs(reference_scores[ours] - reference_scores[reference]) <= TIE_TOLERANCE)
    )


def agreement(tops: np.ndarray, ref_tops: np.ndarray, ref_scores: list[np.ndarray]) -> float:
    n = len(ref_tops)
    return sum(agrees(tops[i], ref_tops[i], ref_scores[i]) for i in range(n)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, default=REPO / "../shared/data/squad-v1.1-dev.json")
    parser.add_argument("--rank-bm25-queries", type=int, default=None, help="default: all")
    parser.add_argument("--rounds", type=int, default=5, help="timings per engine, best kept")
    args = parser.parse_args()
    torch.set_num_threads(1)

    contexts, questions = read_squad(args.squad)
    corpus = Corpus(Passage(id=str(i), text=text) for i, text in enumerate(contexts))
    print(f"SQuAD v1.1 dev: {len(corpus)} passages, {len(questions)} questions, top-{K}")

    ours = BM25Retriever(BM25Config())
    tokenizer = ours.tokenizer
    _, build_ours = timed(ours.index, corpus)
    doc_tokens = tokenizer.batch(contexts)
    bm25s_model = bm25s.BM25(
        k1=1.5, b=0.75, method="robertson", backend="numba", auto_compile=False
    )
    _, build_bm25s = timed(bm25s_model.index, doc_tokens, show_progress=False)
    rank_model, build_rank = timed(rank_bm25.BM25Okapi, doc_tokens)
    print(
        f"index build (s): latentrag {build_ours:.2f} (incl. tokenizing)  "
        f"bm25s {build_bm25s:.2f}  rank-bm25 {build_rank:.2f} (both given tokens)"
    )

    bm25s_numba = bm25s_model
    bm25s_numpy = copy.copy(bm25s_model)  # the same index, answering with numpy
    bm25s_numpy.backend = "numpy"

    def run_ours():
        return ours.retrieve(questions, K).indices.numpy()

    def run_bm25s(model, backend):
        def run():
            return model.retrieve(
                tokenizer.batch(questions),
                k=K,
                n_threads=0,
                show_progress=False,
                backend_selection=backend,
            )[0]

        return run

    def run_ours_numpy():  # the exhaustive search used without numba (same results)
        return ours.built.search(*ours.query_terms(questions), K, backend="numpy")[0]

    engines = {
        "latentrag": run_ours,
        "latentrag-numpy": run_ours_numpy,
        "bm25s-numba": run_bm25s(bm25s_numba, "numba"),
        "bm25s-numpy": run_bm25s(bm25s_numpy, "numpy"),
    }
    for run in engines.values():  # warm-up (compiles the numba kernels)
        run()
    best: dict[str, float] = {}
    tops: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, run in engines.items():
            tops[name], elapsed = timed(run)
            best[name] = min(best.get(name, np.inf), elapsed)

    n_rank = min(args.rank_bm25_queries or len(questions), len(questions))
    (top_rank, rank_scores), time_rank = timed(
        rank_bm25_top, rank_model, tokenizer, questions[:n_rank]
    )

    qps = {name: len(questions) / elapsed for name, elapsed in best.items()}
    qps_rank = n_rank / time_rank
    print(f"rank-bm25 queries used: {n_rank} of {len(questions)}")
    agree = {name: agreement(top[:n_rank], top_rank, rank_scores) for name, top in tops.items()}
    print(
        f"top-{K} agreement with rank-bm25 (ties within {TIE_TOLERANCE:g} count equal): "
        + "  ".join(f"{name} {value:.4f}" for name, value in agree.items())
    )
    backend = "numba" if kernels.NUMBA_AVAILABLE else "numpy"
    print(
        f"queries/second, single thread, best of {args.rounds} alternating rounds "
        "(query time includes tokenizing, for all):"
    )
    rows = [
        ("latentrag", qps["latentrag"], f"{backend} backend"),
        ("latentrag-numpy", qps["latentrag-numpy"], "exhaustive numpy search: without numba"),
        ("bm25s-numba", qps["bm25s-numba"], "numba backend, n_threads=0"),
        ("bm25s-numpy", qps["bm25s-numpy"], "numpy backend, n_threads=0"),
        ("rank-bm25", qps_rank, "once"),
    ]
    for name, value, note in rows:
        print(f"  {name:<15} {value:10.0f}   ({note})")
    print(f"ratio latentrag/bm25s-numba {qps['latentrag'] / qps['bm25s-numba']:7.2f}")
    print(f"ratio latentrag/bm25s-numpy {qps['latentrag'] / qps['bm25s-numpy']:7.2f}")
    print(f"ratio latentrag/rank-bm25   {qps['latentrag'] / qps_rank:7.2f}")
    size_ours = ours.built.nbytes / 2**20
    size_bm25s = sum(bm25s_model.scores[key].nbytes for key in ("data", "indices", "indptr"))
    print(f"index MB: latentrag {size_ours:.2f}  bm25s {size_bm25s / 2**20:.2f}")


if __name__ == "__main__":
    main()
