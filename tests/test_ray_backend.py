"""`suite run --backend ray`: the grid's cells as Ray tasks on a local Ray instance (2 CPUs, started
once for this module), against the local backend and the runner's guarantees (tests/test_runner.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from suite.cli import main
from suite.config import expand_cells, load_config
from suite.records import cell_key, read_records

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GRID = """name: grid
models: [{models}]
methods: [random]
ratios: [0.2, 0.5]
calibration: {{nsamples: 8, seqlen: 32}}
evaluation: {{perplexity: [wikitext2], tasks: [piqa], limit: 10, max_tokens: 512}}
"""
# a fake cell whose process (MINILLM_TEST_KILL=cell) or Ray worker (=worker) is SIGKILLed in the
# first MINILLM_TEST_KILLS attempts of the cell random @ 0.5; every attempt leaves a line in a file
KILLER = """import os, signal, time
from pathlib import Path

from fake_cell import run_cell as fake


def run_cell(cell):
    if (cell["label"], cell["ratio"]) == ("random", 0.5):
        attempts = Path(os.environ["MINILLM_TEST_ATTEMPTS"])
        with open(attempts, "a") as f:
            f.write("attempt\\n")
        if attempts.read_text().count("attempt") <= int(os.environ["MINILLM_TEST_KILLS"]):
            os.kill(os.getpid() if os.environ["MINILLM_TEST_KILL"] == "cell" else os.getppid(), signal.SIGKILL)
            time.sleep(60)  # the worker's death reaches this process by PR_SET_PDEATHSIG
    return fake(cell)
"""


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance with 2 CPUs for this module; its address, for drivers in other processes."""
    ray = pytest.importorskip("ray")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def fake_env(monkeypatch):
    monkeypatch.setenv("MINILLM_CELL_FN", "fake_cell:run_cell")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


def grid(tmp_path, models="tiny-llama") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(models=models))
    return path


def keys_of(config_path) -> list[str]:
    return [cell_key(c) for c in expand_cells(load_config(config_path))]


METRICS = ("params", "ratio_achieved", "perplexity", "zero_shot", "zero_shot_mean")


def test_smoke_grid_on_ray_equals_the_local_backend(tmp_path, ray_address, monkeypatch, capsys):
    import ray

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both backends: one torch thread per cell
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    config = str(ROOT / "configs" / "smoke.yaml")
    assert main(["run", config, "--out", str(local), "--quiet", "--jobs", "2"]) == 0
    assert main(["run", config, "--out", str(on_ray), "--quiet", "--backend", "ray"]) == 0
    by_local = {r["cell_key"]: r for r in read_records(local)}
    by_ray = {r["cell_key"]: r for r in read_records(on_ray)}
    assert list(by_ray) != [] and sorted(by_ray) == sorted(by_local) == sorted(keys_of(config))
    for key, record in by_ray.items():
        assert record["status"] == by_local[key]["status"] == "ok"
        assert {m: record.get(m) for m in METRICS} == {m: by_local[key].get(m) for m in METRICS}
        assert record["perplexity"]["wikitext2"] > 1 and record["params"]
        prov = record["provenance"]
        assert prov["backend"] == "ray" and prov["ray_version"] == ray.__version__
        assert prov["node"]["id"] in {n["NodeID"] for n in ray.nodes()}
        assert prov["hardware"]["torch_threads"] == 1 and by_local[key]["provenance"]["backend"] == "local"
        assert Path(record["log"]).read_text().startswith("=== ") and Path(by_local[key]["log"]).exists()
    capsys.readouterr()
    assert main(["run", config, "--out", str(on_ray), "--quiet"]) == 0  # the other backend resumes it
    assert main(["run", config, "--out", str(local), "--quiet", "--backend", "ray"]) == 0
    assert len(read_records(on_ray)) == len(read_records(local)) == len(by_ray)  # nothing rerun


