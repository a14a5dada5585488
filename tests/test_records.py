"""Result records: atomic appends, strict reads, repair of a damaged tail, cell keys, provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from suite.pruning.errors import UserError
from suite import records
from suite.records import append_record, cell_key, provenance, read_records, repair_records

CELL = {"model": "tiny-llama", "method": "random", "label": "random", "options": {"a": 1}, "ratio": 0.2,
        "seed": 0, "calibration": {"corpus": "c4", "nsamples": 8, "seqlen": 64},
        "evaluation": {"perplexity": ["wikitext2"], "tasks": ["piqa"]}, "device": "cpu", "dtype": "float32"}


def test_append_writes_one_sorted_line_with_one_write_and_fsync(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.jsonl"
    writes, syncs = [], []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    append_record(path, {"b": 2, "a": 1})
    append_record(path, {"c": [1, 2]})
    assert writes == [b'{"a": 1, "b": 2}\n', b'{"c": [1, 2]}\n']
    assert len(syncs) == 2
    assert path.read_bytes() == b'{"a": 1, "b": 2}\n{"c": [1, 2]}\n'
    assert read_records(path) == [{"a": 1, "b": 2}, {"c": [1, 2]}]


def test_missing_file_reads_empty_and_blank_lines_are_ignored(tmp_path):
    assert read_records(tmp_path / "none.jsonl") == []
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_records(path) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("tail", ['{"a": 3, "b"', '{"a": 3}', "garbage\n", "[1, 2]\n"])
def test_damaged_last_line_is_reported_then_repaired(tmp_path, tail):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n' + tail)
    with pytest.raises(UserError) as err:
        read_records(path)
    assert f"{path}:3:" in str(err.value) and "--repair" in str(err.value)
    if not tail.endswith("\n"):
        with pytest.raises(UserError, match="--repair"):  # never glue a new record onto a partial line
            append_record(path, {"a": 4})
    assert repair_records(path) == 3
    assert read_records(path) == [{"a": 1}, {"a": 2}]
    assert (tmp_path / "r.jsonl.corrupt").read_text() == tail.rstrip("\n") + "\n"
    assert repair_records(path) is None  # nothing left to repair
    append_record(path, {"a": 4})
    assert [r["a"] for r in read_records(path)] == [1, 2, 4]


def test_invalid_middle_line_is_an_error_with_its_number(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(UserError, match=r"r\.jsonl:2: invalid record"):
        read_records(path)
    with pytest.raises(UserError, match=":2:"):
        repair_records(path)  # only a damaged tail is repaired automatically
    assert path.read_text() == '{"a": 1}\nnot json\n{"a": 3}\n'


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys
        from suite.records import append_record
        for i in range(60):
            append_record({str(path)!r}, {{"writer": sys.argv[1], "i": i, "pad": "x" * 20000}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)]) for w in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = read_records(path)
    assert len(lines) == 180
    for w in map(str, range(3)):
        assert [r["i"] for r in lines if r["writer"] == w] == list(range(60))


def test_cell_key_is_stable_and_ignores_display_fields():
    same = json.loads(json.dumps(CELL))
    same = dict(reversed(list(same.items())))  # key order does not matter
    assert cell_key(same) == cell_key(CELL)
    assert len(cell_key(CELL)) == 64
    assert cell_key({**CELL, "label": "other", "device": "cpu"}) == cell_key(CELL)
    for change in ({"ratio": 0.5}, {"seed": 1}, {"options": {"a": 2}}, {"model": "tiny-opt"}, {"device": "cuda"},
                   {"dtype": "float16"}, {"evaluation": {"perplexity": ["ptb"], "tasks": ["piqa"]}},
                   {"calibration": {"corpus": "c4", "nsamples": 16, "seqlen": 64}}):
        assert cell_key({**CELL, **change}) != cell_key(CELL), change


def test_provenance_fields():
    p = provenance(CELL, seed=3)
    assert p["config_hash"] == provenance(dict(CELL), seed=0)["config_hash"]
    assert len(p["config_hash"]) == 16 and int(p["config_hash"], 16) >= 0
    assert p["seed"] == 3
    assert set(p["versions"]) == {"python", "torch", "transformers", "lm_eval", "datasets", "numpy", "safetensors"}
    assert p["versions"]["torch"]
    assert {"platform", "cpu_count", "torch_threads", "ram_mb", "cuda_device"} <= set(p["hardware"])
    assert p["timestamp_utc"].endswith("+00:00")
    assert isinstance(p["command"], list) and p["command"]
    assert isinstance(p["git_commit"], str)
    assert provenance()["config_hash"] is None
    json.dumps(p)  # a record must stay JSON


def test_provenance_git_commit_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "PROJECT_DIR", tmp_path)
    records._static_provenance.cache_clear()
    try:
        assert provenance()["git_commit"] == "unknown"
        git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                                        check=True, capture_output=True)
        git("init", "-q")
        (tmp_path / "f.txt").write_text("1")
        git("add", "f.txt")
        git("commit", "-qm", "c")
        records._static_provenance.cache_clear()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
        assert (provenance()["git_commit"], provenance()["git_dirty"]) == (head, False)
        (tmp_path / "f.txt").write_text("2")
        records._static_provenance.cache_clear()
        assert provenance()["git_dirty"] is True
    finally:
        records._static_provenance.cache_clear()
