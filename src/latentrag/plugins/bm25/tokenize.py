"""A small word tokenizer shared by the lexical retrievers.

Lowercase, split on a regex (``\\w+`` by default), optionally drop English stopwords and
strip suffixes with a tiny built-in stemmer (no extra dependency, so an index built on one
machine means the same thing on another). `signature()` identifies the settings: an index
built with other settings is stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

#: bump when the stemmer's rules change: indexes built with the old rules become stale
STEMMER_VERSION = 1

# The common English function words (the NLTK English list, without contractions).
_STOPWORD_TEXT = """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())

# (suffix, replacement, minimum stem length left) tried in order; the first match wins.
_SUFFIX_RULES: tuple[tuple[str, str, int], ...] = (
    ("ational", "ate", 2),
    ("ization", "ize", 2),
    ("fulness", "ful", 2),
    ("iveness", "ive", 2),
    ("ousness", "ous", 2),
    ("biliti", "ble", 2),
    ("tional", "tion", 2),
    ("ements", "", 3),
    ("ations", "ate", 2),
    ("ation", "ate", 2),
    ("ement", "", 3),
    ("ments", "", 3),
    ("ment", "", 3),
    ("iness", "y", 2),
    ("ness", "", 3),
    ("ingly", "", 3),
    ("edly", "", 3),
    ("ing", "", 3),
    ("ies", "y", 2),
    ("ied", "y", 2),
    ("sses", "ss", 2),
    ("ed", "", 3),
    ("ly", "", 3),
    ("es", "", 3),
    ("ss", "ss", 0),  # "glass" keeps its s
    ("s", "", 3),
)


def stem(word: str) -> str:
    """Strip one common English suffix (a Porter-like step 1, not full Porter)."""
    if not word.isalpha():
        return word
    for suffix, replacement, min_stem in _SUFFIX_RULES:
        if word.endswith(suffix) and len(word) - len(suffix) >= min_stem:
            base = word[: len(word) - len(suffix)] + replacement
            # "running" -> "runn" -> "run": undouble a final consonant left by -ing/-ed
            if not replacement and len(base) > 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]
            return base
    return word


@dataclass(frozen=True)
class Tokenizer:
    """Text -> list of tokens. Instances are cheap; stems are cached per instance."""

    lowercase: bool = True
    pattern: str = r"\w+"
    stem: bool = False
    stopwords: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern))
        object.__setattr__(self, "_stems", {})

    def __call__(self, text: str) -> list[str]:
        tokens = self._regex.findall(text.lower() if self.lowercase else text)
        if self.stopwords:
            tokens = [t for t in tokens if t not in STOPWORDS]
        if self.stem:
            tokens = [self._stem(t) for t in tokens]
        return tokens

    def batch(self, texts: Iterable[str]) -> list[list[str]]:
        return [self(text) for text in texts]

    def _stem(self, token: str) -> str:
        cached = self._stems.get(token)
        if cached is None:
            cached = self._stems[token] = stem(token)
        return cached

    def signature(self) -> dict[str, object]:
        """The settings that decide the tokens (stored in index manifests)."""
        settings: dict[str, object] = asdict(self)
        if self.stem:
            settings["stemmer_version"] = STEMMER_VERSION
        return settings
