"""Grids on GPUs without a GPU: the device is part of a cell's identity, and `--jobs N`
hands each concurrent CUDA cell its own GPU (fake visible devices, the stub cell tests/fake_cell.py)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from suite.cli import main
from suite.config import expand_cells, load_config
from suite.records import cell_key, read_records

TESTS = Path(__file__).resolve().parent
GRID = """name: grid
models: [tiny-llama]
methods: [random]
ratios: [0.2, 0.5]
dense: false
device: {device}
calibration: {{nsamples: 8, seqlen: 32}}
evaluation: {{perplexity: [wikitext2], max_tokens: 512}}
"""


@pytest.fixture
def fake_env(monkeypatch):
    monkeypatch.setenv("MINILLM_CELL_FN", "fake_cell:run_cell")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("FAKE_CELL_SLEEP", "0")


def grid(tmp_path, device: str) -> Path:
    path = tmp_path / f"grid-{device.replace(':', '')}.yaml"
    path.write_text(GRID.format(device=device))
    return path


def test_a_cpu_record_never_satisfies_a_cuda_cell(tmp_path, fake_env, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    cpu, cuda = grid(tmp_path, "cpu"), grid(tmp_path, "cuda")
    cpu_cells, cuda_cells = (expand_cells(load_config(p)) for p in (cpu, cuda))
    assert [c["device"] for c in cuda_cells] == ["cuda", "cuda"]
    assert not {cell_key(c) for c in cpu_cells} & {cell_key(c) for c in cuda_cells}
    assert cell_key({**cuda_cells[0], "device": "cuda:1"}) == cell_key(cuda_cells[0])  # the index is the runner's
    out = tmp_path / "r.jsonl"
    assert main(["run", str(cpu), "--out", str(out), "--quiet"]) == 0
    # one file holding both versions of the grid is a deliberate merge (refused otherwise)
    assert main(["run", str(cuda), "--out", str(out), "--quiet", "--merge"]) == 0  # runs: the CPU records don't count
    records = read_records(out)
    assert len(records) == 4
    assert Counter(r["cell"]["device"] for r in records) == {"cpu": 2, "cuda": 2}
    assert main(["run", str(cuda), "--out", str(out), "--quiet", "--merge"]) == 0
    assert len(read_records(out)) == 4  # and a CUDA record does satisfy it


def test_jobs_hand_each_concurrent_cuda_cell_its_own_gpu(tmp_path, fake_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # two fake GPUs
    monkeypatch.setenv("FAKE_CELL_SLEEP", "1.0")
    config = tmp_path / "four.yaml"
    config.write_text(GRID.format(device="cuda").replace("ratios: [0.2, 0.5]", "ratios: [0.2, 0.3, 0.4, 0.5]"))
    out = tmp_path / "r.jsonl"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    records = read_records(out)
    assert len(records) == 4
    for r in records:  # the cell saw one GPU, and its record says which
        assert r["fake_cuda_visible_devices"] in ("3", "5")
        assert r["provenance"]["hardware"]["cuda_visible_devices"] == r["fake_cuda_visible_devices"]
    spans = [(r["fake_interval"], r["fake_cuda_visible_devices"]) for r in records]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                   if a[0][0] < b[0][1] and b[0][0] < a[0][1]]
    assert overlapping  # cells did run side by side ...
    assert all(a[1] != b[1] for a, b in overlapping)  # ... and never two on one GPU


def test_jobs_beyond_the_gpus_wait_for_a_free_one(tmp_path, fake_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # one fake GPU, three jobs
    monkeypatch.setenv("FAKE_CELL_SLEEP", "0.5")
    out = tmp_path / "r.jsonl"
    assert main(["run", str(grid(tmp_path, "cuda")), "--out", str(out), "--quiet", "--jobs", "3"]) == 0
    (a, b) = sorted(r["fake_interval"] for r in read_records(out))
    assert b[0] >= a[1]  # one after the other
    assert {r["fake_cuda_visible_devices"] for r in read_records(out)} == {"2"}


def test_cpu_cells_get_no_gpu(tmp_path, fake_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    out = tmp_path / "r.jsonl"
    assert main(["run", str(grid(tmp_path, "cpu")), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    for r in read_records(out):
        assert r["fake_cuda_visible_devices"] == "3,5"  # inherited, untouched
        assert "cuda_visible_devices" not in r["provenance"]["hardware"]
