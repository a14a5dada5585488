"""The open findings of the sixth fresh-user trial (results/notes/newcomer.md §6), one test each:
each failed before its fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--nsamples", "4", "--seqlen", "32"]


def suite_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- 4. --hidden-on, data-free
@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_hidden_on_is_refused_for_a_data_free_method(tmp_path, capsys, monkeypatch, method):
    from suite import models
    from suite.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for where in ("cpu", "device"):
        args = ["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.2", "--out",
                str(tmp_path / "o"), "--hidden-on", where]
        assert main(args) == 2
        assert f"--hidden-on: {method} calibrates on nothing" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 8. offload settings recorded
def test_pruning_json_records_the_offload_settings(tmp_path):
    from suite.cli import main

    common = ["--model", "tiny-llama", "--method", "wanda-sp", "--ratio", "0.2", *CALIB, "--quiet"]
    folder = tmp_path / "off"
    assert main(["prune", *common, "--out", str(tmp_path / "a"), "--offload", "disk", "--device-memory", "2MB",
                 "--offload-folder", str(folder), "--hidden-on", "cpu"]) == 0
    assert main(["prune", *common, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in "ab")
    assert {k: a[k] for k in ("offload", "device_memory", "offload_folder", "hidden_on")} == {
        "offload": "disk", "device_memory": "2MB", "offload_folder": str(folder), "hidden_on": "cpu"}
    assert {k: b[k] for k in ("offload", "device_memory", "offload_folder", "hidden_on")} == {
        "offload": None, "device_memory": None, "offload_folder": None, "hidden_on": "device"}
    assert a["plan_summary"] == b["plan_summary"]  # the settings change no result


# --------------------------------------------------------------------------- 3. SIGTERM and the temp folder
def test_sigterm_removes_the_temporary_offload_folder(tmp_path):
    """A process holding a tiny model loaded with offload="disk" (what `--offload disk` does) and the
    default, temporary offload folder is sent SIGTERM: the folder is gone, the process ended by SIGTERM."""
    import signal

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("from suite.models import load_model; "
            "m = load_model('tiny-llama', offload='disk', device_memory=2_000_000); "
            "print('loaded', flush=True); import time; time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=suite_env(TMPDIR=str(tmp)), cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "loaded", proc.stderr.read()
        folders = list(tmp.glob("minillm-offload-*"))
        assert len(folders) == 1 and any(folders[0].iterdir())  # weights were offloaded there
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not folders[0].exists()


def write_grid(tmp_path, models=("tiny-llama",), methods=("wanda-sp",), **extra) -> str:
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t6", "models": list(models), "methods": list(methods), "ratios": [0.2],
        "calibration": {"apply_to": "all", "nsamples": 4, "seqlen": 32}, "device": "cpu",
        "evaluation": {"perplexity": ["wikitext2"], "max_tokens": 256, "tasks": [], "throughput": False}, **extra}))
    return str(path)


# --------------------------------------------------------------------------- 1. --compare, older code
def test_compare_warns_when_the_records_come_from_another_commit(tmp_path, capsys):
    from suite import memory_model as mm
    from suite.cli import main
    from suite.config import expand_cells, load_config
    from suite.records import cell_key

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if len(head) != 40:
        pytest.skip("not a git checkout: the code has no commit to compare with")
    config = write_grid(tmp_path)
    cells = expand_cells(load_config(config))  # dense and wanda-sp

    def results(*commits):
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps({
            "cell_key": cell_key(cell), "provenance": {"git_commit": commit},
            "phases": {"load": {"peak_mb": mm.predict(cell)["load"] / 2 ** 20}}}) + "\n"
            for cell, commit in zip(cells, commits)))
        return str(path)

    old = "0123456789ab" * 3 + "0123"
    assert main(["run", config, "--dry-run", "--compare", results(old, head)]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "warning" in line.lower()] == [
        f"warning: {tmp_path / 'r.jsonl'}: 1 of 2 compared records come from commit {old[:12]} (1), not the "
        f"current code's {head[:12]}: measured peaks of older code may differ from what these formulas model"]
    assert "largest |error|: 0.0 %" in out
    assert main(["run", config, "--dry-run", "--compare", results(head, head)]) == 0
    assert "warning:" not in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. a missing local model path
@pytest.mark.parametrize("missing", ["./no/such/dir", "out/no-such-model", "~/no-such-model-t6"])
def test_a_missing_local_model_path_is_refused_before_any_cell(tmp_path, capsys, monkeypatch, missing):
    from suite import runner
    from suite.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # "out/..." is then a local path, not a hub id
    monkeypatch.setattr(runner, "run_cells_locally", lambda *a, **k: pytest.fail("a cell ran"))
    config = write_grid(tmp_path, models=["tiny-llama", missing], methods=["magnitude"])
    for extra in (["--dry-run"], ["--out", str(tmp_path / "r.jsonl")]):
        assert main(["run", config, *extra]) == 2
        assert one_line_error(capsys) == f"error: {config}: models: {missing}: no such file or directory\n"
    assert not (tmp_path / "r.jsonl").exists()


def test_an_unreachable_hub_id_keeps_its_shapes_unknown_row(tmp_path, capsys, monkeypatch):
    from suite.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", write_grid(tmp_path, models=["nobody/no-such-model"], methods=["magnitude"]),
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.count("shapes unknown") == 2  # dense and magnitude


# --------------------------------------------------------------------------- 2. bench-speed, another base
def test_bench_speed_refuses_a_model_pruned_from_another_base(tmp_path, capsys, monkeypatch):
    import torch

    from suite import speed
    from suite.cli import main
    from suite.models import _tiny_model, byte_tokenizer

    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--ratio", "0.3", "--out", str(pruned),
                 "--quiet"]) == 0
    twin = tmp_path / "twin"  # tiny-llama's shapes and weights, but one embedding row changed
    model = _tiny_model("tiny-llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] += 1.0
    model.save_pretrained(twin)
    byte_tokenizer().save_pretrained(twin)
    capsys.readouterr()

    class Timed(Exception):
        pass

    def timed(*a, **k):
        raise Timed

    monkeypatch.setattr(speed, "compare", timed)
    args = ["--pruned", str(pruned), "--runs", "1", "--rounds", "1", "--seqlen", "8", "--batch-size", "1"]
    for dense, why in (("tiny-opt", "its dense model_type is llama, the dense model's opt"),
                       (str(twin), "its input embeddings differ from the dense model's")):
        assert main(["bench-speed", "--model", dense, *args]) == 2
        err = one_line_error(capsys)
        assert f"--pruned {pruned} was not pruned from --model {dense}: {why}" in err
        assert "(pruning.json names tiny-llama)" in err
    with pytest.raises(Timed):  # the model it was pruned from: accepted, timing starts
        main(["bench-speed", "--model", "tiny-llama", *args])


# --------------------------------------------------------------------------- 5. scope: global in a grid
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
