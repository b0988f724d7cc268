"""Answer and retrieval metrics: EM, F1, sentence BLEU, recall@k, MRR@k.

Pure Python (no torch). EM and F1 follow the official SQuAD evaluation script: answers are
lowercased, punctuation and the articles a/an/the removed, whitespace collapsed, and the
score is the maximum over the reference answers. When normalisation leaves a prediction or a
reference with no tokens, F1 is 1 if both are empty and 0 otherwise (as in the SQuAD v2.0
script; v1.1 scores two empty strings 0 while calling them an exact match).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Sequence[str]) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("at least one reference answer is needed")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(a) for a in _as_list(answers)))


def _token_f1(prediction: str, reference: str) -> float:
    predicted = normalize_answer(prediction).split()
    gold = normalize_answer(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalised strings, maximised over the references."""
    return max(_token_f1(prediction, a) for a in _as_list(answers))


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(prediction: str, references: str | Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU in [0, 1] of a prediction against one or more references.

    Tokens are the lowercased whitespace-separated words. Modified n-gram precisions use
    counts clipped by the maximum count in any reference; the brevity penalty uses the
    reference length closest to the prediction's (the shorter on ties). Smoothing: add-one
    for n >= 2 (Lin & Och 2004, NLTK's ``method2``): p_n = (matches + 1) / (ngrams + 1);
    unigram precision is not smoothed, so a prediction sharing no word scores 0.
    """
    hypothesis = prediction.lower().split()
    refs = [r.lower().split() for r in _as_list(references)]
    if not hypothesis:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hypothesis, n)
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)
        matches = sum(min(c, max_ref[g]) for g, c in counts.items())
        total = sum(counts.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in refs)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision / max_n)


def recall_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1.0 if any gold id is among the first k ranked ids, else 0.0."""
    gold = set(gold_ids)
    return float(any(pid in gold for pid in ranked_ids[:k]))


def mrr_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1/rank of the first gold id within the first k (rank from 1), else 0.0."""
    gold = set(gold_ids)
    for rank, pid in enumerate(ranked_ids[:k], start=1):
        if pid in gold:
            return 1.0 / rank
    return 0.0