@pytest.mark.parametrize("kill,retries,kills", [("cell", 1, 1), ("worker", 1, 1), ("cell", 0, 1), ("worker", 0, 1)])
def test_a_killed_cell_is_retried_then_recorded_once(tmp_path, ray_address, monkeypatch, kill, retries, kills):
    (tmp_path / "killer.py").write_text(KILLER)
    attempts = tmp_path / "attempts"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{TESTS}")
    monkeypatch.setenv("MINILLM_CELL_FN", "killer:run_cell")
    monkeypatch.setenv("MINILLM_TEST_ATTEMPTS", str(attempts))
    monkeypatch.setenv("MINILLM_TEST_KILL", kill)
    monkeypatch.setenv("MINILLM_TEST_KILLS", str(kills))
    config, out = grid(tmp_path), tmp_path / "r.jsonl"
    rc = main(["run", str(config), "--out", str(out), "--quiet", "--backend", "ray", "--retries", str(retries)])
    records = read_records(out)
    assert Counter(r["cell_key"] for r in records) == Counter(keys_of(config))  # every cell once
    killed = next(r for r in records if r["label"] == "random" and r["ratio_target"] == 0.5)
    assert attempts.read_text().count("attempt") == min(retries, kills) + 1
    if retries >= kills:
        assert rc == 0 and {r["status"] for r in records} == {"ok"}
        assert killed["perplexity"] == {"wikitext2": 10.0 / 0.5 + len("random")}  # the fake's own value
    else:
        assert rc == 1 and killed["status"] == "error"
        assert killed["error"].endswith("gave up after 0 retries")
        cause = "WorkerCrashedError: " if kill == "worker" else "cell process killed by SIGKILL"
        assert killed["error"].startswith(cause)
        assert {r["status"] for r in records if r is not killed} == {"ok"}


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, ray_address, fake_env):
    config, out = grid(tmp_path, models="broken, tiny-llama"), tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--backend", "ray"]) == 1
    records = read_records(out)
    assert Counter(r["cell_key"] for r in records) == Counter(keys_of(config))  # raised: recorded, not retried
    broken = [r for r in records if r["model"] == "broken"]
    assert {r["status"] for r in broken} == {"error"}
    assert broken[1]["error"] == f"RuntimeError: fake failure for {broken[1]['label']}"
    assert "Traceback" in broken[1]["stderr_tail"] and "Traceback" in Path(broken[1]["log"]).read_text()
    assert {r["status"] for r in records if r["model"] == "tiny-llama"} == {"ok"}


def test_driver_killed_mid_grid_then_rerun_gives_every_cell_once(tmp_path, ray_address, fake_env):
    config, out = grid(tmp_path, models="tiny-llama, tiny-opt"), tmp_path / "r.jsonl"
    driver = subprocess.Popen([sys.executable, "-m", "suite", "run", str(config), "--out", str(out), "--quiet",
                               "--backend", "ray", "--address", ray_address],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"},
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert driver.poll() is None and time.monotonic() < deadline, "the grid never wrote a record"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = read_records(out)  # no partial line: this would raise
    assert 1 <= len(before) < 6 and out.read_bytes().endswith(b"\n")

    assert main(["run", str(config), "--out", str(out), "--quiet", "--backend", "ray"]) == 0
    after = read_records(out)
    assert after[: len(before)] == before  # finished records are kept as they were
    assert Counter(r["cell_key"] for r in after) == Counter(keys_of(config))  # each cell exactly once


def test_without_ray_the_backend_is_a_one_line_error(tmp_path, fake_env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "r.jsonl"
    assert main(["run", str(grid(tmp_path)), "--out", str(out), "--backend", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --backend ray needs Ray") and "[ray]" in err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--address", "auto"], "error: --address: Ray backend options; add --backend ray\n"),
    (["--backend", "ray", "--jobs", "2"], "error: --jobs is the local backend's"),
    (["--backend", "ray", "--retries", "-1"], "error: --retries must be >= 0"),
])
def test_backend_options_are_checked(tmp_path, fake_env, capsys, args, message):
    out = tmp_path / "r.jsonl"
    assert main(["run", str(grid(tmp_path)), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)
    assert not out.exists()


def test_a_cuda_cell_asks_ray_for_a_gpu():
    from suite.ray_backend import task_options

    cpu = {"model": "m", "label": "random", "ratio": 0.2, "seed": 0, "device": "cpu"}
    options = task_options(cpu, 2, None, 3, {"MINILLM_DATA": "/d"})
    assert (options["num_cpus"], options.get("num_gpus"), options.get("memory")) == (2, None, None)
    assert options["max_retries"] == 3 and options["runtime_env"] == {"env_vars": {"MINILLM_DATA": "/d"}}
    options = task_options({**cpu, "device": "cuda:0"}, 1, 1.5, 0, {})
    assert (options["num_cpus"], options["num_gpus"], options["memory"]) == (1, 1, 1.5 * 2**30)
