"""A small hand-made corpus and questions, for tests and conformance checks."""

from __future__ import annotations

from latentrag.core.types import Corpus, Example, Passage

_FACTS = [
    ("paris", "France", "The capital of France is Paris, on the river Seine."),
    ("rome", "Italy", "The capital of Italy is Rome, built on seven hills."),
    ("berlin", "Germany", "The capital of Germany is Berlin, home of the Brandenburg Gate."),
    ("madrid", "Spain", "The capital of Spain is Madrid, in the centre of the country."),
    ("oxygen", "Oxygen", "Oxygen has the atomic number eight and is needed for breathing."),
    ("carbon", "Carbon", "Carbon has the atomic number six and forms diamonds and graphite."),
    ("nile", "Nile", "The Nile is the longest river in Africa and flows into the sea."),
    ("everest", "Everest", "Mount Everest is the highest mountain above sea level."),
    ("tesla", "Tesla", "Nikola Tesla worked on alternating current and radio."),
    ("curie", "Curie", "Marie Curie studied radioactivity and won two Nobel prizes."),
    ("violin", "Violin", "The violin is a string instrument played with a bow."),
    ("piano", "Piano", "The piano is a keyboard instrument with hammers and strings."),
]

_QUESTIONS = [
    ("q-paris", "What is the capital of France?", "Paris", "paris"),
    ("q-rome", "Which city is the capital of Italy?", "Rome", "rome"),
    ("q-berlin", "What is the capital of Germany?", "Berlin", "berlin"),
    ("q-madrid", "Name the capital of Spain.", "Madrid", "madrid"),
    ("q-oxygen", "Which element has atomic number eight?", "Oxygen", "oxygen"),
    ("q-carbon", "Which element forms diamonds?", "Carbon", "carbon"),
    ("q-nile", "What is the longest river in Africa?", "the Nile", "nile"),
    ("q-everest", "What is the highest mountain?", "Mount Everest", "everest"),
    ("q-tesla", "Who worked on alternating current?", "Nikola Tesla", "tesla"),
    ("q-curie", "Who studied radioactivity?", "Marie Curie", "curie"),
    ("q-violin", "Which instrument is played with a bow?", "the violin", "violin"),
    ("q-piano", "Which keyboard instrument has hammers?", "the piano", "piano"),
]


def toy_corpus() -> Corpus:
    return Corpus(Passage(id=pid, title=title, text=text) for pid, title, text in _FACTS)


def toy_examples() -> list[Example]:
    return [
        Example(id=qid, question=q, answers=(a,), gold_ids=(gold,))
        for qid, q, a, gold in _QUESTIONS
    ]
