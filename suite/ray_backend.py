"""`python -m suite run CONFIG --backend ray [--address auto|HOST:PORT]`: a grid's cells as Ray tasks.

Rather than a scheduler of our own, the grid is spread over the cores of a host, the GPUs of a node
or the nodes of a cluster by Ray (https://docs.ray.io). Each cell is one Ray task; the task starts
the runner's own cell process (`suite.commands.cell.run_cell_subprocess`: `python -m suite.commands.cell`,
one fresh process per cell, so peak memory stays per cell and a crash costs one cell) and returns
what it printed. The task requests the cell's resources: `num_gpus=1` for a CUDA cell, `cell_cpus`
CPUs (also the cell's torch threads) for every cell, and `memory` when the user gives one (the
suite has no memory model yet to predict it).

Only the driver writes records (suite/runner.py appends them, one fsynced line per finished cell),
so resume, `--force` and the results file behave as with the local backend. Failures:
- the cell raises: the cell process exits 1, the task returns the error, the cell is recorded as
  failed and the grid goes on (as locally; not retried: a deterministic error would fail again);
- the cell process is killed by a signal (SIGKILL: the out-of-memory killer, a preemption) or the
  Ray worker or its node is lost: Ray retries the task up to `retries` times (`max_retries` for a
  lost worker, `retry_exceptions=[CellKilled]` for a killed cell process), then the cell is
  recorded as failed with the cause (e.g. `WorkerCrashedError: ...`, `cell process killed by SIGKILL`).
- the driver dies: Ray ends the job's tasks (their cell processes die with their worker, by
  PR_SET_PDEATHSIG); finished cells are in the results file, the rerun runs the others.

Ray workers inherit the environment of the Ray node, not of the driver: the driver forwards its
suite settings (PYTHONPATH and the MINILLM_*, HF_*, TRANSFORMERS_* and TOKENIZERS_* variables) to
every task, as a runtime_env (so the worker imports the same code) and to the cell process.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time

from suite.pruning.errors import UserError

EXTRA = "pip install 'minillm-suite[ray]'  (from a clone: pip install '.[ray]')"
FORWARD_PREFIXES = ("MINILLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
FORWARD_NAMES = ("PYTHONPATH",)
POLL_SECONDS = 1.0


def import_ray():
    """The `ray` module, or a UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--backend ray needs Ray, an optional extra: {EXTRA}") from None
    return ray


def _forwarded(name: str) -> bool:
    return name in FORWARD_NAMES or name.startswith(FORWARD_PREFIXES)


