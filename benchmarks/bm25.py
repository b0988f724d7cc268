"""BM25 on SQuAD v1.1 dev: latentrag vs bm25s vs rank-bm25, single thread.

    .venv/bin/python benchmarks/bm25.py [--squad PATH] [--rank-bm25-queries N]

All three get the same tokens (latentrag's tokenizer). Query time includes tokenizing the
questions, for all three; index build time is reported separately. Times are the process's
CPU seconds (time.process_time), single thread: the machine is shared, and wall time would
also measure the neighbours. bm25s runs with
method="robertson" (Okapi's idf log((N-n+.5)/(n+.5)) and tf saturation; it clips negative
idf to 0 where rank-bm25 floors it to epsilon * mean idf, and drops the constant (k1+1)).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_TQDM", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
import rank_bm25  # noqa: E402
import torch  # noqa: E402

from latentrag.core.types import Corpus, Passage  # noqa: E402
from latentrag.plugins.bm25 import BM25Config  # noqa: E402
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
    args = parser.parse_args()
    torch.set_num_threads(1)

    contexts, questions = read_squad(args.squad)
    corpus = Corpus(Passage(id=str(i), text=text) for i, text in enumerate(contexts))
    print(f"SQuAD v1.1 dev: {len(corpus)} passages, {len(questions)} questions, top-{K}")

    ours = BM25Retriever(BM25Config())
    tokenizer = ours.tokenizer
    _, build_ours = timed(ours.index, corpus)
    doc_tokens = tokenizer.batch(contexts)
    bm25s_model = bm25s.BM25(k1=1.5, b=0.75, method="robertson")
    _, build_bm25s = timed(bm25s_model.index, doc_tokens, show_progress=False)
    rank_model, build_rank = timed(rank_bm25.BM25Okapi, doc_tokens)
    print(
        f"index build (s): latentrag {build_ours:.2f} (incl. tokenizing)  "
        f"bm25s {build_bm25s:.2f}  rank-bm25 {build_rank:.2f} (both given tokens)"
    )

    ours.retrieve(questions[:64], K)  # warm-up
    candidates, time_ours = timed(ours.retrieve, questions, K)
    top_ours = candidates.indices.numpy()

    def run_bm25s():
        return bm25s_model.retrieve(
            tokenizer.batch(questions),
            k=K,
            n_threads=0,
            show_progress=False,
            backend_selection="numpy",
        )

    (top_bm25s, _), time_bm25s = timed(run_bm25s)

    n_rank = min(args.rank_bm25_queries or len(questions), len(questions))
    (top_rank, rank_scores), time_rank = timed(
        rank_bm25_top, rank_model, tokenizer, questions[:n_rank]
    )

    qps_ours = len(questions) / time_ours
    qps_bm25s = len(questions) / time_bm25s
    qps_rank = n_rank / time_rank
    print(f"rank-bm25 queries used: {n_rank} of {len(questions)}")
    print(
        f"top-{K} agreement with rank-bm25 (ties within {TIE_TOLERANCE:g} count equal): "
        f"latentrag {agreement(top_ours, top_rank, rank_scores):.4f}  "
        f"bm25s {agreement(top_bm25s, top_rank, rank_scores):.4f}"
    )
    print("queries/second, single thread (query time includes tokenizing, for all three):")
    print(f"  latentrag {qps_ours:10.0f}")
    print(f"  bm25s     {qps_bm25s:10.0f}   (numpy backend, n_threads=0)")
    print(f"  rank-bm25 {qps_rank:10.0f}")
    print(f"ratio latentrag/bm25s     {qps_ours / qps_bm25s:7.2f}  (target >= 1.0)")
    print(f"ratio latentrag/rank-bm25 {qps_ours / qps_rank:7.2f}  (target >= 20)")


if __name__ == "__main__":
    main()
