"""docs/estimators.md: its measured tables are those the committed benchmark outputs give."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_estimator_docs", ROOT / "scripts" / "make_estimator_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_tables_match_the_benchmark_outputs():
    assert load_script().main(["--check"]) == 0


def test_a_changed_output_is_caught(tmp_path, monkeypatch):
    script = load_script()
    results = tmp_path / "results"
    (results / "gradcheck").mkdir(parents=True)
    for path in (ROOT / "benchmarks" / "results" / "gradcheck").glob("*.json"):
        data = json.loads(path.read_text())
        if path.stem == "main":
            data["estimators"][0]["forwards_per_example"] += 1.0
        (results / "gradcheck" / path.name).write_text(json.dumps(data))
    monkeypatch.setattr(script, "RESULTS", results)
    assert script.main(["--check"]) == 1


def test_the_main_table_shows_the_prior_block_share_and_every_compared_estimator():
    text = (ROOT / "docs" / "estimators.md").read_text("utf-8")
    main = json.loads((ROOT / "benchmarks/results/gradcheck/main.json").read_text())
    assert main["blocks"]["retriever"]["share"] >= 0.10
    for estimator in main["estimators"]:
        assert f"| `{estimator['name']}` |" in text
