"""Quality regression: rerun the committed reference cells and compare within the stated tolerances
(suite/regression.py). The references are records of a real run:

    python -m suite run configs/reference-tiny.yaml    --out results/reference/reference-tiny.jsonl
    python -m suite run configs/reference-smollm2.yaml --out results/reference/reference-smollm2.jsonl

A change that moves a pruning decision or an evaluation number fails here; if the change is
intended, regenerate the references with the commands above and say so in the commit.
"""
import copy
from pathlib import Path

import pytest

from suite.pipeline import run_cell
from suite.records import read_records
from suite.regression import compare

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
RECORDS = [r for f in sorted(REFERENCE.glob("*.jsonl")) for r in read_records(f) if r["status"] == "ok"]


def test_references_exist_and_cover_every_method():
    from suite.methods import METHODS

    assert len(RECORDS) >= 20
    assert set(METHODS) <= {r["method"] for r in RECORDS}
    assert {"tiny-llama-gqa", "tiny-opt", "tiny-bloom", "smollm2-135m"} <= {r["model"] for r in RECORDS}


@pytest.mark.parametrize("reference", RECORDS, ids=lambda r: f"{r['model']}-{r['label']}-{r['ratio_target']}")
def test_cell_matches_reference(reference):
    fresh = run_cell(reference["cell"])
    assert compare(reference, fresh) == []


def test_perturbed_reference_is_caught():
    """The comparison can fail: a reference moved beyond tolerance is reported, within it is not."""
    pruned = next(r for r in RECORDS if r["method"] != "dense" and r.get("zero_shot"))
    assert compare(pruned, pruned) == []
    for path, factor, caught in ((("perplexity", "wikitext2"), 1.02, True), (("perplexity", "wikitext2"), 1.005, False)):
        moved = copy.deepcopy(pruned)
        moved[path[0]][path[1]] *= factor
        assert bool(compare(moved, pruned)) is caught
    moved = copy.deepcopy(pruned)
    moved["params"]["pruned"] += 1
    assert any("params.pruned" in p for p in compare(moved, pruned))
    moved = copy.deepcopy(pruned)
    moved["zero_shot"]["piqa"]["acc"] += 0.05
    assert any("piqa acc" in p for p in compare(moved, pruned))
    moved = copy.deepcopy(pruned)
    del moved["perplexity"]["wikitext2"]
    assert any("perplexity wikitext2 None" in p for p in compare(pruned, moved))
