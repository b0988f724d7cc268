"""bfloat16 against float32, in one run: encoder throughput, retrieval quality, generator
step time, and the loss after the same training steps.

    .venv/bin/python benchmarks/precision.py [--repeats 3] [--gen-steps 3] [--toy-steps 50]
        [--threads 1]

1. Encoder: the packaged MiniLM encodes the shipped slice's 300 passages (128 tokens,
   batches of 64) in each encoder precision (`precision` of dpr and cross-encoder:
   float32, bfloat16 weights, bf16-mixed = float32 weights under bfloat16 autocast);
   passages/s, best of `--repeats`, the precisions interleaved so that a change in the
   machine's load hits them alike.
2. Retrieval: a `dpr` retriever (MiniLM, both encoders) in each precision indexes the slice
   and answers its dev questions; hit@1 and hit@5 from `evaluate_retrieval`.
3. Generator: SmolLM2-135M in float32 and with bfloat16 weights (`dtype`), (a) frozen
   scoring of 2 questions x 4 passages (no passage cache, so every token runs), (b) a LoRA
   training step (2 questions x 2 passages, forward, backward, AdamW step); seconds, best
   of `--gen-steps`.
4. Loss: `--toy-steps` top-K steps on the toy corpus (12 passages) with a tiny random dpr
   retriever and a tiny random Llama with LoRA, the same seed in every precision; the mean
   loss over the last 5 steps, relative to float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from latentrag.core.pipeline import Pipeline  # noqa: E402
from latentrag.core.types import Batch  # noqa: E402
from latentrag.data import load_squad_slice  # noqa: E402
from latentrag.evaluation.measure import evaluate_retrieval  # noqa: E402
from latentrag.plugins.dpr import DPRConfig  # noqa: E402
from latentrag.plugins.dpr.retriever import DPRRetriever  # noqa: E402
from latentrag.plugins.encoders import load_sentence_encoder, resolve_precision  # noqa: E402
from latentrag.plugins.estimators.topk import TopKConfig  # noqa: E402
from latentrag.plugins.estimators.topk.estimator import TopKEstimator  # noqa: E402
from latentrag.plugins.hf_generator import HFGeneratorConfig, LoraSettings  # noqa: E402
from latentrag.plugins.hf_generator.generator import (  # noqa: E402
    HFCausalLMGenerator,
    resolve_dtype,
)
from latentrag.toy.corpus import toy_corpus, toy_examples  # noqa: E402

#: the tokens the README figures were measured at (MiniLM's own max_seq_length is 256)
MAX_LENGTH = 128
ENCODER_PRECISIONS = ("float32", "bfloat16", "bf16-mixed")
HITS = ("hit@1", "hit@5")
GENERATOR_DTYPES = ("float32", "bfloat16")


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def encoder_throughput(texts: list[str], repeats: int) -> dict[str, float]:
    """Passages per second of MiniLM's `encode` in each precision (interleaved)."""
    encoders = {
        p: load_sentence_encoder("minilm", max_length=MAX_LENGTH, precision=p)
        for p in ENCODER_PRECISIONS
    }
    for encoder in encoders.values():
        encoder.encode(texts[:64])  # warm up (oneDNN kernels, allocator)
    best = {p: float("inf") for p in encoders}
    for _ in range(repeats):
        for precision, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode(texts)
            best[precision] = min(best[precision], time.perf_counter() - started)
    return {p: len(texts) / seconds for p, seconds in best.items()}


def retrieval_quality(corpus, dev) -> dict[str, dict[str, float]]:
    results = {}
    for precision in ENCODER_PRECISIONS:
        config = DPRConfig(model="minilm", max_length=MAX_LENGTH, precision=precision)
        retriever = DPRRetriever(config)
        assert retriever.query_encoder.precision == precision
        retriever.index(corpus)
        results[precision] = evaluate_retrieval(retriever, corpus, dev, ks=(1, 5))
    return results


def scoring_seconds(dtype: str, batch: tuple, steps: int) -> float:
    """Frozen scoring of 2 questions x 4 passages, no passage cache."""
    config = HFGeneratorConfig(model="smollm2", dtype=dtype, freeze=True, passage_cache_mb=0)
    generator = HFCausalLMGenerator(config)
    with torch.no_grad():
        generator.loglik(*batch)  # warm up
        return best_seconds(lambda: generator.loglik(*batch), steps)


