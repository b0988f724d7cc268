"""`latentrag evaluate` on the shipped SQuAD slice (dev split, 223 questions): BM25 and the
packaged MiniLM bi-encoder must keep the retrieval quality they were measured at.

Measured on 2026-11-25 (300 passages; dpr = all-MiniLM-L6-v2, flat index): MEASURED;
the bounds sit MARGIN = 0.05 below.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from latentrag.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARGIN = 0.05
MEASURED = {
    "bm25": {"recall@1": 0.843, "recall@5": 0.9686, "recall@20": 0.9955},
    "dpr": {"recall@1": 0.861, "recall@5": 0.9731, "recall@20": 0.9955},
}


def evaluate(tmp_path, retriever: str) -> dict[str, float]:
    """Run `latentrag evaluate` on the dev split; parse the one-row table it prints."""
    config = tmp_path / f"{retriever}.toml"
    config.write_text(
        f'[data]\nsource = "squad-slice"\n\n[retriever]\nname = "{retriever}"\n\n'
        "[eval]\nrecall_at = [1, 5, 20]\n"
    )
    result = CliRunner().invoke(main, ["evaluate", str(config), "--split", "dev"])
    assert result.exit_code == 0, result.output
    # a progress bar on stderr may end on the table's first line: start at its header
    header_line, _, row_line = result.output[result.output.index("| retrieval") :].splitlines()[:3]
    header, row = (
        [cell.strip() for cell in line.strip(" |").split("|")] for line in (header_line, row_line)
    )
    values = dict(zip(header, row))
    assert values["retrieval"] == retriever and values["split"] == "dev"
    assert values["questions"] == "223"
    return {key: float(values[key]) for key in MEASURED[retriever]}


@pytest.mark.integration
@pytest.mark.parametrize("retriever", sorted(MEASURED))
def test_slice_recall_stays_at_its_measured_level(tmp_path, retriever):
    recalls = evaluate(tmp_path, retriever)
    for key, measured in MEASURED[retriever].items():
        assert recalls[key] >= measured - MARGIN, f"{retriever} {key}: {recalls[key]}"
    assert recalls["recall@1"] <= recalls["recall@5"] <= recalls["recall@20"]
