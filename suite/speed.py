"""Pruned-vs-dense speed that can be believed: `torch.utils.benchmark` timings with a dense/dense control.

The old probe (4 × 128 tokens, 3 repeats, one wall-clock mean) measured a dense model against
itself at 0.86 and 20 %-pruned SmolLM2 anywhere from 0.81× to 1.49×. Here each measurement is a
`torch.utils.benchmark.Timer(...).adaptive_autorange()`: a warm-up, then blocks of runs until the
interquartile range (IQR) is within `threshold` of the median or `max_run_time` is spent; we keep
the median and the IQR. The Timer synchronises CUDA around every block, and pins torch's thread
count to the caller's (`num_threads`).

Two quantities, as inference has two regimes:
  prefill  one forward of a [batch, seqlen] batch without cache: tokens/s = batch·seqlen / median.
  decode   one next-token step for the whole batch against a cache of `seqlen` tokens (the step's
           cache entry is cropped off again after each run, so every run sees the same context):
           tokens/s = batch / median.

`compare(dense, pruned)` times dense, pruned, dense again (A B A), so the control
`dense_control = speed(dense run 1) / speed(dense run 2)` of the same call says how far two timings
of the *same* model drift apart under the conditions of that measurement; a speed-up is only
readable where it is well outside |control − 1|.
"""
from __future__ import annotations

import torch
from torch.utils import benchmark

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _measure(stmt: str, env: dict, threshold: float, min_run_time: float, max_run_time: float) -> dict:
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    m = timer.adaptive_autorange(threshold=threshold, min_run_time=min_run_time, max_run_time=max_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}


def speed(model, windows: torch.Tensor, batch_size: int = 4, threshold: float = 0.05,
          min_run_time: float = 0.5, max_run_time: float = 5.0, warmup: int = 3) -> dict:
    """Prefill and per-token decode speed of `model` on the first `batch_size` windows.

    windows: [n, seqlen] token ids (n ≥ batch_size). Returns {"prefill": {...}, "decode": {...}},
    each with median_s, iqr_s (seconds per call), runs and tokens_per_s (tokens / median).
    """
    device = _device(model)
    batch = windows[:batch_size].to(device)
    with torch.inference_mode():
        out = model(input_ids=batch, use_cache=True)
        cache = out.get("cache") or out.get("past_key_values")  # transformers >= 5.2x names it `cache`
        step = out["logits"][:, -1:].argmax(-1)
        del out

        import inspect

        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def prefill():
            model(input_ids=batch, use_cache=False)

        def decode():
            model(input_ids=step, use_cache=True, **{name: cache})
            cache.crop(-1)  # back to the prefill's context for the next run

        for _ in range(warmup):  # caches, allocator and (on CUDA) kernels settle before any timing
            prefill()
            decode()
        p = _measure("prefill()", {"prefill": prefill}, threshold, min_run_time, max_run_time)
        d = _measure("decode()", {"decode": decode}, threshold, min_run_time, max_run_time)
    p["tokens_per_s"] = batch.numel() / p["median_s"]
    d["tokens_per_s"] = batch.shape[0] / d["median_s"]
    return {"prefill": p, "decode": d, "batch_size": int(batch.shape[0]), "seqlen": int(batch.shape[1])}


def compare(dense, pruned, windows: torch.Tensor, **kw) -> dict:
    """Dense, pruned, dense again: per regime the speed-up (dense median / pruned median, from the mean of
    the two dense medians) and the dense/dense control (first dense median / second). Either model may be a
    callable returning the model (so a caller can hold only one in memory at a time)."""
    get = lambda m: m() if callable(m) and not isinstance(m, torch.nn.Module) else m  # noqa: E731
    first = speed(get(dense), windows, **kw)
    after = speed(get(pruned), windows, **kw)
    second = speed(get(dense), windows, **kw)
    out = {"dense": first, "pruned": after, "dense_again": second}
    for regime in ("prefill", "decode"):
        d1, d2, p = first[regime]["median_s"], second[regime]["median_s"], after[regime]["median_s"]
        out[f"{regime}_speedup"] = ((d1 + d2) / 2) / p
        out[f"{regime}_dense_control"] = d2 / d1  # speed of run 1 / speed of run 2
    return out