def lora_step_seconds(dtype: str, batch: tuple, steps: int) -> float:
    """A top-K-style LoRA step (loglik, backward, AdamW) on 2 questions x 2 passages."""
    lora = LoraSettings(target_modules=["q_proj", "v_proj"])
    config = HFGeneratorConfig(model="smollm2", dtype=dtype, lora=lora, max_passage_tokens=64)
    generator = HFCausalLMGenerator(config)
    params = [p for p in generator.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step() -> None:
        loss = -generator.loglik(*batch).logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm up
    return best_seconds(step, steps)


def generator_times(corpus, train, steps: int) -> dict[str, tuple[float, float]]:
    """(frozen scoring s, LoRA training step s) per dtype."""
    texts = corpus.texts()
    questions = [e.question for e in train[:2]]
    targets = [e.target for e in train[:2]]
    four = (questions, [texts[0:4], texts[4:8]], targets)
    two = (questions, [texts[0:2], texts[2:4]], targets)
    return {
        dtype: (scoring_seconds(dtype, four, steps), lora_step_seconds(dtype, two, steps))
        for dtype in GENERATOR_DTYPES
    }


def toy_loss(encoder_precision: str, generator_dtype: str, steps: int) -> float:
    """Mean loss of the last 5 of `steps` top-K steps on the toy corpus (seeded)."""
    torch.manual_seed(0)
    corpus, examples = toy_corpus(), toy_examples()
    retriever = DPRRetriever(DPRConfig(model="tiny-random", precision=encoder_precision))
    assert retriever.query_encoder.precision == encoder_precision
    generator = HFCausalLMGenerator(
        HFGeneratorConfig(model="tiny-llama", dtype=generator_dtype, lora=LoraSettings())
    )
    estimator = TopKEstimator(TopKConfig(k=4))
    pipeline = Pipeline(corpus, retriever=retriever, generator=generator, estimator=estimator)
    pipeline.index()
    params = [
        p
        for component in (retriever, generator)
        for module in component.trainable_modules().values()
        for p in module.parameters()
        if p.requires_grad
    ]
    for component in (retriever, generator):
        for module in component.trainable_modules().values():
            module.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(steps):
        start = step * 4 % len(examples)
        out = estimator.loss(Batch(examples[start : start + 4]), pipeline)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    tail = losses[-5:]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-steps", type=int, default=3)
    parser.add_argument("--toy-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus, train = load_squad_slice("train")
    _, dev = load_squad_slice("dev")
    print(f"{torch.get_num_threads()} thread(s); bf16 CPU support: {bf16_flags()}")

    rate = encoder_throughput(corpus.texts(), args.repeats)
    quality = retrieval_quality(corpus, dev)
    print(
        f"\nencoder: MiniLM on the slice's {len(corpus)} passages; dpr on {len(dev)} dev questions"
    )
    print(f"{'precision':<11} {'passages/s':>10} {'x fp32':>6} {'hit@1':>6} {'hit@5':>6}")
    for p in ENCODER_PRECISIONS:
        hits = quality[p]
        print(
            f"{p:<11} {rate[p]:10.1f} {rate[p] / rate['float32']:6.2f} "
            f"{hits['hit@1']:6.3f} {hits['hit@5']:6.3f}"
        )

    times = generator_times(corpus, train, args.gen_steps)
    print("\ngenerator: SmolLM2-135M (frozen scoring: 2 x 4 passages; LoRA step: 2 x 2, 64 tok)")
    print(f"{'dtype':<9} {'scoring s':>9} {'x fp32':>6} {'LoRA step s':>11} {'x fp32':>6}")
    for dtype in GENERATOR_DTYPES:
        scoring, step = times[dtype]
        base_scoring, base_step = times["float32"]
        print(
            f"{dtype:<9} {scoring:9.2f} {base_scoring / scoring:6.2f} {step:11.2f} "
            f"{base_step / step:6.2f}"
        )

    print(f"\nloss after {args.toy_steps} toy top-K steps (tiny dpr + tiny Llama with LoRA)")
    runs = [("float32", "float32")]
    runs += [(p, "float32") for p in ENCODER_PRECISIONS[1:]] + [("float32", "bfloat16")]
    losses = {run: toy_loss(*run, args.toy_steps) for run in runs}
    base = losses[runs[0]]
    print(f"{'encoders':<11} {'generator':<9} {'loss':>8} {'vs fp32':>8}")
    for (encoder_precision, generator_dtype), loss in losses.items():
        change = (loss - base) / abs(base)
        print(f"{encoder_precision:<11} {generator_dtype:<9} {loss:8.4f} {change:+8.2%}")

    print("\nwins without loss (faster; hit@1/5 within 0.005; toy loss within 2%):")
    for p in ENCODER_PRECISIONS[1:]:
        close = all(abs(quality[p][m] - quality["float32"][m]) <= 0.005 for m in HITS)
        same = abs(losses[(p, "float32")] - base) <= 0.02 * abs(base)
        print(f"  encoders {p:<10} {verdict(rate[p] > rate['float32'] and close and same)}")
    scoring, step = times["bfloat16"]
    faster = scoring < times["float32"][0] and step < times["float32"][1]
    same = abs(losses[("float32", "bfloat16")] - base) <= 0.02 * abs(base)
    print(f"  generator bfloat16  {verdict(faster and same)}")
    print(
        f"'auto' on this machine: encoders {resolve_precision('auto', 'minilm')}, frozen or "
        f"LoRA SmolLM2 {resolve_dtype(HFGeneratorConfig(model='smollm2', freeze=True))}"
    )


def verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def bf16_flags() -> str:
    flags = set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16", "amx_tile"})
    return ", ".join(found) or "none"


if __name__ == "__main__":
    main()
