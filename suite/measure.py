"""Wall time and peak memory of one phase (load, score, prune, evaluate).

On CUDA: `torch.cuda.max_memory_allocated(device)` after `reset_peak_memory_stats(device)`, of
the device the phase runs on (`measure(device)`; "cuda" is the current one, which in a grid cell
is the one GPU `suite run` made visible to it) — the tensors' peak, which is what the pruning
papers report for GPU memory.

On CPU: the process's peak resident set size during the phase, read from the kernel's high-water
mark `VmHWM` after resetting it at the phase start (writing "5" to /proc/self/clear_refs, Linux
>= 4.0). The kernel updates the mark on every page fault, so unlike a sampling thread it cannot
miss a short spike, and it costs nothing while the phase runs. We record both the absolute peak
(`peak_mb`: model weights + activations + gradients + the interpreter and libraries) and the rise
over the phase's starting RSS (`peak_delta_mb`: what the phase itself allocated — on a shared
model this is the method's own overhead). Where the reset is not possible (not Linux) the
lifetime peak is reported with `peak_source: "lifetime"`, which over-states later phases.

The RSS peak only measures the method if freed tensors leave the process. glibc's malloc serves
blocks below its mmap threshold from the heap and raises that threshold (up to 32 MB) each time a
larger block is freed, so after a few frees most activation-sized tensors come from the heap and
stay resident when freed: on SmolLM2 a statistics pass at 4 windows per batch then left ~600 MB
of freed memory in the RSS (see results/notes/minillm.md). `steady_allocator()` pins the threshold
at 1 MB (`mallopt(M_MMAP_THRESHOLD)`): every tensor >= 1 MB is its own mapping, returned to the
system when freed, so VmHWM follows the live tensors, as `max_memory_allocated` does on CUDA. The
CLI and every grid cell call it first.

Why 1 MB (results/notes/harness.md §1, `scripts/allocator_bench.py`, SmolLM2-135M, each
setting in separate processes): only the 1 MB pin reads the same score-phase peak run after run
(MINI-LLM at q = 2: 982-1,008 MB over three runs; wanda-sp 920-928 MB). At 4 MB, 8 MB or glibc's
default the same command read up to 600 MB more in one run than in another (MINI-LLM 993-1,283,
1,061-1,550 and 998-1,603 MB): the ZO loop's 1-8 MB activations fragment the heap differently
each time. `malloc_trim` at phase start does not help (the fragmentation is within the phase). The
price is speed: fresh mappings are page-faulted and zeroed, and SPSA runs ~30 % slower than with
the default (39-41 s vs 29-30 s at q = 2).
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager

import torch

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def steady_allocator(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold so that freed large blocks leave the RSS (False where not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def _cuda(device) -> bool:
    return torch.cuda.is_available() and str(device).startswith("cuda")


@contextmanager
def measure(device="cpu"):
    """`with measure() as m: ...` then m["seconds"], m["peak_mb"], m["peak_delta_mb"], m["peak_source"]."""
    out: dict = {}
    if _cuda(device):
        device = torch.device(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
    else:
        source = "vmhwm-reset" if _reset_hwm() else "lifetime"
        start_mem = (_status_kb("VmRSS") or 0) * 1024
    start = time.perf_counter()
    try:
        yield out
    finally:
        if _cuda(device):
            torch.cuda.synchronize(device)
            peak, source = torch.cuda.max_memory_allocated(device), "cuda-max-allocated"
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        out.update(
            seconds=round(time.perf_counter() - start, 3),
            peak_mb=round(peak / MB, 1),
            peak_delta_mb=round(max(0, peak - start_mem) / MB, 1),
            peak_source=source,
        )
