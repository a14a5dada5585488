"""Quality regression (suite/regression.py, `suite check`): rerun the committed reference cells and
compare them with the gate the README's "Guard your method's quality in CI" gives users. The
references are records of a real run:

    python -m suite check --record configs/reference-tiny.yaml
    python -m suite check --record configs/reference-smollm2.yaml

A change that moves a pruning decision or an evaluation number fails here; if the change is
intended, re-record the references with the commands above and say so in the commit.
"""
import copy
import json
from pathlib import Path

import pytest

from suite.cli import main
from suite.pipeline import run_cell
from suite.records import read_records
from suite.regression import changed_groups, check, compact, compare, expand, kept_indices
from tests.method_template import install, readme_block

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
RECORDS = [r for f in sorted(REFERENCE.glob("*.jsonl")) for r in read_records(f) if r["status"] == "ok"]
BUILT_IN = {"random", "magnitude", "wanda-sp", "flap", "llm-pruner", "minillm"}  # a new method needs none


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_references_exist_and_cover_the_built_in_methods():
    assert len(RECORDS) >= 20
    assert BUILT_IN <= {r["method"] for r in RECORDS}
    assert {"tiny-llama-gqa", "tiny-opt", "tiny-bloom", "smollm2-135m"} <= {r["model"] for r in RECORDS}
    assert all(r.get("kept") for r in RECORDS if r["method"] != "dense")  # the gate sees the plans


@pytest.mark.parametrize("reference", RECORDS, ids=lambda r: f"{r['model']}-{r['label']}-{r['ratio_target']}")
def test_cell_passes_the_gate(reference, tmp_path, capsys):
    """The user-facing command on one fresh cell: its plan exactly, its metrics within tolerance."""
    fresh = {**run_cell(reference["cell"]), "status": "ok"}
    code = main(["check", write(tmp_path / "fresh.jsonl", [fresh]), "--reference",
                 write(tmp_path / "reference.jsonl", [reference])])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 cells compared, 0 problems" in out


def test_compact_kept_indices_round_trip():
    import random

    scattered = sorted(random.Random(0).sample(range(1536), 1229))  # a SmolLM2 layer's kept MLP channels
    for indices in ([], [3], [0, 1, 2, 5, 7, 8], list(range(100)), [9, 2, 4, 3], scattered):
        assert expand(compact(indices)) == set(indices)
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert compact(scattered).startswith("x") and len(compact(scattered)) <= 1 + 1536 // 4
    assert changed_groups([{"heads": "0-3", "channels": "0-9"}], [{"heads": "0-2,5", "channels": "0-9"}]) == 2


def test_perturbed_reference_is_caught_and_an_improvement_is_not_a_failure():
    pruned = next(r for r in RECORDS if r["method"] != "dense" and r.get("zero_shot"))
    assert compare(pruned, pruned).problems == [] and compare(pruned, pruned).improvements == []
    worse = copy.deepcopy(pruned)
    worse["perplexity"]["wikitext2"] *= 1.02
    assert "perplexity wikitext2" in compare(pruned, worse).problems[0]
    within = copy.deepcopy(pruned)
    within["perplexity"]["wikitext2"] *= 1.005
    assert compare(pruned, within).problems == compare(pruned, within).improvements == []
    better = copy.deepcopy(pruned)
    better["perplexity"]["wikitext2"] *= 0.97
    better["zero_shot"]["piqa"]["acc"] += 0.05
    cell = compare(pruned, better)
    assert cell.problems == [] and len(cell.improvements) == 2
    report = check([better], [pruned])
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1
    assert any(line.startswith("improved: ") and "update the reference" in line for line in report.lines())
    moved = copy.deepcopy(pruned)
    moved["params"]["pruned"] += 1
    assert any("params.pruned" in p for p in compare(pruned, moved).problems)
    moved = copy.deepcopy(pruned)
    moved["zero_shot"]["piqa"]["acc"] -= 0.05
    assert any("piqa acc" in p for p in compare(pruned, moved).problems)
    moved = copy.deepcopy(pruned)
    del moved["perplexity"]["wikitext2"]
    assert any("perplexity wikitext2 None" in p for p in compare(pruned, moved).problems)


