"""Build the small SQuAD slice that latentrag ships (src/latentrag/data/squad_slice/).

    python scripts/make_squad_slice.py            # from the repository root, defaults below

Reads the official SQuAD v1.1 dev set (checked against its SHA-256), picks 300 paragraphs of
at most 120 words, stratified over all 48 articles (each article's share proportional to its
number of short paragraphs, at least one each; the paragraphs drawn at random with the seed),
takes every question asked about them and splits the questions 70/15/15 into train/dev/test
(shuffled with the same seed, then cut). Writes passages.jsonl, train.jsonl, dev.jsonl,
test.jsonl, NOTICE and manifest.json. The output depends only on the source file and the
seed: running it twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from latentrag.core.types import Example, Passage
    from latentrag.data.readers import atomic_write_bytes, read_squad, write_jsonl
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO / "src"))
    from latentrag.core.types import Example, Passage
    from latentrag.data.readers import atomic_write_bytes, read_squad, write_jsonl

SOURCE = REPO.parent / "shared/data/squad-v1.1-dev.json"
SOURCE_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
OUT = REPO / "src/latentrag/data/squad_slice"
N_PASSAGES = 300
MAX_WORDS = 120
SPLITS = (("train", 0.70), ("dev", 0.15), ("test", 0.15))

NOTICE = """\
SQuAD slice shipped with latentrag
==================================

Source: the SQuAD v1.1 development set (dev-v1.1.json),
  SHA-256 {sha256}.
  Pranav Rajpurkar, Jian Zhang, Konstantin Lopyrev, Percy Liang,
  "SQuAD: 100,000+ Questions for Machine Comprehension of Text", EMNLP 2016.
  https://rajpurkar.github.io/SQuAD-explorer/

Licence: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
  https://creativecommons.org/licenses/by-sa/4.0/
  These files are a derived work and are shared under the same licence.

What was changed:
  - Selection: {n_passages} paragraphs of at most {max_words} words (whitespace-split),
    drawn at random (seed {seed}) from all {n_articles} articles, each article's share
    proportional to its number of such paragraphs; every question asked about a selected
    paragraph is kept, and no other question.
  - Split: the questions shuffled (seed {seed}) and cut 70/15/15 into train/dev/test
    ({counts}).
  - Reformatting to JSONL: passages.jsonl holds {{"id", "title", "text"}}, where id is
    "<article title>#<paragraph index in the article>" and title is the article title with
    underscores as spaces; the split files hold {{"id", "question", "answers", "gold_ids"}},
    where answers are the distinct answer texts in annotation order (answer_start dropped)
    and gold_ids is the id of the question's paragraph. Paragraph, question and answer
    texts are unchanged.

Rebuild (from the latentrag repository root, with the source file at
../shared/data/squad-v1.1-dev.json):
  python scripts/make_squad_slice.py --seed {seed}
"""


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def article_of(passage: Passage) -> str:
    return passage.id.rsplit("#", 1)[0]


def quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over groups proportionally to `sizes`, at least 1 each (largest remainder)."""
    pool = sum(sizes.values())
    if total > pool or total < len(sizes):
        raise ValueError(f"cannot draw {total} from {len(sizes)} groups holding {pool}")
    share = {k: total * n / pool for k, n in sizes.items()}
    quota = {k: min(sizes[k], max(1, int(share[k]))) for k in sizes}
    order = sorted(sizes, key=lambda k: share[k] - quota[k], reverse=True)  # ties: source order
    while sum(quota.values()) < total:  # give to the largest remainders first
        k = next(k for k in order if quota[k] < sizes[k])
        quota[k] += 1
        order.remove(k)
        order.append(k)
    while sum(quota.values()) > total:  # take from the most over-served groups
        k = max((k for k in sizes if quota[k] > 1), key=lambda k: quota[k] - share[k])
        quota[k] -= 1
    return quota


def select_passages(passages: Sequence[Passage], seed: int) -> list[Passage]:
    """N_PASSAGES short paragraphs, stratified over articles, in source order."""
    short: dict[str, list[Passage]] = {}
    for passage in passages:
        short.setdefault(article_of(passage), [])
        if len(passage.text.split()) <= MAX_WORDS:
            short[article_of(passage)].append(passage)
    empty = [a for a, ps in short.items() if not ps]
    if empty:
        raise ValueError(f"articles without a paragraph of <= {MAX_WORDS} words: {empty}")
    quota = quotas({a: len(ps) for a, ps in short.items()}, N_PASSAGES)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for article, candidates in short.items():  # articles in source order
        chosen.update(p.id for p in rng.sample(candidates, quota[article]))
    return [p for p in passages if p.id in chosen]


def split_examples(examples: Sequence[Example], seed: int) -> dict[str, list[Example]]:
    """Shuffle with `seed`, cut by SPLITS; each split keeps source order."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    rank = {e.id: i for i, e in enumerate(examples)}
    out: dict[str, list[Example]] = {}
    start = 0
    for i, (name, fraction) in enumerate(SPLITS):
        end = len(shuffled) if i == len(SPLITS) - 1 else start + round(fraction * len(shuffled))
        out[name] = sorted(shuffled[start:end], key=lambda e: rank[e.id])
        start = end
    return out


def write_outputs(out: Path, passages: list[Passage], splits: dict[str, list[Example]],
                  seed: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "passages.jsonl", passages)
    for name, examples in splits.items():
        write_jsonl(out / f"{name}.jsonl", examples)
    counts = {"passages": len(passages), **{k: len(v) for k, v in splits.items()}}
    notice = NOTICE.format(
        sha256=SOURCE_SHA256, n_passages=len(passages), max_words=MAX_WORDS, seed=seed,
        n_articles=len({article_of(p) for p in passages}),
        counts=", ".join(f"{k} {v}" for k, v in counts.items() if k != "passages"),
    )
    atomic_write_bytes(out / "NOTICE", notice.encode("utf-8"))
    write_manifest(out, counts, seed, len({article_of(p) for p in passages}))
    return counts


def write_manifest(out: Path, counts: dict[str, int], seed: int, n_articles: int) -> None:
    names = ["passages.jsonl", *(f"{name}.jsonl" for name, _ in SPLITS), "NOTICE"]
    manifest = {
        "source": {"file": "squad-v1.1-dev.json", "sha256": SOURCE_SHA256},
        "seed": seed,
        "max_words": MAX_WORDS,
        "counts": {**counts, "articles": n_articles},
        "files": {n: {"sha256": sha256_file(out / n), "bytes": (out / n).stat().st_size}
                  for n in names},
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_bytes(out / "manifest.json", text.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="SQuAD v1.1 dev JSON")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for selection and split")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"error: source file not found: {args.source}", file=sys.stderr)
        return 2
    digest = sha256_file(args.source)
    if digest != SOURCE_SHA256:
        print(f"error: {args.source}: SHA-256 {digest} is not the expected {SOURCE_SHA256}",
              file=sys.stderr)
        return 2
    corpus, examples = read_squad(args.source)
    passages = select_passages(list(corpus), args.seed)
    chosen = {p.id for p in passages}
    asked = [e for e in examples if e.gold_ids[0] in chosen]
    counts = write_outputs(args.out, passages, split_examples(asked, args.seed), args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
