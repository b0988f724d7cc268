"""Passage encoding throughput: latentrag's DPRRetriever vs SentenceTransformer.encode.

    .venv/bin/python benchmarks/dense.py [--squad PATH] [--n N] [--batch-size 64]
                                         [--max-length 128] [--repeats 3]

Both encode the same texts (the unique paragraph contexts of SQuAD v1.1 dev, first N) with
the same packaged all-MiniLM-L6-v2 weights, batch size, truncation length and torch threads
(the machine default), in one process. The DPR side is `passage_encoder.encode`, exactly what
`index()` and `refresh()` run; the peer is `encode(..., convert_to_tensor=True,
normalize_embeddings=True)`. Runs alternate order; each side reports its best of the
repeats. Target: ratio >= 0.9. The embeddings must agree to 1e-4.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from latentrag.plugins.dpr import DPRConfig, DPRRetriever  # noqa: E402
from latentrag.plugins.encoders import packaged_minilm_dir  # noqa: E402

SQUAD_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v1.1-dev.json"
TARGET_RATIO = 0.9
TOLERANCE = 1e-4


def read_contexts(path: Path) -> list[str]:
    """Unique paragraph contexts in first-seen order."""
    data = json.loads(path.read_text("utf-8"))["data"]
    contexts = dict.fromkeys(p["context"] for a in data for p in a["paragraphs"])
    return list(contexts)


def best_throughputs(
    runners: dict[str, Callable[[], torch.Tensor]], count: int, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Passages/second, best of `repeats`, alternating which side runs first."""
    best = dict.fromkeys(runners, 0.0)
    outputs: dict[str, torch.Tensor] = {}
    names = list(runners)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            outputs[name] = runners[name]()
            seconds = time.perf_counter() - start
            best[name] = max(best[name], count / seconds)
            print(f"  repeat {repeat + 1} {name:<22} {count / seconds:8.1f} passages/s")
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, default=SQUAD_DEV)
    parser.add_argument("--n", type=int, default=None, help="first N contexts (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    texts = read_contexts(args.squad)[: args.n]
    retriever = DPRRetriever(DPRConfig(model="minilm", max_length=args.max_length))
    peer = SentenceTransformer(str(packaged_minilm_dir()), device="cpu")
    peer.max_seq_length = args.max_length
    print(
        f"{len(texts)} SQuAD dev contexts, batch size {args.batch_size}, max length "
        f"{args.max_length}, torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )

    runners = {
        "latentrag dpr": lambda: retriever.passage_encoder.encode(texts, args.batch_size),
        "sentence-transformers": lambda: peer.encode(
            texts,
            batch_size=args.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ),
    }
    # warm-up: first-call allocations and kernel selection
    retriever.passage_encoder.encode(texts[: args.batch_size], args.batch_size)
    peer.encode(texts[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False)

    best, outputs = best_throughputs(runners, len(texts), args.repeats)
    ratio = best["latentrag dpr"] / best["sentence-transformers"]
    difference = (outputs["latentrag dpr"] - outputs["sentence-transformers"].cpu()).abs().max()
    print(f"latentrag dpr          {best['latentrag dpr']:8.1f} passages/s")
    print(f"sentence-transformers  {best['sentence-transformers']:8.1f} passages/s")
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio dpr / sentence-transformers = {ratio:.3f} (target >= {TARGET_RATIO}: {verdict})")
    agree = "ok" if difference < TOLERANCE else "MISMATCH"
    print(f"max |embedding difference| = {difference:.2e} (< {TOLERANCE:g}: {agree})")


if __name__ == "__main__":
    main()
