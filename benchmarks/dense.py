"""Passage encoding throughput: latentrag's DPRRetriever vs SentenceTransformer.encode.

    .venv/bin/python benchmarks/dense.py [--squad PATH] [--n N] [--batch-size 64]
                                         [--max-length 128] [--repeats 3] [--chunk 256]

Both encode the same texts (the unique paragraph contexts of SQuAD v1.1 dev, first N) with
the same packaged all-MiniLM-L6-v2 weights, batch size, truncation length and torch threads
(the machine default), in one process. The DPR side is `passage_encoder.encode`, exactly what
`index()` and `refresh()` run; the peer is `encode(..., convert_to_tensor=True,
normalize_embeddings=True)`. The machine may be busy, so within each repeat the two sides
take turns on chunks of `--chunk` texts, alternating which goes first; each side reports its
best of the repeats. Target: ratio >= 0.9. The embeddings must agree to 1e-4.
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

from latentrag.plugins.dpr import DPRConfig  # noqa: E402
from latentrag.plugins.dpr.retriever import DPRRetriever  # noqa: E402
from latentrag.plugins.encoders import packaged_minilm_dir  # noqa: E402

SQUAD_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v1.1-dev.json"
TARGET_RATIO = 0.9
TOLERANCE = 1e-4
Runner = Callable[[list[str]], torch.Tensor]


def read_contexts(path: Path) -> list[str]:
    """Unique paragraph contexts in first-seen order."""
    data = json.loads(path.read_text("utf-8"))["data"]
    contexts = dict.fromkeys(p["context"] for a in data for p in a["paragraphs"])
    return list(contexts)


def best_throughputs(
    runners: dict[str, Runner], texts: list[str], chunk: int, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Passages/second of each runner, best of `repeats`.

    Within a repeat the two sides take turns chunk by chunk (alternating which goes first),
    so that both see the same machine load; a side's time is the sum over its chunks.
    """
    best = dict.fromkeys(runners, 0.0)
    outputs: dict[str, torch.Tensor] = {}
    names = list(runners)
    for repeat in range(repeats):
        seconds = dict.fromkeys(runners, 0.0)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in runners}
        for turn, start in enumerate(range(0, len(texts), chunk)):
            for name in names if (repeat + turn) % 2 == 0 else reversed(names):
                began = time.perf_counter()
                parts[name].append(runners[name](texts[start : start + chunk]).cpu())
                seconds[name] += time.perf_counter() - began
        for name in runners:
            best[name] = max(best[name], len(texts) / seconds[name])
            outputs[name] = torch.cat(parts[name])
        rates = "  ".join(f"{name} {len(texts) / seconds[name]:6.1f}" for name in names)
        print(f"  repeat {repeat + 1}: {rates} passages/s")
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", type=Path, default=SQUAD_DEV)
    parser.add_argument("--n", type=int, default=None, help="first N contexts (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256, help="texts per turn (0: all)")
    args = parser.parse_args()

    texts = read_contexts(args.squad)[: args.n]
    retriever = DPRRetriever(DPRConfig(model="minilm", max_length=args.max_length))
    peer = SentenceTransformer(str(packaged_minilm_dir()), device="cpu")
    peer.max_seq_length = args.max_length
    chunk = args.chunk or len(texts)
    print(
        f"{len(texts)} SQuAD dev contexts, batch size {args.batch_size}, max length "
        f"{args.max_length}, torch threads {torch.get_num_threads()}, turns of {chunk} texts, "
        f"best of {args.repeats}"
    )

    runners: dict[str, Runner] = {
        "latentrag dpr": lambda part: retriever.passage_encoder.encode(part, args.batch_size),
        "sentence-transformers": lambda part: peer.encode(
            part,
            batch_size=args.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ),
    }
    # warm-up: first-call allocations and kernel selection
    retriever.passage_encoder.encode(texts[: args.batch_size], args.batch_size)
    peer.encode(texts[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False)

    best, outputs = best_throughputs(runners, texts, chunk, args.repeats)
    ratio = best["latentrag dpr"] / best["sentence-transformers"]
    difference = (outputs["latentrag dpr"] - outputs["sentence-transformers"]).abs().max()
    print(f"latentrag dpr          {best['latentrag dpr']:8.1f} passages/s")
    print(f"sentence-transformers  {best['sentence-transformers']:8.1f} passages/s")
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio dpr / sentence-transformers = {ratio:.3f} (target >= {TARGET_RATIO}: {verdict})")
    agree = "ok" if difference < TOLERANCE else "MISMATCH"
    print(f"max |embedding difference| = {difference:.2e} (< {TOLERANCE:g}: {agree})")


if __name__ == "__main__":
    main()
