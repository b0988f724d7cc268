"""EM, F1 and sub-EM against the official SQuAD v1.1 evaluation script, on a fixture.

tests/fixtures/squad_eval/ holds a SQuAD v1.1 dataset of 9 questions and a predictions file,
in the script's input formats. The expected numbers follow the script's definitions
(normalize_answer: lowercase, drop string.punctuation, drop the articles a/an/the, collapse
whitespace; exact_match_score: normalised strings equal; f1_score: 0 when no token is
common, else 2PR/(P+R) over token counts; both the maximum over the ground truths; the
totals printed as 100 * mean):

    q0 "Denver Broncos"             EM 1  F1 1
    q1 "the Broncos of Denver"      EM 0  F1 0.8    (3 vs 2 tokens, 2 common)
    q2 "Carolina Panthers"          EM 0  F1 0
    q3 "a" vs "the"                 EM 1  F1 0      (both normalise to "": no common token)
    q4 "Saint Bernadette Soubirous" EM 1  F1 1
    q5 "1,000 years" vs "1000 years" EM 1 F1 1      (the comma is punctuation)
    q6 "in 2016 at Levi's Stadium"  EM 0  F1 4/7    (vs "Levi's Stadium": P 2/5, R 1)
    q7 "x x y" vs "x y y"           EM 0  F1 2/3    (common min(2,1) + min(1,2) = 2)
    q8 "–10" vs "10"                EM 0  F1 0      (an en dash is not string.punctuation)

so the script prints {"exact_match": 44.444..., "f1": 55.978...}. Sub-EM (not in the
script: a non-empty normalised reference inside the normalised prediction) is 1 for q0, q4,
q5, q6 and q8, 5/9 in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentrag.data.readers import read_squad
from latentrag.evaluation.metrics import exact_match, f1, sub_exact_match

FIXTURE = Path(__file__).parent / "fixtures" / "squad_eval"
EM = [1, 0, 0, 1, 1, 1, 0, 0, 0]
F1 = [1, 0.8, 0, 0, 1, 1, 4 / 7, 2 / 3, 0]
SUB_EM = [1, 0, 0, 0, 1, 1, 1, 0, 1]
SCRIPT_OUTPUT = {"exact_match": 100 * 4 / 9, "f1": 100 * (3 + 0.8 + 4 / 7 + 2 / 3) / 9}


@pytest.fixture(scope="module")
def scored():
    _, examples = read_squad(FIXTURE / "dataset.json")
    predictions = json.loads((FIXTURE / "predictions.json").read_text("utf-8"))
    return [(predictions[e.id], e.answers) for e in examples]


def test_each_answer_scores_as_the_script_defines(scored):
    assert [exact_match(p, a) for p, a in scored] == EM
    assert [f1(p, a) for p, a in scored] == pytest.approx(F1)
    assert [sub_exact_match(p, a) for p, a in scored] == SUB_EM


def test_totals_equal_the_scripts_output(scored):
    totals = {
        "exact_match": 100 * sum(exact_match(p, a) for p, a in scored) / len(scored),
        "f1": 100 * sum(f1(p, a) for p, a in scored) / len(scored),
    }
    assert totals == pytest.approx(SCRIPT_OUTPUT)
    assert round(totals["exact_match"], 3) == 44.444 and round(totals["f1"], 3) == 55.979
