"""One grid cell in its own process: the launcher (`run_cell_subprocess`, used by both backends) and the
child (`python -m suite cell`: INTERNAL, used by `suite run` (suite/runner.py), not meant to be typed).

Reads one grid cell (JSON) on stdin, runs it with `suite.pipeline.run_cell(cell)` and prints the
record (JSON) as the last line of stdout; anything the pipeline prints goes to stderr. The runner
starts one fresh process per cell (as `python -m suite.commands.cell`, which skips importing the
other commands), so a crash, a leak or an out-of-memory kill costs one cell, not the grid.

Testing hook: `MINILLM_CELL_FN=module:function` replaces `suite.pipeline:run_cell`; the runner's
tests point it at a fake that sleeps and returns a fixed record (tests/fake_cell.py).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys

from suite.pruning.errors import UserError

NAME = "cell"
HELP = "(internal, used by `suite run`) run one grid cell: cell JSON on stdin, record JSON on stdout"
CELL_FN_ENV = "MINILLM_CELL_FN"
DEFAULT_CELL_FN = "suite.pipeline:run_cell"
KILLED = "cell process killed by "  # the launcher's message for a signal death (Ray retries those)


def add_arguments(parser) -> None:
    pass


def cell_function():
    spec = os.environ.get(CELL_FN_ENV) or DEFAULT_CELL_FN
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"{CELL_FN_ENV}={spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def _plain(value):
    """JSON fallback for numpy / torch scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def run(args=None) -> int:
    try:
        cell = json.loads(sys.stdin.read())
    except ValueError as exc:
        raise UserError(f"cell: stdin is not a JSON cell ({exc})") from None
    function = cell_function()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the record alone
        record = function(cell)
    sys.stdout.write("\n" + json.dumps(record, sort_keys=True, default=_plain) + "\n")
    sys.stdout.flush()
    return 0


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def run_cell_subprocess(cell: dict, threads: int | None = None,
                        gpu: str | None = None) -> tuple[dict, str | None, str]:
    """(record from the pipeline or {}, error message or None, stderr) for one cell in a new process.

    `gpu`: the id the cell sees as its only CUDA device (`CUDA_VISIBLE_DEVICES`)."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    from suite.records import PROJECT_DIR

    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_DIR), env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "suite.commands.cell"], input=json.dumps(cell),
                          capture_output=True, text=True, env=env)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return {}, f"{KILLED}{name}" + (" (out of memory?)" if name == "SIGKILL" else ""), proc.stderr
    if proc.returncode != 0:
        return {}, _last_line(proc.stderr) or f"cell process exited with status {proc.returncode}", proc.stderr
    try:
        record = json.loads(_last_line(proc.stdout))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        return {}, f"cell printed no record (last stdout line: {_last_line(proc.stdout)[:200]!r})", proc.stderr
    return record, None, proc.stderr


def exit_with_the_runner() -> None:
    """Linux: have the kernel SIGKILL this cell when the runner dies (a kill -9 included), so a
    killed grid leaves no orphan cell using the cores; the rerun redoes that cell."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the runner died before the prctl
        sys.exit(1)


if __name__ == "__main__":
    from suite.measure import steady_allocator

    exit_with_the_runner()
    steady_allocator()  # before anything is allocated: the cell's peak memory tracks live tensors
    try:
        sys.exit(run())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
