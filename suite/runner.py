"""Run an experiment grid: every cell in a fresh subprocess, every record appended when it is done.

`--jobs N` runs N cells at once, each with cpu_count // N torch threads (unless OMP_NUM_THREADS is
set): on the 2-core box two 1-thread cells do 1.36x the work of one 2-thread cell (perplexity of
4,096 tokens: 14.6 s each side by side vs 9.9 s alone), at the price of timings that depend on the
neighbour; the record says how many cells ran at once and with how many threads. Peak memory is
per process either way. Only this process writes the results file, so records stay whole lines.

CUDA cells (`device: cuda`): each runs with `CUDA_VISIBLE_DEVICES` set to one GPU of those
visible to the runner (`CUDA_VISIBLE_DEVICES`, else all that torch sees), taken from a pool and
given back when the cell ends, so `--jobs N` runs at most one cell per GPU (a cell waits for a
free one); its `cuda` is that GPU and its peak memory that GPU's. CPU cells run as before. The
record's provenance says which GPU (`cuda_visible_devices`).

Resumable: cells whose `cell_key` already has an `ok` record in the results file are skipped, so
after a crash, a kill -9 or a Ctrl-C the same command goes on where it stopped (`--force` reruns
everything). A failing cell is recorded with `status: "error"` and the grid goes on; the run then
exits 1. The results file is JSON Lines (suite/records.py); the table is printed at the end.
Each cell's stderr is kept in `<results file>.logs/` (appended, one header per run); its record
names the file (`log`).

Backends: "local" (above) or "ray" (suite/ray_backend.py: each cell a Ray task on a node of a Ray
cluster, in the same cell process). A backend only runs cells and yields what they returned; this
module alone writes records, so resume, --force and the file's guarantees are the same on both.

One results file, one grid: a file that already holds records of another grid (another config
name, or another version of this config: its `grid.config_hash` differs, or, for records written
before cells carried `grid`, a cell this grid does not have) is refused with one line before any
cell runs, so two grids never mix silently in one file and one table; `--merge` appends anyway.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from suite.pruning.errors import UserError
from suite.config import expand_cells, grid_identity, load_config
from suite.commands.cell import run_cell_subprocess
from suite.records import append_record, cell_key, provenance, read_records, repair_records

STDERR_TAIL = 4000  # characters of a failed cell's stderr kept in its record


def default_out(config: dict) -> Path:
    return Path("results") / f"{config['name']}.jsonl"


def threads_per_cell(jobs: int) -> int | None:
    """Torch threads for each of `jobs` concurrent cells; None: inherit (one job, or OMP_NUM_THREADS set)."""
    if jobs <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out: `CUDA_VISIBLE_DEVICES` if set, else torch's count."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return [i.strip() for i in ids.split(",") if i.strip() and i.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def wants_a_gpu(cell: dict) -> bool:
    """A cell on `cuda` (no index: the runner picks the GPU; `cuda:k` stays as the config says)."""
    return str(cell.get("device") or "cpu") == "cuda"


def make_record(cell: dict, result: dict, error: str | None, stderr: str, seconds: float,
                index: int | None = None, jobs: int | None = 1) -> dict:
    """The pipeline's record, completed with the cell's identity, status and provenance.

    `index`: the cell's place in the config's grid (tables order labels by it, whatever order
    concurrent cells finish in); `jobs`: how many cells ran at once (None: not known, as on Ray).
    """
    result = dict(result)
    threads = result.pop("torch_threads", None)  # the cell's own: its timings depend on it
    gpu = result.pop("cuda_visible_devices", None)
    prov = provenance(cell, cell["seed"])
    if gpu is not None:
        prov["hardware"]["cuda_visible_devices"] = gpu
    if threads is not None:
        prov["hardware"]["torch_threads"] = threads
    prov["concurrent_cells"] = jobs
    record = {"model": cell["model"], "method": cell["method"], "options": cell["options"], "seed": cell["seed"],
              "ratio_target": cell["ratio"], "calibration": cell["calibration"], **result}
    record.update(label=cell["label"], cell=cell, cell_key=cell_key(cell), cell_index=index,
                  status="error" if error else "ok", wall_seconds=round(seconds, 3), provenance=prov)
    if error:
        record.update(error=error, stderr_tail=stderr[-STDERR_TAIL:])
    return record


def _timed_cell(cell: dict, threads: int | None, gpus: queue.Queue | None) -> tuple[dict, str | None, str, float]:
    gpu = gpus.get() if gpus is not None and wants_a_gpu(cell) else None  # waits for a free GPU
    try:
        start = time.perf_counter()
        result, error, stderr = run_cell_subprocess(cell, threads, gpu)
        if gpu is not None:
            result = {**result, "cuda_visible_devices": gpu}
        return result, error, stderr, time.perf_counter() - start
    finally:
        if gpu is not None:
            gpus.put(gpu)


def run_cells_locally(todo: list[tuple[int, dict]], name: str, jobs: int = 1, quiet: bool = False):
    """The local backend: `jobs` cell processes at a time on this host; yields each finished cell as
    (index, cell, result, error, stderr, seconds, provenance additions), in finishing order."""
    threads = threads_per_cell(jobs)
    gpus = None  # CUDA cells: one visible GPU each, handed out from a pool (one cell per GPU)
    if any(wants_a_gpu(cell) for _, cell in todo) and (ids := visible_gpus()):
        gpus = queue.Queue()
        for gpu in ids:
            gpus.put(gpu)
    pool = ThreadPoolExecutor(max_workers=jobs)  # threads only wait on their cell's process
    try:
        running = {pool.submit(_timed_cell, cell, threads, gpus): (i, cell) for i, cell in todo}
        for future in tqdm(as_completed(running), total=len(todo), desc=name, unit="cell",
                           disable=quiet, file=sys.stderr):
            i, cell = running[future]
            yield (i, cell, *future.result(), {"backend": "local"})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: no new cell starts


def log_path(out: Path, cell: dict, index: int) -> Path:
    """`<results file without .jsonl>.logs/<grid index>-<model>-<label>-<ratio>-s<seed>-<key>.log`."""
    name = f"{index:03d}-{cell['model']}-{cell['label']}-{cell['ratio']}-s{cell['seed']}-{cell_key(cell)[:8]}"
    return out.with_suffix(".logs") / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".log")


def keep_log(out: Path, cell: dict, index: int, stderr: str) -> str:
    """Append a cell's stderr, under a header with the time, to its log file; return the file's path."""
    path = log_path(out, cell, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {stamp} {cell['model']} / {cell['label']} @ {cell['ratio']} (seed {cell['seed']})\n{stderr}\n")
    return str(path)


def foreign_grids(records: list[dict], config: dict, cells: list[dict]) -> list[str]:
    """Descriptions of the other grids (or grid versions) whose records are in `records`."""
    this = grid_identity(config)
    keys = {cell_key(cell) for cell in cells}
    found = {}
    for record in records:
        grid = (record.get("cell") or {}).get("grid")
        if isinstance(grid, dict):
            if grid != this:
                same = grid.get("name") == this["name"]
                found[json.dumps(grid, sort_keys=True)] = (
                    f"grid {grid.get('name')!r}" + (f" in another version (config hash {grid.get('config_hash')})"
                                                    if same else ""))
        elif record.get("cell_key") not in keys:
            found["legacy"] = "cells this grid does not have"
    return list(found.values())


def run_grid(config_path, out=None, force: bool = False, quiet: bool = False, repair: bool = False,
             jobs: int = 1, merge: bool = False, backend: str = "local", **ray_options) -> int:
    """Run a grid's missing cells on `backend` ("local": `jobs` at a time here; "ray": as Ray tasks,
    `ray_options` going to suite.ray_backend.run_cells) and append one record per finished cell.
    A results file holding another grid's records is refused unless `merge`."""
    config = load_config(config_path)
    from suite.models import refuse_missing_paths

    refuse_missing_paths(config["models"], config_path)  # one line now, not a failed cell per missing path
    out = Path(out) if out else default_out(config)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a results file (.jsonl)")
    if repair and (line := repair_records(out)):
        print(f"repaired {out}: moved its damaged line {line} to {out}.corrupt", file=sys.stderr)
    records = read_records(out)
    cells = expand_cells(config)
    foreign = foreign_grids(records, config, cells)
    if foreign and not merge:
        raise UserError(f"{out} holds records of {'; '.join(foreign)}, not of grid {config['name']!r} "
                        f"(config hash {grid_identity(config)['config_hash']}); choose another --out, "
                        "or pass --merge to add this grid's records to it")
    done = {r.get("cell_key") for r in records if r.get("status") == "ok"}
    from suite.data import require_source

    require_source()  # no mirror and no hub: one line now, not one failed record per cell
    todo = [(i, cell) for i, cell in enumerate(cells) if force or cell_key(cell) not in done]
    jobs = max(1, min(int(jobs), len(todo) or 1))
    threads = threads_per_cell(jobs)
    if not quiet:
        at_once = ""
        if backend == "ray":
            at_once = " on Ray"
        elif jobs > 1:
            at_once = f", {jobs} at a time" + (f" with {threads} torch thread(s) each" if threads else "")
        print(f"{config['name']}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run{at_once} "
              f"-> {out}", file=sys.stderr)
    if backend == "ray":
        from suite.ray_backend import run_cells

        finished = run_cells(todo, config["name"], quiet=quiet, **ray_options)
    else:
        finished = run_cells_locally(todo, config["name"], jobs=jobs, quiet=quiet)
    failed = 0
    with contextlib.closing(finished):  # on an error here, the backend stops its running cells
        for i, cell, result, error, stderr, seconds, extra in finished:
            record = make_record(cell, result, error, stderr, seconds, index=i,
                                 jobs=jobs if backend == "local" else None)
            record["provenance"]["hardware"].update(extra.pop("hardware", {}))  # the node's, if it ran elsewhere
            record["provenance"].update(extra)
            record["log"] = keep_log(out, cell, i, stderr)
            append_record(out, record)
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