def test_missing_and_unreferenced_cells_are_reported_not_raised(tmp_path, capsys):
    one, other = RECORDS[0], next(r for r in RECORDS if r["model"] != RECORDS[0]["model"])
    report = check([one], [other])
    assert report.exit_code() == 1 and "missing from the fresh records" in report.problems[0]
    assert len(report.unreferenced) == 1 and report.unreferenced[0].startswith(one["model"])
    report = check([one, other], [other])
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1
    assert main(["check", str(tmp_path / "none.jsonl"), "--reference", str(tmp_path / "none.jsonl")]) == 2
    assert "results file not found" in capsys.readouterr().err


def test_gate_sees_a_criterion_changed_from_l1_to_l2(tmp_path, monkeypatch):
    """The researcher's break (issue 27): the README's template method, then the same method with its
    L1 column norm replaced by L2. Every cell whose kept groups change fails with the cell's name and
    the number of changed groups, counted here from the two plans' raw index lists."""
    from suite.pipeline import outcome_record, prune
    from suite.models import load_model, load_tokenizer

    models = ("tiny-llama-gqa", "tiny-opt", "tiny-bloom")
    calibration = {"corpus": "c4", "nsamples": 4, "seqlen": 32}
    source = readme_block("method template")
    assert "ord=1" in source
    plans, records = {}, {"l1": [], "l2": []}
    for variant, text in (("l1", source), ("l2", source.replace("ord=1", "ord=2"))):
        install(tmp_path / variant, monkeypatch, text)
        for model_name in models:
            outcome = prune(load_model(model_name), load_tokenizer(model_name), "l1act", 0.3, calib=calibration)
            plans[variant, model_name] = outcome.selection.plan
            records[variant].append({"model": model_name, "method": "l1act", "label": "l1act", "seed": 0,
                                     "status": "ok", **outcome_record(outcome, 0.3)})
    report = check(records["l2"], records["l1"])
    changed = 0
    for model_name in models:
        a, b = plans["l1", model_name], plans["l2", model_name]
        n = sum(len(set(x.heads) ^ set(y.heads)) + len(set(x.channels) ^ set(y.channels))
                + len(set(x.kv_heads or []) ^ set(y.kv_heads or [])) for x, y in zip(a.layers, b.layers))
        lines = [p for p in report.problems if p.startswith(f"{model_name} / l1act @ 0.3 seed 0: plan changed")]
        assert lines == ([f"{model_name} / l1act @ 0.3 seed 0: plan changed: {n} groups kept/removed "
                          "differently"] if n else [])
        changed += bool(n)
        assert kept_indices(a) == next(r["kept"] for r in records["l1"] if r["model"] == model_name)
    assert changed >= 1 and report.exit_code() == 1
    print("\n".join(report.lines()))


def test_a_changed_choice_of_whole_layers_is_a_changed_plan():
    """Depth pruning: `kept` marks a layer removed whole; another removed layer is a plan change that
    counts the groups the other plan keeps there plus the layer itself, and the same one is none."""
    from suite.models import load_model
    from suite.pruning.plan import full_plan

    plan_a, plan_b = full_plan(load_model("tiny-llama")), full_plan(load_model("tiny-llama"))
    plan_a.removed_layers, plan_b.removed_layers = [1], [2]
    a, b = kept_indices(plan_a), kept_indices(plan_b)
    assert a[1] == {"removed": True} and "heads" in a[2] and b[2] == {"removed": True}
    groups = {i: len(plan_a.layers[i].heads) + len(plan_a.layers[i].channels) for i in (1, 2)}
    assert changed_groups(a, b) == groups[1] + groups[2] + 2
    assert changed_groups(a, kept_indices(plan_a)) == 0
