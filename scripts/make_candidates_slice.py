"""Build closed candidate lists (HotpotQA distractor style) from the shipped SQuAD slice.

    .venv/bin/python scripts/make_candidates_slice.py --out /tmp/candidates --split dev

Writes into OUT:

- ``passages.jsonl``: the slice's 300 passages;
- ``<split>.jsonl``: each question with ``candidate_ids``, 10 passages: its gold paragraph,
  up to 4 other paragraphs of the same article (topical distractors) and random paragraphs
  of other articles, shuffled; plus extra fields (``article``, ``source``) that the reader
  ignores;
- ``<split>_pairs.jsonl``: two-gold questions (the multi-hop case): two questions about
  different articles joined into one, gold = both paragraphs, 10 candidates (both golds,
  2 same-article distractors of each, 4 random), so all-gold recall@k and hit@k differ;
- ``eval.toml``: a config reading them (``--set`` the retriever).

Everything is drawn from a seeded generator: the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from latentrag.core.types import Example
    from latentrag.data import load_squad_slice
    from latentrag.data.readers import write_jsonl
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))
    from latentrag.core.types import Example
    from latentrag.data import load_squad_slice
    from latentrag.data.readers import write_jsonl

SIZE = 10
CONFIG = """\
[data]
format = "latentrag"
corpus = "passages.jsonl"
{split} = "{split}.jsonl"

[retriever]
name = "bm25"

[eval]
recall_at = [2, 5]
metrics = ["hit", "recall", "all", "mrr", "ndcg"]
"""


def article(passage_id: str) -> str:
    return passage_id.rsplit("#", 1)[0]


def candidates(gold: list[str], by_article: dict, all_ids: list[str], rng, same: int) -> list:
    """The gold ids, `same` other paragraphs of each gold's article, random others: SIZE."""
    chosen = list(gold)
    for pid in gold:
        others = [p for p in by_article[article(pid)] if p not in chosen]
        chosen += rng.sample(others, min(same, len(others)))
    rest = [p for p in all_ids if p not in chosen and article(p) not in map(article, gold)]
    chosen += rng.sample(rest, SIZE - len(chosen))
    rng.shuffle(chosen)
    return chosen


def record(example: Example, candidate_ids: list[str], source: str) -> dict:
    return {
        "id": example.id,
        "question": example.question,
        "answers": list(example.answers),
        "gold_ids": list(example.gold_ids),
        "candidate_ids": candidate_ids,
        "article": article(example.gold_ids[0]).replace("_", " "),
        "source": source,
    }


def pairs(examples: list[Example], rng) -> list[Example]:
    """Consecutive questions (shuffled) about different articles, joined two by two."""
    pool = list(examples)
    rng.shuffle(pool)
    joined = []
    while len(pool) >= 2:
        first = pool.pop()
        partner = next(
            (e for e in pool if article(e.gold_ids[0]) != article(first.gold_ids[0])), None
        )
        if partner is None:
            break
        pool.remove(partner)
        question = f"{first.question} {partner.question}"
        gold = (first.gold_ids[0], partner.gold_ids[0])
        joined.append(Example(f"{first.id}+{partner.id}", question, first.answers, gold))
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus, examples = load_squad_slice(args.split)
    rng = random.Random(args.seed)
    by_article: dict[str, list[str]] = defaultdict(list)
    for pid in corpus.ids:
        by_article[article(pid)].append(pid)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "passages.jsonl", corpus)
    single = [
        record(e, candidates(list(e.gold_ids), by_article, corpus.ids, rng, 4), "squad-slice")
        for e in examples
    ]
    write_jsonl(args.out / f"{args.split}.jsonl", single)
    joined = [
        record(e, candidates(list(e.gold_ids), by_article, corpus.ids, rng, 2), "pairs")
        for e in pairs(examples, rng)
    ]
    write_jsonl(args.out / f"{args.split}_pairs.jsonl", joined)
    (args.out / "eval.toml").write_text(CONFIG.format(split=args.split), encoding="utf-8")
    counts = f"{len(single)} questions, {len(joined)} two-gold questions"
    print(f"{args.out}: {counts}, {SIZE} candidates each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
