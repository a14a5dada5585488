"""Result records: one JSON line per finished grid cell, appended atomically and read back strictly.

A results file is JSON Lines. `append_record` writes a whole line with one `os.write` on an
O_APPEND descriptor and fsyncs it, so a killed run never leaves half of a record behind and never
loses one that finished; an advisory flock keeps this module's writers and readers from seeing a
line half-way. `read_records` refuses to guess: a damaged last line (a write interrupted outside
this module, a full disk) stops the run with the file and line number, and `repair_records`
(`python -m suite run CONFIG --repair`) moves that line to `<file>.corrupt`, keeping the rest.
NaN and infinite perplexities are written as Python's json writes them (NaN, Infinity).
"""
from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from suite.pruning.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "numpy", "safetensors")
# What makes two grid cells the same experiment. `label` is only a display name and `device`
# may change when a grid is resumed on another machine; dtype changes the numbers, so it counts.
CELL_KEYS = ("model", "method", "options", "ratio", "seed", "calibration", "evaluation", "dtype")
# Keys that count only when a cell has them, so adding one leaves older cells' keys unchanged
OPTIONAL_CELL_KEYS = ("recovery", "ratio_of")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def cell_key(cell: dict) -> str:
    """Stable id of a grid cell: sha256 of the canonical JSON of the fields that define it.

    The device's type is one of them unless it is the CPU (so a CPU record never marks a CUDA cell
    done, and CPU keys written before devices counted stay valid); its index is not (`suite run`
    hands each CUDA cell whichever GPU is free).
    """
    fields = {key: cell.get(key) for key in CELL_KEYS}
    fields.update({k: cell[k] for k in OPTIONAL_CELL_KEYS if cell.get(k) is not None})  # recovery, when set
    device = str(cell.get("device") or "cpu").split(":")[0]
    if device != "cpu":
        fields["device"] = device
    return sha256_hex(fields)


def cell_identity(record: dict) -> tuple:
    """(model, label, target ratio, seed): what a record is a result OF, in tables and `suite check`
    (the label defaults to the method; a dense record's ratio is 0)."""
    ratio = record.get("ratio_target", record.get("ratio", 0.0)) or 0.0
    return record.get("model"), record.get("label") or record.get("method"), float(ratio), record.get("seed", 0)


TUNE = (" w/o tune", " w/ tune")  # table-row suffixes of a recovered cell (suite.tables.split_recovered)


def latest(records: list[dict]) -> list[dict]:
    """One record per cell (model, label, ratio, seed): the last ok one, else the last error."""
    chosen = {}
    for record in records:
        key = cell_identity(record)
        if key not in chosen or record.get("status", "ok") == "ok" or chosen[key].get("status", "ok") != "ok":
            chosen[key] = record
    return [chosen[key] for key in dict.fromkeys(cell_identity(r) for r in records)]


# --------------------------------------------------------------------------- provenance
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _total_ram_mb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _torch_threads() -> int | None:
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return None


def _cuda_device() -> str | None:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA setup must not stop a CPU run from recording itself
        return None


@functools.lru_cache(maxsize=1)
def _static_provenance() -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit or "unknown",
        "git_dirty": bool(dirty) if commit else None,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "hardware": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": _torch_threads(),  # timings depend on it (OMP_NUM_THREADS)
            "ram_mb": _total_ram_mb(),
            "cuda_device": _cuda_device(),
        },
    }


def provenance(config: dict | None = None, seed=None) -> dict:
    """Where a record came from: code version, library versions, config hash, seed, hardware, time."""
    static = _static_provenance()
    return {
        **static,
        "versions": dict(static["versions"]),
        "hardware": dict(static["hardware"]),
        "config_hash": sha256_hex(config)[:16] if config is not None else None,
        "seed": seed,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(getattr(sys, "orig_argv", sys.argv)),
    }


# --------------------------------------------------------------------------- write
def write_json_atomic(path, payload: dict, indent: int = 2, sort_keys: bool = True) -> None:
    """Write one JSON document to `path` (parents created): a temp file beside it, then os.replace, so a
    reader sees the old file or the whole new one, never a part. Ends with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)


def append_record(path, record: dict) -> None:
    """Append one record as one JSON line: one write on an O_APPEND descriptor, then fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # other writers finish their line before we look at the tail
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            raise UserError(f"{path}: last line is incomplete; run `python -m suite run CONFIG --repair` first")
        written = os.write(fd, line)
        while written < len(line):  # a short write happens only on a full disk or a signal: finish the line
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- read
def _parse(path: Path) -> tuple[list[dict], int | None, bytes]:
    """(good records, 1-based number of a damaged last line or None, the file's bytes before it)."""
    data = b""
    if path.exists():
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # never read a line that a writer is in the middle of
            data = f.read()
    lines = data.split(b"\n")  # the element after the final "\n" is b"" for a complete file
    records, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if raw.strip():
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if is_last:
                    raise ValueError("no trailing newline")
            except ValueError as exc:
                if is_last or not any(rest.strip() for rest in lines[number:]):
                    return records, number, data[:offset]
                raise UserError(
                    f"{path}:{number}: invalid record ({str(exc).splitlines()[0]}); "
                    "it is not the last line, so fix or delete it by hand"
                ) from None
            records.append(record)
        offset += len(raw) + 1
    return records, None, data


def read_records(path) -> list[dict]:
    """All records of a results file ([] if it does not exist). A damaged last line is an error."""
    path = Path(path)
    records, bad_line, _ = _parse(path)
    if bad_line is not None:
        raise UserError(
            f"{path}:{bad_line}: last line is truncated or invalid (an interrupted write?); "
            f"run `python -m suite run CONFIG --repair` to move it to {path}.corrupt and keep the rest"
        )
    return records


def repair_records(path) -> int | None:
    """Move a damaged last line to `<path>.corrupt` (appended), keep the good lines.

    Returns the line number that was moved, or None if the file was fine."""
    path = Path(path)
    _, bad_line, good = _parse(path)
    if bad_line is None:
        return None
    tail = path.read_bytes()[len(good):]
    with open(path.with_name(path.name + ".corrupt"), "ab") as f:
        f.write(tail if tail.endswith(b"\n") else tail + b"\n")
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(good)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old file or the repaired one, never a mix
    return bad_line
