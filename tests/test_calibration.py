"""Calibration defaults: each method calibrates with its own published setting unless the
grid says EXPLICITLY (`calibration: {apply_to: all, ...}`) or a method entry gives its own; the record
says which settings ran and where each came from. Tiny models; the cells run in-process, < 20 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baselines import llm_pruner, wanda_sp
from suite.pruning.errors import UserError
from suite.config import expand_cells, grid_identity, load_config
from suite.pipeline import run_cell
from suite.records import cell_key, read_records

ROOT = Path(__file__).resolve().parents[1]
GRID = """name: calib
models: [tiny-llama]
methods: {methods}
ratios: [0.3]
dense: false
calibration: {calibration}
evaluation: {{perplexity: [wikitext2], max_tokens: 256, tasks: [], throughput: false}}
"""


def write(tmp_path, methods="[llm-pruner]", calibration="{}") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(methods=methods, calibration=calibration))
    return path


def test_cli_refuses_a_grid_value_that_would_replace_a_methods_own(tmp_path):
    config = write(tmp_path, "[wanda-sp, llm-pruner]", "{nsamples: 128, seqlen: 128}")
    out = tmp_path / "r.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "suite", "run", str(config), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    # wanda-sp's own is 128: the first method refused is llm-pruner, with its own value 10
    assert "calibration.nsamples" in lines[0] and "llm-pruner's own nsamples 10" in lines[0]
    assert "apply_to: all" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("calibration,ok", [
    ("{nsamples: 10}", True),             # equal to llm-pruner's own: replaces nothing
    ("{seqlen: 64}", False),
    ("{corpus: wikitext2}", False),
    ("{nsamples: 4, apply_to: all}", True),
    ("{nsamples: 4, apply_to: some}", False),
])
def test_only_an_explicit_grid_value_overrides(tmp_path, calibration, ok):
    path = write(tmp_path, "[llm-pruner]", calibration)
    if ok:
        load_config(path)
    else:
        with pytest.raises(UserError, match="calibration"):
            load_config(path)


def test_a_method_entry_may_give_its_own_but_not_to_a_method_without_data(tmp_path):
    load_config(write(tmp_path, "[{name: llm-pruner, calibration: {seqlen: 64}}]", "{seqlen: 64}"))
    with pytest.raises(UserError, match=r"methods\[0\].calibration: magnitude uses no calibration data"):
        load_config(write(tmp_path, "[{name: magnitude, calibration: {nsamples: 4}}]"))
    with pytest.raises(UserError, match="unknown key"):
        load_config(write(tmp_path, "[{name: llm-pruner, calibration: {n: 4}}]"))


def small_cell(cells, label):
    return next(c for c in cells if c["label"] == label)


def test_method_entry_calibration_runs_and_is_recorded(tmp_path):
    config = load_config(write(tmp_path, """
  - {name: llm-pruner, label: lp-own, calibration: {nsamples: 3, seqlen: 32}}
  - {name: wanda-sp, options: {batch_size: 4}, calibration: {nsamples: 2, seqlen: 16}}
