"""hf-causal-lm on the packaged SmolLM2-135M: load times and teacher-forced scoring speed.

    .venv/bin/python benchmarks/generator.py [--questions B] [--passages K] [--convert]

Load: `--convert` times the GGUF -> safetensors conversion into a fresh temporary cache,
then the load from the (default) cache. Scoring: log p(answer | question, passage) for
B questions x K SQuAD-slice passages, no grad, three ways on the same model:

- ours: `loglik`, micro-batches of 16 right-padded sequences, logits only at answer tokens;
- one-at-a-time: the same code with batch_size=1 (no padding at all);
- full-logits: one padded forward per micro-batch computing [n, L, V] logits and a full
  log_softmax, then gathering the answer tokens (the straightforward implementation).

Plus forward+backward time of `loglik` (full fine-tuning). Results must agree to 1e-4.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from latentrag.data import load_squad_slice  # noqa: E402
from latentrag.plugins.hf_generator import HFGeneratorConfig, smollm2  # noqa: E402
from latentrag.plugins.hf_generator.generator import (  # noqa: E402
    HFCausalLMGenerator,
    pad_right,
)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def full_logits_loglik(gen: HFCausalLMGenerator, queries, passages, targets) -> torch.Tensor:
    """The straightforward peer: full [n, L, V] logits and log_softmax, then gather."""
    prompts = gen._prompt_ids(
        [gen.prompt(q, [p]) for q, row in zip(queries, passages) for p in row]
    )
    answers = gen._target_ids(targets)
    k = len(passages[0])
    answers = [answers[b] for b in range(len(queries)) for _ in range(k)]
    scores = []
    for start in range(0, len(prompts), gen.config.batch_size):
        rows = range(start, min(start + gen.config.batch_size, len(prompts)))
        ids, attention = pad_right([prompts[i] + answers[i] for i in rows], gen.pad_id)
        logprobs = torch.log_softmax(gen.model(input_ids=ids, attention_mask=attention).logits, -1)
        for row, i in enumerate(rows):
            first = len(prompts[i]) - 1
            steps = torch.arange(len(answers[i]))
            scores.append(logprobs[row, first + steps, torch.tensor(answers[i])].sum())
    return torch.stack(scores).view(len(queries), k)


def workload(questions: int, passages: int):
    corpus, examples = load_squad_slice("train")
    examples = examples[:questions]
    texts = corpus.texts()
    rows = [  # the gold passage first, then arbitrary others
        [corpus.index_of(e.gold_ids[0])]
        + [(37 * b + 11 * j) % len(texts) for j in range(1, passages)]
        for b, e in enumerate(examples)
    ]
    return (
        [e.question for e in examples],
        [[texts[r] for r in row] for row in rows],
        [e.target for e in examples],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--convert", action="store_true", help="also time a fresh conversion")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f}")

    if args.convert:
        with tempfile.TemporaryDirectory() as fresh:
            _, seconds = timed(smollm2.converted_dir, fresh)
            print(f"GGUF -> safetensors conversion (fresh cache): {seconds:6.1f} s")
    smollm2.converted_dir()  # make sure the default cache exists before timing the load
    gen, seconds = timed(HFCausalLMGenerator, HFGeneratorConfig(model="smollm2"))
    print(f"load from the safetensors cache:             {seconds:6.1f} s")

    queries, passages, targets = workload(args.questions, args.passages)
    n = len(queries) * len(passages[0])
    with torch.no_grad():
        gen.loglik(queries[:1], [passages[0][:1]], targets[:1])  # warm-up (page in weights)
        ours, t_ours = timed(gen.loglik, queries, passages, targets)
        gen.config.batch_size = 1
        alone, t_alone = timed(gen.loglik, queries, passages, targets)
        gen.config.batch_size = 16
        full, t_full = timed(full_logits_loglik, gen, queries, passages, targets)
    gen.zero_grad()
    _, t_grad = timed(lambda: gen.loglik(queries, passages, targets).sum().backward())

    print(f"scoring {n} sequences (B={len(queries)}, K={len(passages[0])}), no grad:")
    print(f"  ours (micro-batch 16):  {t_ours:6.2f} s   1.00x")
    print(f"  one-at-a-time:          {t_alone:6.2f} s   {t_alone / t_ours:.2f}x ours")
    print(f"  full-logits peer:       {t_full:6.2f} s   {t_full / t_ours:.2f}x ours")
    print(f"  ours forward+backward:  {t_grad:6.2f} s")
    diff_alone = (ours - alone).abs().max().item()
    diff_full = (ours - full).abs().max().item()
    print(
        f"  max |ours - one-at-a-time| = {diff_alone:.2e}, |ours - full-logits| = {diff_full:.2e}"
    )
    gold_wins = (ours.argmax(-1) == 0).float().mean().item()
    print(f"  gold passage (k=0) has the highest loglik for {gold_wins:.0%} of questions")


if __name__ == "__main__":
    main()
