"""The pipeline (suite/pipeline.py): what a pruning records (parameter counts, the scoring phase, the
selection of a grid cell), each against an independent count or a direct pruning."""
from __future__ import annotations

import json

import pytest
import torch

from suite.pruning.saving import load_pruned
from tests.grids import write_grid


ADDS_PARAMETERS = [("flap", []), ("minillm", ["--opt", "compensate=true", "--opt", "directions=2"])]


@pytest.mark.parametrize("method,extra", ADDS_PARAMETERS)
def test_counts_agree_when_a_method_adds_biases(tmp_path, capsys, method, extra):
    """Record, CLI summary line and a reload count the same parameters when compensation adds
    biases to LLaMA's bias-free out-projections (counted here by summing the reloaded tensors)."""
    import json
    import re

    from suite.cli import main

    out = tmp_path / method
    argv = ["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.3", "--nsamples", "2",
            "--seqlen", "32", "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if " removed " in l)
    removed, dense = (int(v.replace(",", "")) for v in re.search(r"removed ([\d,]+) of ([\d,]+)", line).groups())
    record = json.loads((out / "pruning.json").read_text())
    reloaded = load_pruned(out)
    added = [n for n, m in reloaded.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert added, "the method was expected to add biases"
    counted = sum(t.numel() for t in reloaded.state_dict().values() if t is not None) - (
        reloaded.lm_head.weight.numel() if reloaded.config.tie_word_embeddings else 0)
    assert record["params"]["pruned"] == counted == dense - removed
    assert record["params"]["dense"] == dense
    assert record["ratio_achieved"] == pytest.approx(removed / dense, abs=1e-6)


def test_grid_method_entry_scope_global_reaches_the_record(tmp_path):
    """`options: {scope: global}` in a grid's method entry: the cell's record says selection.scope
    global and holds the plan of a direct global-scope pruning (which differs from the per-layer one)."""
    from suite.config import expand_cells, load_config
    from suite.models import byte_tokenizer, load_model
    from suite.pipeline import plan_summary, prune, run_cell

    config = write_grid(tmp_path, methods=[{"name": "magnitude", "options": {"scope": "global"}}], ratios=[0.3],
                        dense=False)
    (cell,) = expand_cells(load_config(config))
    record = run_cell(cell)
    assert record["selection"]["scope"] == "global"
    plans = {scope: plan_summary(prune(load_model("tiny-llama"), byte_tokenizer(), "magnitude", 0.3,
                                       scope=scope).selection.plan) for scope in ("global", "layer")}
    assert json.loads(json.dumps(plans["global"])) == record["plan_summary"] != json.loads(json.dumps(plans["layer"]))


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "llm-pruner"])
def test_cli_prune_records_scoring_phase(method, tmp_path):
    from suite.cli import main

    out = tmp_path / method
    rc = main(["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.2", "--out", str(out),
               "--nsamples", "4", "--seqlen", "32", "--quiet"])
    assert rc == 0
    record = json.loads((out / "pruning.json").read_text())
    score = record["phases"]["score"]
    assert score["seconds"] >= 0 and score["peak_mb"] > 0
    if method != "magnitude":
        assert record["calibration"] == {"corpus": "c4", "nsamples": 4, "seqlen": 32}
    load_pruned(out)  # reloads (FLAP: with its created biases)
