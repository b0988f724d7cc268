"""Reranker recall before and after G-Rerank training on the shipped SQuAD slice.

    .venv/bin/python benchmarks/grerank.py [--steps 20] [--batch-size 2] [--dev 100]
        [--k 4] [--keep 2] [--lr 1e-4] [--max-passage-tokens 64] [--config PATH]

The pipeline is examples/grerank.toml: BM25 proposes k candidates per question, the
"gumbel" reranker scores them with a MiniLM cross-encoder, and the frozen SmolLM2-135M
reads all k at once under the relaxed top-`keep` mask of those scores. Only the
cross-encoder is trained (AdamW, gradient norm clipped at 1), from the language-modelling
loss of the answer alone: no gold passage is used in training.

Recall is measured on dev questions over the same BM25 candidates: the reranker's
recall@1 and recall@keep (gold passage ranked first / among the kept ones), next to BM25's
own order on those candidates; BM25 recall@k is the ceiling of any reranking.

The defaults are a small budget: a training step backpropagates through the whole frozen
135M-parameter generator over k passages, about 15-50 s on 2 CPU cores (k=4, 64-token
passages, 2 questions); the config's own sizes (k=8, 128 tokens) cost about 4x more.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from latentrag.core.config import load_config  # noqa: E402
from latentrag.core.pipeline import Pipeline  # noqa: E402
from latentrag.core.types import Batch, Example  # noqa: E402
from latentrag.data import load_squad_slice  # noqa: E402
from latentrag.experiments.tables import format_table  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "grerank.toml"


def chunks(examples: list[Example], size: int):
    for start in range(0, len(examples), size):
        yield Batch(examples[start : start + size])


@torch.no_grad()
def recall(pipeline: Pipeline, examples: list[Example], k: int, keep: int) -> dict[str, float]:
    """Recall@1 and @keep of the reranker's and of BM25's order over BM25's top k."""
    modules = pipeline.reranker.trainable_modules().values()
    for module in modules:
        module.eval()
    hits = {"bm25@1": 0, f"bm25@{keep}": 0, f"bm25@{k}": 0, "rerank@1": 0, f"rerank@{keep}": 0}
    for batch in chunks(examples, 8):
        cand = pipeline.candidates(batch, "prior", k)
        order = pipeline.rerank_scores(batch, cand).argsort(-1, descending=True)
        reranked = cand.indices.gather(1, order)
        for example, bm25_rows, rerank_rows in zip(
            batch.examples, cand.indices.tolist(), reranked.tolist()
        ):
            gold = {pipeline.corpus.index_of(g) for g in example.gold_ids}
            for name, rows, depth in [
                ("bm25@1", bm25_rows, 1),
                (f"bm25@{keep}", bm25_rows, keep),
                (f"bm25@{k}", bm25_rows, k),
                ("rerank@1", rerank_rows, 1),
                (f"rerank@{keep}", rerank_rows, keep),
            ]:
                hits[name] += bool(gold & set(rows[:depth]))
    for module in modules:
        module.train()
    return {name: count / len(examples) for name, count in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--dev", type=int, default=100, help="dev questions for recall")
    parser.add_argument("--k", type=int, default=4, help="BM25 candidates per question")
    parser.add_argument("--keep", type=int, default=2, help="k of the relaxed top-k mask")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-passage-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # -- setup: the example config with this run's sizes --
    overrides = [
        f"estimator.k={args.k}",
        f"estimator.k_keep={args.keep}",
        f"reranker.k={args.keep}",
        f"generator.max_passage_tokens={args.max_passage_tokens}",
    ]
    resolved = load_config(args.config, overrides)
    corpus, train = load_squad_slice("train")
    _, dev = load_squad_slice("dev")
    dev = dev[: args.dev]
    started = time.perf_counter()
    pipeline = Pipeline.from_config(resolved, corpus)
    print(f"built the pipeline in {time.perf_counter() - started:.0f}s")

    # -- before --
    started = time.perf_counter()
    before = recall(pipeline, dev, args.k, args.keep)
    eval_seconds = time.perf_counter() - started

    # -- train the reranker only, from the LM loss --
    params = [
        p
        for module in pipeline.reranker.trainable_modules().values()
        for p in module.parameters()
        if p.requires_grad
    ]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    order = list(train)
    random.Random(args.seed).shuffle(order)
    started = time.perf_counter()
    for step in range(args.steps):
        start = step * args.batch_size % len(order)
        batch = Batch(order[start : start + args.batch_size])
        out = pipeline.estimator.loss(batch, pipeline)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            d = out.diagnostics
            print(
                f"step {step:3d}  loss {out.loss.item():8.3f}  mask entropy "
                f"{d['mask_entropy']:.3f}  mask max {d['mask_max']:.3f}"
                f"  ({time.perf_counter() - started:.0f}s)"
            )
    train_seconds = time.perf_counter() - started

    # -- after --
    after = recall(pipeline, dev, args.k, args.keep)
    rows = [
        {"model": "bm25 order", "when": "-", "recall@1": before["bm25@1"],
         f"recall@{args.keep}": before[f"bm25@{args.keep}"]},
        {"model": "gumbel(cross-encoder)", "when": "before", "recall@1": before["rerank@1"],
         f"recall@{args.keep}": before[f"rerank@{args.keep}"]},
        {"model": "gumbel(cross-encoder)", "when": f"after {args.steps} steps",
         "recall@1": after["rerank@1"], f"recall@{args.keep}": after[f"rerank@{args.keep}"]},
    ]  # fmt: skip
    print()
    print(
        f"SQuAD slice dev, {len(dev)} questions, reranking BM25's top {args.k} "
        f"(BM25 recall@{args.k} = {before[f'bm25@{args.k}']:.3f}: the ceiling)"
    )
    print(format_table(rows))
    print(
        f"\ntraining: {args.steps} steps x {args.batch_size} questions in {train_seconds:.0f}s "
        f"({train_seconds / max(args.steps, 1):.1f}s/step); one recall pass {eval_seconds:.0f}s; "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
