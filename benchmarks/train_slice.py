"""Does end-to-end training on the shipped SQuAD slice improve retrieval and answers?

For each estimator (topk, topk-token, vrag, jsa), the demo's pipeline (examples/demo.toml:
a MiniLM prior whose query encoder learns, a MiniLM posterior reading "question answer",
the packaged SmolLM2-135M frozen) is trained for --steps steps on the first --train
training questions. Printed per estimator: the prior's recall@1 on the dev split and on
the training questions, answer F1 on the first --qa dev questions (greedy, top-1 passage),
before -> after; steps; wall time of the training loop and of the whole run.

The frozen generator's log-likelihoods and answers are cached in --cache (default
runs/demo, where `make demo` leaves them, so a run after the demo reuses its scores).
topk-token reads per-token log-probabilities, which that cache does not hold: every one of
its steps runs the generator.

With --lora the generator learns too: LoRA adapters (r 8, alpha 16 on q_proj and v_proj,
lr --generator-lr) on SmolLM2, passages cut to --passage-tokens tokens, k --k. The cache
does not apply to a trainable generator (it changes), so every step runs the generator
forward and backward, and F1 is measured by generating afresh before and after training.

    .venv/bin/python benchmarks/train_slice.py [--steps 24] [--train 32] [--qa 32]
    .venv/bin/python benchmarks/train_slice.py --lora [--steps 40] [--k 2] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from latentrag.core.config import load_config  # noqa: E402
from latentrag.experiments.demo import (  # noqa: E402
    ANSWER_FILE,
    DEMO_CONFIG,
    LOGLIK_FILE,
    AnswerCache,
    DemoRun,
    peak_rss_mb,
)
from latentrag.experiments.tables import format_table  # noqa: E402
from latentrag.training.loglik_cache import LoglikCache  # noqa: E402

ESTIMATORS = ("topk", "topk-token", "vrag", "jsa")


def before_after(metrics: dict, key: str) -> str:
    before, after = metrics[f"{key} (before)"], metrics[key]
    return f"{before:.3f} -> {after:.3f}"


def rises(metrics: dict, key: str) -> bool:
    return metrics[key] > metrics[f"{key} (before)"]


def lora_overrides(args: argparse.Namespace) -> list[str]:
    """Settings that make the generator learn through LoRA adapters."""
    return [
        "generator.freeze=false",
        'generator.lora={r = 8, alpha = 16.0, target_modules = ["q_proj", "v_proj"]}',
        f"generator.max_passage_tokens={args.passage_tokens}",
        f"estimator.k={args.k}",
        f"train.batch_size={args.batch}",
        f"train.lr={args.prior_lr}",
        f"train.lrs={{retriever = {args.prior_lr}, generator = {args.generator_lr}}}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--train", type=int, default=32, help="training questions")
    parser.add_argument("--qa", type=int, default=32, help="dev questions answered (F1)")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--cache", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/train_slice"))
    parser.add_argument("--lora", action="store_true", help="train the generator's LoRA too")
    parser.add_argument("--k", type=int, default=2, help="passages per example (--lora)")
    parser.add_argument("--batch", type=int, default=2, help="examples per step (--lora)")
    parser.add_argument("--passage-tokens", type=int, default=64, help="(--lora)")
    parser.add_argument("--prior-lr", type=float, default=2e-5, help="(--lora)")
    parser.add_argument("--generator-lr", type=float, default=1e-3, help="(--lora)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = DemoRun(
        LoglikCache(args.cache / LOGLIK_FILE), AnswerCache(args.cache / ANSWER_FILE), args.qa
    )
    rows = []
    for name in args.estimators.split(","):
        overrides = [
            f"estimator.name={name}",
            f"train.steps={args.steps}",
            f"data.max_train={args.train}",
            f"train.seed={args.seed}",
        ]
        if args.lora:
            overrides += lora_overrides(args)
        resolved = load_config(args.config, overrides)
        out_dir = args.out / name
        shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run each time
        start = time.perf_counter()
        metrics = run.train(resolved, args.config, out_dir)  # its pipeline gets run.logliks
        rows.append(
            {
                "estimator": name,
                "recall@1 dev": before_after(metrics, "recall@1"),
                "recall@1 train": before_after(metrics, "train recall@1"),
                f"F1 ({args.qa} dev)": before_after(metrics, "f1"),
                "both rise": "yes" if rises(metrics, "recall@1") and rises(metrics, "f1") else "no",
                "steps": args.steps,
                "train s": metrics["train time (s)"],
                "run s": round(time.perf_counter() - start, 1),
                "pairs scored": metrics["pairs scored"],
            }
        )
    generator = (
        f"SmolLM2-135M + LoRA (lr {args.generator_lr}, k {args.k}, batch {args.batch}, "
        f"passages {args.passage_tokens} tokens, prior lr {args.prior_lr})"
        if args.lora
        else "frozen SmolLM2-135M"
    )
    print()
    print(
        f"SQuAD slice, {args.train} training questions, dev recall@1 over the whole dev split "
        f"(223), F1 over its first {args.qa}; {generator}, MiniLM prior and posterior"
    )
    print(format_table(rows, markdown=False))
    print(f"peak RSS {peak_rss_mb():.0f} MB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