"""))
    cells = expand_cells(config)
    lp = small_cell(cells, "lp-own")
    assert lp["calibration"] == {"corpus": "c4", "nsamples": 3, "seqlen": 32}
    assert lp["calibration_origin"] == {"corpus": "grid", "nsamples": "method entry", "seqlen": "method entry"}
    record = run_cell(lp)
    assert record["calibration"] == {"corpus": "c4", "nsamples": 3, "seqlen": 32}
    assert record["method_info"]["tokens"] == 3 * 32          # the method saw those windows
    assert record["calibration_origin"] == {"corpus": "method default", "nsamples": "method entry",
                                            "seqlen": "method entry", "method_source": llm_pruner.CALIBRATION["source"]}
    wanda = small_cell(cells, "wanda-sp")
    assert wanda["calibration"] == {"corpus": "c4", "nsamples": 2, "seqlen": 16}
    assert cell_key(wanda) != cell_key(lp)


def test_explicit_override_and_method_defaults_are_recorded(tmp_path):
    config = load_config(write(tmp_path, "[llm-pruner, {name: llm-pruner, label: lp-entry, calibration: {nsamples: 2}}]",
                               "{nsamples: 3, seqlen: 32, apply_to: all}"))
    cells = expand_cells(config)
    lp = small_cell(cells, "llm-pruner")
    record = run_cell(lp)
    assert record["calibration"] == {"corpus": "c4", "nsamples": 3, "seqlen": 32}
    assert record["method_info"]["tokens"] == 3 * 32
    assert record["calibration_origin"] == {"corpus": "method default", "nsamples": "grid (apply_to: all)",
                                            "seqlen": "grid (apply_to: all)",
                                            "method_source": llm_pruner.CALIBRATION["source"]}
    entry = small_cell(cells, "lp-entry")                       # the entry's value beats the grid's
    assert entry["calibration"] == {"corpus": "c4", "nsamples": 2, "seqlen": 32}
    assert entry["calibration_origin"]["nsamples"] == "method entry"


def test_no_calibration_given_means_each_methods_own(tmp_path):
    config = load_config(write(tmp_path, "[wanda-sp]"))
    cell = expand_cells(config)[0]
    assert cell["calibration"] == {"corpus": "c4", "nsamples": None, "seqlen": None}
    from suite.pipeline import calibration_origin, calibration_settings

    settings = calibration_settings(wanda_sp, {**cell["calibration"], "origin": cell["calibration_origin"]})
    assert settings == {k: wanda_sp.CALIBRATION[k] for k in ("corpus", "nsamples", "seqlen")}
    origin = calibration_origin(wanda_sp, {**cell["calibration"], "origin": cell["calibration_origin"]})
    assert origin == {"corpus": "method default", "nsamples": "method default", "seqlen": "method default",
                      "method_source": wanda_sp.CALIBRATION["source"]}


@pytest.mark.parametrize("name", ["reference-tiny", "reference-smollm2"])
def test_shipped_references_keep_their_grid_and_cells(name):
    """`apply_to: all` restates what those grids meant: the committed records' cell keys still match, and
    the grid's hash is that of the same config without the marker (what it was before the marker existed)."""
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config["calibration"]["apply_to"] == "all"
    records = read_records(ROOT / "results" / "reference" / f"{name}.jsonl")
    assert {r["cell_key"] for r in records} == {cell_key(c) for c in expand_cells(config)}
    from suite.config import RUNTIME_KEYS  # offload keys are not part of a grid's identity

    before = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    before["calibration"] = {k: config["calibration"][k] for k in ("corpus", "nsamples", "seqlen")}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert grid_identity(config)["config_hash"] == digest[:16]


def test_paper_grid_runs_each_method_at_its_own_calibration():
    cells = [c for c in expand_cells(load_config(ROOT / "configs" / "paper.yaml")) if c["method"] != "dense"]
    assert {(c["calibration"]["nsamples"], c["calibration"]["seqlen"]) for c in cells} == {(None, None)}
    assert json.dumps(llm_pruner.CALIBRATION["nsamples"]) == "10"


def test_cli_prune_records_command_line_origin(tmp_path):
    from suite.cli import main

    out = tmp_path / "lp"
    assert main(["prune", "--model", "tiny-llama", "--method", "llm-pruner", "--ratio", "0.2", "--out", str(out),
                 "--nsamples", "4", "--seqlen", "128", "--quiet"]) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["calibration"] == {"corpus": "c4", "nsamples": 4, "seqlen": 128}
    assert record["calibration_origin"] == {"corpus": "method default", "nsamples": "command line",
                                            "seqlen": "method default",  # 128 is llm-pruner's own
                                            "method_source": llm_pruner.CALIBRATION["source"]}
