"""`suite run`: resumable grids of subprocess cells, with a fake cell (tests/fake_cell.py) instead of
the real pipeline, selected by the testing hook MINILLM_CELL_FN."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from suite.cli import main
from suite.commands import cell as cell_command
from suite.config import expand_cells, load_config
from suite.records import append_record, cell_key, read_records
from tests.cli_output import one_error_line, one_line_error
from tests.grids import write_grid

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GRID = """name: grid
models: [{models}]
methods: [random, {{name: random, label: random-global, options: {{scope: global}}}}]
ratios: [0.2, 0.5]
calibration: {{nsamples: 8, seqlen: 32}}
evaluation: {{perplexity: [wikitext2], tasks: [piqa], limit: 10, max_tokens: 512}}
"""


@pytest.fixture
def fake_env(monkeypatch):
    monkeypatch.setenv("MINILLM_CELL_FN", "fake_cell:run_cell")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("FAKE_CELL_SLEEP", "0")


def grid(tmp_path, models="tiny-llama, tiny-opt") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(models=models))
    return path


def keys_of(config_path) -> list[str]:
    return [cell_key(c) for c in expand_cells(load_config(config_path))]


def test_run_records_every_cell_then_skips_them(tmp_path, fake_env, capsys):
    config, out = grid(tmp_path), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    records = read_records(out)
    assert [r["cell_key"] for r in records] == keys_of(config)  # dense first per model, config order
    first = records[1]
    assert (first["status"], first["label"], first["ratio_target"], first["seed"]) == ("ok", "random", 0.2, 0)
    assert first["perplexity"] == {"wikitext2": 18.5} and first["cell"]["evaluation"]["max_tokens"] == 512
    assert first["provenance"]["config_hash"] and first["provenance"]["versions"]["torch"]
    captured = capsys.readouterr()
    assert "| tiny-opt   | random-global" in captured.out  # the markdown table is printed at the end
    assert "%|" not in captured.err  # --quiet: no progress bar

    assert main(["run", str(config), "--out", str(out)]) == 0
    assert len(read_records(out)) == len(records)  # nothing rerun
    assert "10 cells, 10 done, 0 to run" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(out), "--quiet", "--force"]) == 0
    assert len(read_records(out)) == 2 * len(records)


def test_default_out_is_results_name_jsonl(tmp_path, fake_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(grid(tmp_path, models="tiny-llama")), "--quiet"]) == 0
    assert len(read_records(tmp_path / "results" / "grid.jsonl")) == 5


@pytest.mark.parametrize("jobs", [1, 2])
def test_kill_9_then_rerun_gives_every_cell_exactly_once(tmp_path, fake_env, monkeypatch, jobs):
    config, out = grid(tmp_path), tmp_path / "r.jsonl"
    env = {**os.environ, "FAKE_CELL_SLEEP": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "suite", "run", str(config), "--out", str(out), "--quiet",
                             "--jobs", str(jobs)],
                            cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the grid never wrote a record"
            time.sleep(0.05)
        time.sleep(0.3)  # most likely in the middle of the next cell
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its running cell
        proc.wait()
    before = read_records(out)  # no partial line: this would raise
    assert 1 <= len(before) < 10
    assert out.read_bytes().endswith(b"\n")

    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    after = read_records(out)
    assert after[: len(before)] == before  # finished records are kept as they were
    assert Counter(r["cell_key"] for r in after) == Counter(keys_of(config))  # each cell exactly once


def test_jobs_run_cells_side_by_side_with_shared_cores(tmp_path, fake_env, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CELL_SLEEP", "1.0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = grid(tmp_path, models="tiny-llama")
    assert main(["run", str(config), "--out", str(tmp_path / "one.jsonl"), "--quiet"]) == 0
    table_one = capsys.readouterr().out
    out = tmp_path / "two.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    records = read_records(out)
    assert Counter(r["cell_key"] for r in records) == Counter(keys_of(config))  # each cell once
    assert sorted(r["cell_index"] for r in records) == list(range(5))
    intervals = sorted(r["fake_interval"] for r in records)
    overlaps = sum(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))
    assert overlaps >= 2  # 5 cells, 2 at a time: at least two pairs ran side by side
    for r in records:
        assert r["provenance"]["concurrent_cells"] == 2
        assert r["provenance"]["hardware"]["torch_threads"] == max(1, os.cpu_count() // 2)
        assert "torch_threads" not in r and "fake_interval" in r
    assert capsys.readouterr().out == table_one  # grid order, whatever order the cells finished in


def test_table_rows_follow_the_grid_not_the_finishing_order(tmp_path, fake_env, capsys):
    config, out = grid(tmp_path, models="tiny-llama"), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    lines = out.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::-1]) + "\n")  # random-global's cells now come first
    assert main(["table", str(shuffled)]) == 0
    assert capsys.readouterr().out.strip() == table.strip()
    assert table.index("| random ") < table.index("| random-global")


def test_jobs_must_be_positive(tmp_path, fake_env, capsys):
    assert main(["run", str(grid(tmp_path)), "--out", str(tmp_path / "r.jsonl"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --jobs must be at least 1, got 0\n"
    assert not (tmp_path / "r.jsonl").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_cell_dies_with_its_runner(tmp_path, fake_env):
    config, out = grid(tmp_path, models="tiny-llama"), tmp_path / "r.jsonl"
    env = {**os.environ, "FAKE_CELL_SLEEP": "30"}
    runner = subprocess.Popen([sys.executable, "-m", "suite", "run", str(config), "--out", str(out), "--quiet"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (cells := _children(runner.pid)):
            assert runner.poll() is None and time.monotonic() < deadline, "no cell process started"
            time.sleep(0.05)
        time.sleep(1.0)  # the cell is past its start-up, sleeping in the fake pipeline
    finally:
        runner.kill()  # the runner alone, not its process group
        runner.wait()
    deadline = time.monotonic() + 10
    while _alive(cells[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(cells[0])  # not left sleeping 30 s as an orphan
    assert not out.exists()


def test_truncated_last_line_is_reported_then_repaired(tmp_path, fake_env, capsys):
    config, out = grid(tmp_path, models="tiny-llama"), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    data = out.read_bytes()
    damaged = data[:-40]  # the last record loses its end and its newline, as if a writer died
    out.write_bytes(damaged)
    capsys.readouterr()

    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out}:5: last line is truncated")
    assert "--repair" in err
    assert out.read_bytes() == damaged  # nothing appended, nothing dropped

    assert main(["run", str(config), "--out", str(out), "--quiet", "--repair"]) == 0
    assert "moved its damaged line 5" in capsys.readouterr().err
    assert (tmp_path / "r.jsonl.corrupt").read_bytes() == damaged[damaged.rindex(b"\n") + 1:] + b"\n"
    records = read_records(out)
    assert Counter(r["cell_key"] for r in records) == Counter(keys_of(config))


def test_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, fake_env, capsys):
    config, out = grid(tmp_path, models="broken, tiny-llama"), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 1
    records = read_records(out)
    assert len(records) == 10
    broken = [r for r in records if r["model"] == "broken"]
    assert {r["status"] for r in broken} == {"error"}
    assert broken[1]["error"] == "RuntimeError: fake failure for random"
    assert "Traceback" in broken[1]["stderr_tail"]
    assert broken[1]["label"] == "random" and broken[1]["ratio_target"] == 0.2 and "provenance" in broken[1]
    assert {r["status"] for r in records if r["model"] == "tiny-llama"} == {"ok"}
    captured = capsys.readouterr()
    assert "5 of 10 cells failed" in captured.err and "random (failed)" in captured.out

    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 1  # only failed cells are retried
    assert Counter(r["model"] for r in read_records(out)) == {"broken": 10, "tiny-llama": 5}


def test_cell_killed_by_a_signal(tmp_path, fake_env, monkeypatch):
    (tmp_path / "suicide.py").write_text(
        "import os, signal\n\ndef run_cell(cell):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("MINILLM_CELL_FN", "suicide:run_cell")
    config, out = grid(tmp_path, models="tiny-llama"), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 1
    assert read_records(out)[0]["error"] == "cell process killed by SIGKILL (out of memory?)"


def test_cell_command_prints_the_record_last(monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"model": "m", "method": "random", "label": "r",
                                                              "ratio": 0.2, "seed": 0})))
    monkeypatch.setattr(cell_command, "DEFAULT_CELL_FN", "fake_cell:run_cell")
    monkeypatch.delenv("MINILLM_CELL_FN", raising=False)
    monkeypatch.setenv("FAKE_CELL_SLEEP", "0")
    monkeypatch.syspath_prepend(str(TESTS))
    assert main(["cell"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["params"]["pruned"] == 800000


@pytest.mark.parametrize("edit,message", [
    (lambda t: t + "tsks: [piqa]\n", "grid.yaml: tsks: unknown key"),
    (lambda t: t.replace("nsamples: 8", "nsamples: eight"),
     "grid.yaml: calibration.nsamples: expected integer, got 'eight'"),
    (lambda t: t.replace("[0.2, 0.5]", "[0.2, 1.0]"),
     "grid.yaml: ratios[1]: expected a pruning ratio in (0, 1), got 1.0"),
    (lambda t: t.replace("name: random, label", "name: no-such-method, label"),
     "grid.yaml: methods[1].name: unknown method 'no-such-method'"),
])
def test_config_errors_are_one_line(tmp_path, fake_env, capsys, edit, message):
    pytest.importorskip("suite.methods")  # the unknown-method check needs the registry
    path = tmp_path / "grid.yaml"
    path.write_text(edit(GRID.format(models="tiny-llama")))
    assert main(["run", str(path), "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "r.jsonl").exists()


# ------------------------------------------ models that are not there; --out holding another grid's records
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


ONE_CELL_GRID = """name: {name}
models: [tiny-llama]
methods: [random]
ratios: [{ratio}]
dense: false
evaluation: {{perplexity: [wikitext2], tasks: [], max_tokens: 512}}
"""


def one_cell_grid(tmp_path, name="mine", ratio=0.2) -> Path:
    path = tmp_path / f"{name}-{ratio}.yaml"
    path.write_text(ONE_CELL_GRID.format(name=name, ratio=ratio))
    return path


def other_grid_record(cell_grid) -> dict:
    cell = {"model": "tiny-opt", "method": "magnitude", "label": "magnitude", "ratio": 0.5, "seed": 0, "options": {}}
    if cell_grid is not None:
        cell["grid"] = cell_grid
    return {"model": "tiny-opt", "method": "magnitude", "label": "magnitude", "ratio_target": 0.5, "seed": 0,
            "status": "ok", "cell": cell, "cell_key": "0" * 64, "perplexity": {"wikitext2": 3.0}}


@pytest.mark.parametrize("case", ["other name", "legacy record of another grid", "edited config"])
def test_run_out_refuses_another_grids_records(tmp_path, fake_env, capsys, case):
    out = tmp_path / "results.jsonl"
    if case == "other name":
        append_record(out, other_grid_record({"name": "theirs", "config_hash": "0123456789abcdef"}))
    elif case == "legacy record of another grid":
        append_record(out, other_grid_record(None))
    else:  # the same name, another version of the grid: its records were made by the 0.2 config
        assert main(["run", str(one_cell_grid(tmp_path, ratio=0.2)), "--out", str(out), "--quiet"]) == 0
        capsys.readouterr()
    before = out.read_bytes()
    mine = one_cell_grid(tmp_path, ratio=0.5)
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--merge" in line
    assert out.read_bytes() == before
    assert main(["run", str(mine), "--out", str(out), "--quiet", "--merge"]) == 0
    records = read_records(out)
    assert len(records) == len(before.splitlines()) + 1 and records[-1]["cell"]["grid"]["name"] == "mine"


def test_run_resumes_its_own_grid_without_merge(tmp_path, fake_env, capsys):
    out, mine = tmp_path / "results.jsonl", one_cell_grid(tmp_path)
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 0
    assert len(read_records(out)) == 1  # the cell was done: skipped, not refused
