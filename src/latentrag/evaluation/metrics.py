"""Answer and retrieval metrics: EM, F1, sub-EM, sentence BLEU; hit@k, recall@k, all@k,
nDCG@k, MRR@k.

Pure Python (no torch). EM and F1 are those of the official SQuAD v1.1 evaluation script:
answers are lowercased, punctuation and the articles a/an/the removed, whitespace
collapsed, and the score is the maximum over the reference answers; F1 is 0 when the
prediction and a reference share no token, even when both normalise to nothing (where EM
is 1: the script's behaviour, kept so that numbers compare with published ones). Sub-EM is
1 when a normalised reference is a substring of the normalised prediction (a long
generated answer that contains the reference).

Retrieval metrics take the ranked passage ids of one question, best first, and its gold
ids (or id -> grade): hit@k is 1 when any gold passage is in the top k (what latentrag
called recall@k before); recall@k is the share of the gold passages in the top k
(all-gold recall, trec_eval's and BEIR's recall; equal to hit@k with one gold passage);
all@k is 1 when every gold passage is in the top k (HotpotQA's "both passages" number);
nDCG@k uses linear gains (the grade) and log2(rank + 1) discounts, as trec_eval's
ndcg_cut and BEIR; MRR@k is 1/rank of the first gold passage in the top k.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

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
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision = common / len(predicted)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalised strings, maximised over the references."""
    return max(_token_f1(prediction, a) for a in _as_list(answers))


def sub_exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if a normalised reference (not empty) is a substring of the normalised prediction
    (plain substring, as FlashRAG's sub_em and Self-RAG's match: "1" is found in "10")."""
    predicted = normalize_answer(prediction)
    for answer in _as_list(answers):
        reference = normalize_answer(answer)
        if reference and reference in predicted:
            return 1.0
    return 0.0


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


def hit_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1.0 if any gold id is among the first k ranked ids, else 0.0."""
    gold = set(gold_ids)
    return float(any(pid in gold for pid in ranked_ids[:k]))


def recall_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """The share of the gold ids among the first k ranked ids (0.0 without gold ids)."""
    gold = set(gold_ids)
    if not gold:
        return 0.0
    return len(gold.intersection(ranked_ids[:k])) / len(gold)


def all_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1.0 if every gold id is among the first k ranked ids (0.0 without gold ids)."""
    gold = set(gold_ids)
    return float(bool(gold) and gold.issubset(ranked_ids[:k]))


def mrr_at_k(ranked_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float:
    """1/rank of the first gold id within the first k (rank from 1), else 0.0."""
    gold = set(gold_ids)
    for rank, pid in enumerate(ranked_ids[:k], start=1):
        if pid in gold:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked_ids: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    """DCG of the first k ranked ids over the DCG of the ideal order of the judged ones:
    gain = grade, discount = log2(rank + 1); ids with grade <= 0 gain nothing."""
    dcg = sum(
        relevance.get(pid, 0) / math.log2(rank + 1)
        for rank, pid in enumerate(ranked_ids[:k], start=1)
        if relevance.get(pid, 0) > 0
    )
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    best = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / best if best > 0 else 0.0