def driver_env() -> dict[str, str]:
    """The driver's suite settings; PYTHONPATH starts with this checkout, its relative entries made absolute."""
    from suite.records import PROJECT_DIR

    env = {k: v for k, v in os.environ.items() if _forwarded(k)}
    paths = [str(PROJECT_DIR), *(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # this checkout first, as the cell process has it
    return env


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """os.environ with exactly `env`'s suite settings (a Ray worker runs one task at a time)."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if _forwarded(n)]:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class CellKilled(Exception):
    """The cell process died by a signal; Ray retries the task (retry_exceptions)."""

    def __init__(self, error: str, stderr: str):
        super().__init__(error)
        self.error, self.stderr = error, stderr

    def __reduce__(self):  # travels back to the driver with its stderr
        return CellKilled, (self.error, self.stderr)


def _gpu_name(gpu_ids) -> str | None:
    if not gpu_ids:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(gpu_ids[0])],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _node() -> dict:
    """Where this task runs: Ray node id and address, host name, the node's hardware."""
    import ray

    from suite.records import _total_ram_mb

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    return {"node": {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                     "hostname": platform.node(), "gpu_ids": gpu_ids},
            "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "ram_mb": _total_ram_mb(),
                         "cuda_device": _gpu_name(gpu_ids)}}


def cell_task(cell: dict, threads: int, env: dict[str, str]):
    """Ray task body: one cell in its own process. (result, error, stderr, seconds, node), or CellKilled."""
    from suite.commands.cell import KILLED, run_cell_subprocess

    start = time.perf_counter()
    with _environment(env):
        result, error, stderr = run_cell_subprocess(cell, threads)
    if error and error.startswith(KILLED):
        raise CellKilled(error, stderr)
    return result, error, stderr, time.perf_counter() - start, _node()


def task_options(cell: dict, cell_cpus: int, memory_gb: float | None, retries: int, env: dict) -> dict:
    """Ray options of one cell's task: its resources, its retries, the driver's settings."""
    options = {"num_cpus": cell_cpus, "max_retries": retries, "retry_exceptions": [CellKilled],
               "runtime_env": {"env_vars": env},
               "name": f"cell {cell['model']} {cell['label']} {cell['ratio']} seed {cell['seed']}"}
    if str(cell.get("device", "cpu")).startswith("cuda"):
        options["num_gpus"] = 1
    if memory_gb:
        options["memory"] = int(memory_gb * 2**30)
    return options


def _slots(ray, cells: list[dict], cell_cpus: int) -> int:
    """How many of these cells the cluster can run at once now (CPUs, and GPUs for CUDA cells)."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // cell_cpus)
    if any(str(c.get("device", "cpu")).startswith("cuda") for c in cells):
        slots = min(slots, int(resources.get("GPU", 0)))
    return max(slots, 1)


def _failure(exc: Exception, retries: int) -> tuple[str, str]:
    """(error message, stderr) of a task that Ray gave up on."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, CellKilled) or isinstance(exc, CellKilled):
        killed = cause if isinstance(cause, CellKilled) else exc
        return f"{killed.error}; gave up after {retries} retries", killed.stderr
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}; gave up after {retries} retries", str(exc)


def connect(address: str | None, quiet: bool) -> bool:
    """ray.init unless this process is already connected; True if it connected here."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import logging

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING if quiet else logging.INFO)
    except ConnectionError as exc:
        raise UserError(f"--address {address}: no Ray cluster there ({str(exc).splitlines()[0]})") from None
    return True


def run_cells(todo: list[tuple[int, dict]], name: str, quiet: bool = False, address: str | None = None,
              retries: int = 2, cell_cpus: int = 1, memory_gb: float | None = None):
    """Run `todo` ((grid index, cell) pairs) as Ray tasks; yield each finished cell as
    (index, cell, result, error, stderr, seconds, provenance additions), in finishing order.

    Raises UserError if Ray is missing or `address` has no cluster. On exit (done, Ctrl-C, an
    error in the caller) the tasks still running are cancelled; a Ray instance started here is shut down.
    """
    ray = import_ray()
    if not todo:
        return
    started_here = connect(address, quiet)
    from tqdm import tqdm

    env = driver_env()
    task = ray.remote(cell_task)
    running = {}
    try:
        for i, cell in todo:
            running[task.options(**task_options(cell, cell_cpus, memory_gb, retries, env)).remote(
                cell, cell_cpus, env)] = (i, cell, time.perf_counter())
        slots = _slots(ray, [c for _, c in todo], cell_cpus)
        failed = 0
        with tqdm(total=len(todo), desc=name, unit="cell", disable=quiet, file=sys.stderr) as bar:
            while running:
                bar.set_postfix(running=min(len(running), slots), failed=failed, refresh=True)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    i, cell, submitted = running.pop(ref)
                    extra = {"backend": "ray", "ray_version": ray.__version__}
                    try:
                        result, error, stderr, seconds, node = ray.get(ref)
                        extra.update(node)
                    except (ray.exceptions.RayError, CellKilled) as exc:
                        (error, stderr), result = _failure(exc, retries), {}
                        seconds = time.perf_counter() - submitted  # queueing and every attempt
                    failed += bool(error)
                    bar.update(1)
                    yield i, cell, result, error, stderr, seconds, extra
    finally:
        for ref in running:  # Ctrl-C or a caller's error: stop what is left, kill their cell processes
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
