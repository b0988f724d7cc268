"""A synthetic "key -> code" task where retrieval must be learned from the answers alone.

Each passage pairs a key (an adjective and a noun, both made-up words) with a code of two
syllables: ``"<fillers> <adjective> <noun> <fillers> code <syllable> <syllable>"``. A
question names a key, each key word replaced by its synonym (another made-up word) with
probability `synonym_rate`, with filler words mixed in as distractors; its answer is the
code, and its gold passage the one holding the key. Questions about a held-out quarter of
the passages are kept apart, so that what a retriever learns must carry over by text: every
key word, synonym and filler also occurs in training questions about other passages.

Lexical overlap finds the gold passage only when the key words are not paraphrased and the
fillers do not mislead, so a bag-of-words retriever starts weak; a posterior that also reads
the answer sees the code, which no other passage holds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from latentrag.core.types import Corpus, Example, Passage

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_TEMPLATES = (
    "which code opens the {key} vault",
    "tell me the code of the {key}",
    "what is the {key} code",
    "the {key} needs which code",
)


@dataclass(frozen=True)
class VaultTask:
    """The corpus, the training and held-out questions, and the code syllables (the
    answer vocabulary). Every example has exactly one gold passage."""

    corpus: Corpus
    train: list[Example]
    heldout: list[Example]
    syllables: tuple[str, ...]


def _words(rng: random.Random, count: int, length: int, taken: set[str]) -> list[str]:
    """`count` distinct made-up words of `length` letters (consonant-vowel pairs)."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(
            rng.choice(_CONSONANTS) if i % 2 == 0 else rng.choice(_VOWELS) for i in range(length)
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_vault_task(
    passages: int = 200,
    heldout_fraction: float = 0.25,
    synonym_rate: float = 0.5,
    distractors: int = 2,
    fillers: int = 3,
    questions_per_passage: int = 1,
    seed: int = 0,
) -> VaultTask:
    """A `VaultTask` with `passages` passages, `questions_per_passage` differently worded
    training questions per training passage and one question per held-out passage; the
    same arguments always give the same task."""
    if passages < 4:
        raise ValueError(f"passages must be at least 4, got {passages}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    taken: set[str] = set()
    side = math.ceil(math.sqrt(1.6 * passages))  # keys: side x side (adjective, noun) pairs
    adjectives, nouns = _words(rng, side, 5, taken), _words(rng, side, 6, taken)
    synonyms = dict(zip(adjectives + nouns, _words(rng, 2 * side, 7, taken)))
    filler_words = _words(rng, 24, 4, taken)
    syllable_count = math.ceil(0.5 + math.sqrt(0.25 + 1.5 * passages))  # s (s - 1) >= 1.5 N
    syllables = tuple(_words(rng, syllable_count, 2, taken))

    keys = rng.sample([(a, n) for a in adjectives for n in nouns], passages)
    codes = rng.sample([(a, b) for a in syllables for b in syllables if a != b], passages)
    heldout_rows = set(rng.sample(range(passages), max(1, round(heldout_fraction * passages))))
    corpus_rows: list[Passage] = []
    train: list[Example] = []
    heldout: list[Example] = []
    for i, ((adjective, noun), (first, second)) in enumerate(zip(keys, codes)):
        before = rng.sample(filler_words, rng.randint(0, fillers))
        after = rng.sample(filler_words, rng.randint(0, fillers))
        text = " ".join([*before, adjective, noun, *after, "code", first, second])
        corpus_rows.append(Passage(id=f"v{i}", text=text))
        wordings = 1 if i in heldout_rows else questions_per_passage
        for j in range(wordings):
            question = _question(
                rng, adjective, noun, synonyms, synonym_rate, filler_words, distractors
            )
            example = Example(
                id=f"vq{i}-{j}",
                question=question,
                answers=(f"{first} {second}",),
                gold_ids=(f"v{i}",),
            )
            (heldout if i in heldout_rows else train).append(example)
    return VaultTask(Corpus(corpus_rows), train, heldout, syllables)


def _question(
    rng: random.Random,
    adjective: str,
    noun: str,
    synonyms: dict[str, str],
    synonym_rate: float,
    filler_words: list[str],
    distractors: int,
) -> str:
    key = " ".join(synonyms[w] if rng.random() < synonym_rate else w for w in (adjective, noun))
    words = rng.choice(_TEMPLATES).format(key=key).split()
    for filler in rng.sample(filler_words, distractors):
        words.insert(rng.randint(0, len(words)), filler)
    return " ".join(words)
