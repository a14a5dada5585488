"""Run an experiment grid: every cell in a fresh subprocess, every record appended when it is done.

Resumable: cells whose `cell_key` already has an `ok` record in the results file are skipped, so
after a crash, a kill -9 or a Ctrl-C the same command goes on where it stopped (`--force` reruns
everything). A failing cell is recorded with `status: "error"` and the grid goes on; the run then
exits 1. The results file is JSON Lines (suite/records.py); the table is printed at the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from suite.config import expand_cells, load_config
from suite.records import PROJECT_DIR, append_record, cell_key, provenance, read_records, repair_records

STDERR_TAIL = 4000  # characters of a failed cell's stderr kept in its record


def default_out(config: dict) -> Path:
    return Path("results") / f"{config['name']}.jsonl"


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def run_cell_subprocess(cell: dict) -> tuple[dict, str | None, str]:
    """(record from the pipeline or {}, error message or None, stderr) for one cell in a new process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_DIR), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "suite.commands.cell"], input=json.dumps(cell),
                          capture_output=True, text=True, env=env)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return {}, f"cell process killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else ""), proc.stderr
    if proc.returncode != 0:
        return {}, _last_line(proc.stderr) or f"cell process exited with status {proc.returncode}", proc.stderr
    try:
        record = json.loads(_last_line(proc.stdout))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        return {}, f"cell printed no record (last stdout line: {_last_line(proc.stdout)[:200]!r})", proc.stderr
    return record, None, proc.stderr


def make_record(cell: dict, result: dict, error: str | None, stderr: str, seconds: float) -> dict:
    """The pipeline's record, completed with the cell's identity, status and provenance."""
    record = {"model": cell["model"], "method": cell["method"], "options": cell["options"], "seed": cell["seed"],
              "ratio_target": cell["ratio"], "calibration": cell["calibration"], **result}
    record.update(label=cell["label"], cell=cell, cell_key=cell_key(cell), status="error" if error else "ok",
                  wall_seconds=round(seconds, 3), provenance=provenance(cell, cell["seed"]))
    if error:
        record.update(error=error, stderr_tail=stderr[-STDERR_TAIL:])
    return record


def run_grid(config_path, out=None, force: bool = False, quiet: bool = False, repair: bool = False) -> int:
    config = load_config(config_path)
    out = Path(out) if out else default_out(config)
    if repair and (line := repair_records(out)):
        print(f"repaired {out}: moved its damaged line {line} to {out}.corrupt", file=sys.stderr)
    done = {r.get("cell_key") for r in read_records(out) if r.get("status") == "ok"}
    cells = expand_cells(config)
    todo = [cell for cell in cells if force or cell_key(cell) not in done]
    if not quiet:
        print(f"{config['name']}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run -> {out}",
              file=sys.stderr)
    failed = 0
    for cell in tqdm(todo, desc=config["name"], unit="cell", disable=quiet, file=sys.stderr):
        start = time.perf_counter()
        result, error, stderr = run_cell_subprocess(cell)
        append_record(out, make_record(cell, result, error, stderr, time.perf_counter() - start))
        if error:
            failed += 1
            where = f"{cell['model']} / {cell['label']} @ {cell['ratio']} (seed {cell['seed']})"
            tqdm.write(f"cell {where} failed: {error}", file=sys.stderr)
    from suite.tables import to_markdown

    print(to_markdown(read_records(out)), end="")
    if failed:
        print(f"{failed} of {len(todo)} cells failed (status 'error' in {out}); rerun to retry them",
              file=sys.stderr)
    return 1 if failed else 0
