"""Pruned-vs-dense speed that can be believed: interleaved rounds, medians of per-round ratios, a dense/dense control.

Two regimes, as inference has two:
  prefill  one forward of a [batch, seqlen] batch without cache: tokens/s = batch·seqlen / seconds.
  decode   one next-token step for the whole batch against a cache of `seqlen` tokens (the step's
           cache entry is cropped off again after each call, so every call sees the same context):
           tokens/s = batch / seconds.

`compare(dense, pruned, windows)` (`suite bench-speed`): the design, and why.
  The first probe timed dense, pruned, dense again once each (A B A, `adaptive_autorange`) and on
  mostly idle cores put the dense/dense control at 0.82-1.22 (results/notes/precision.md section 5).
  Its faults: a [4, 128] SmolLM2 prefill takes ~1 s on 2 cores, so `adaptive_autorange` (5 % IQR
  threshold) stopped after 1-3 calls, i.e. a timing was one or two calls; and one A B A sequence
  lets every slow drift (CPU frequency, other load, caches) land in the ratios whole. Now:
  - arms: dense, every pruned model, and `dense_again`: a second copy of the dense model
    (`copy.deepcopy` by default), timed as if it were one more pruned model. Its "speed-up" over dense
    is the control: it has its own tensor storage like a pruned model, so it measures what a speed-up
    measures, under the same conditions, and should be 1;
  - `warmup` untimed calls per arm and regime first (allocator, caches, lazily built kernels);
  - `rounds` short rounds; each round times one block per arm and regime (prefill blocks first,
    then decode blocks), the arms in a cyclically rotated order (`round_order`: round r starts
    at arm r mod n), so over n rounds every arm holds every position once and a drift within a round
    favours no arm;
  - a block: `number` calls (sized once, from one dense call after the warm-up, so that a dense block
    takes ~`block_s`; the same number for every arm), each timed on its own; the block's time is
    their median (one call hit by other load does not move it);
  - per round the ratio dense seconds / arm seconds; the speed-up (and the control) is the median of
    the per-round ratios, with their interquartile range (IQR, `statistics.quantiles` inclusive):
    a drift slower than a round cancels in each ratio, and a disturbed round is one outlier among many;
  - torch's thread count pinned to `threads` for the whole comparison (restored after).
  Clock: `torch.utils.benchmark.timer` (perf_counter, synchronising the accelerator on GPU). Not
  `Timer.blocked_autorange` / `Timer.timeit` per block: both spend 1-2 untimed calls per block on
  sizing and warm-up, which at ~1 s a prefill call doubles the cost of a round; warm-up and sizing
  happen once per comparison instead.

`speed(model, windows)` (the grid cell's cheap probe, suite/pipeline.py `SPEED_PROBE`): one
`torch.utils.benchmark.Timer.adaptive_autorange` per regime (warm-up, blocks until the IQR is within
`threshold` of the median or `max_run_time` is spent; median and IQR). A cell holds only one model
(pruning is in place), so it times the dense model twice before pruning and the pruned model once after
evaluation: not interleaved, short timings, a control of that quality (its record says so).
"""
from __future__ import annotations

import copy
import inspect
import statistics
from contextlib import contextmanager

import torch
from torch.utils import benchmark

REGIMES = ("prefill", "decode")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _calls(model, batch: torch.Tensor) -> dict:
    """{"prefill": f, "decode": f}: zero-argument callables (run under torch.inference_mode) that do one
    prefill forward of `batch` [b, s] without cache, and one decode step against the batch's own cache."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    # a cache of full layers: a sliding-window layer cannot be cropped back once its window is full
    # (Mistral, Qwen2, Gemma 2/3 past their window); the attention mask still applies the window, so
    # the logits are the model's own, and dense and pruned models of a family are timed alike
    out = model(input_ids=batch, use_cache=True, **{name: DynamicCache()})
    cache = out.get("cache") or out.get("past_key_values")  # transformers >= 5.2x names it `cache`
    step = out["logits"][:, -1:].argmax(-1)
    del out

    def prefill():
        model(input_ids=batch, use_cache=False)

    def decode():
        model(input_ids=step, use_cache=True, **{name: cache})
        cache.crop(-1)  # back to the prefill's context for the next call

    return {"prefill": prefill, "decode": decode}


def _measure(stmt: str, env: dict, threshold: float, min_run_time: float, max_run_time: float) -> dict:
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    m = timer.adaptive_autorange(threshold=threshold, min_run_time=min_run_time, max_run_time=max_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}


def speed(model, windows: torch.Tensor, batch_size: int = 4, threshold: float = 0.05,
          min_run_time: float = 0.5, max_run_time: float = 5.0, warmup: int = 3) -> dict:
    """Prefill and per-token decode speed of `model` on the first `batch_size` windows (the cheap probe).

    windows: [n, seqlen] token ids (n ≥ batch_size). Returns {"prefill": {...}, "decode": {...}},
    each with median_s, iqr_s (seconds per call), runs and tokens_per_s (tokens / median).
    """
    batch = windows[:batch_size].to(_device(model))
    with torch.inference_mode():
        calls = _calls(model, batch)
        for _ in range(warmup):  # caches, allocator and (on CUDA) kernels settle before any timing
            calls["prefill"]()
            calls["decode"]()
        p = _measure("prefill()", {"prefill": calls["prefill"]}, threshold, min_run_time, max_run_time)
        d = _measure("decode()", {"decode": calls["decode"]}, threshold, min_run_time, max_run_time)
    p["tokens_per_s"] = batch.numel() / p["median_s"]
    d["tokens_per_s"] = batch.shape[0] / d["median_s"]
    return {"prefill": p, "decode": d, "batch_size": int(batch.shape[0]), "seqlen": int(batch.shape[1])}


# --------------------------------------------------------------------------- interleaved comparison
def round_order(arms: list[str], r: int) -> list[str]:
    """The arms' timing order in round r: the list rotated to start at arm r mod n."""
    k = r % len(arms)
    return arms[k:] + arms[:k]


def _time_block(fn, number: int) -> float:
    """Seconds per call of `fn`: the median of `number` calls, each timed on its own
    (torch.utils.benchmark's clock: perf_counter, accelerator synchronised)."""
    times = []
    for _ in range(number):
        start = benchmark.timer()
        fn()
        times.append(benchmark.timer() - start)
    return statistics.median(times)


def median_iqr(values: list[float]) -> tuple[float, float]:
    """(median, interquartile range) of `values`; IQR 0.0 for fewer than two values."""
    if len(values) < 2:
        return float(values[0]), 0.0
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q3 - q1


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(dense, pruned, windows: torch.Tensor, batch_size: int = 4, rounds: int = 8, block_s: float = 0.5,
            warmup: int = 2, threads: int | None = None, dense_again=None) -> dict:
    """Interleaved prefill and decode timings of dense, pruned model(s) and a second dense copy (design above).

    pruned: a model (named "pruned") or {name: model}; dense_again: the control's model (default: a deep
    copy of `dense`, i.e. the dense model's bytes once more in memory); windows: [n, seqlen] token ids,
    the first `batch_size` rows are timed; rounds ≥ 1; block_s: seconds a dense block should take
    (≥ 1 call per block); threads: torch threads (default: the current count).
    Returns
      "speedups": {name: {"prefill_speedup", "prefill_speedup_iqr", "decode_speedup", "decode_speedup_iqr"}}
                  medians and IQRs over rounds of dense seconds / pruned seconds;
      "prefill_dense_control", "decode_dense_control" (+ "_iqr"): the same for `dense_again`;
      "seconds": {arm: {regime: [seconds per call, one per round]}}, "order": the arms' order per round,
      "design": the settings (rounds, number per block per regime, warmup, threads, batch_size, seqlen).
    """
    pruned = {"pruned": pruned} if isinstance(pruned, torch.nn.Module) else dict(pruned)
    if {"dense", "dense_again"} & set(pruned) or rounds < 1 or not pruned:
        raise ValueError("compare: at least one pruned model, none named dense/dense_again, rounds >= 1")
    models = {"dense": dense, **pruned, "dense_again": copy.deepcopy(dense) if dense_again is None else dense_again}
    arms = list(models)
    threads = threads or torch.get_num_threads()
    seconds = {arm: {regime: [] for regime in REGIMES} for arm in arms}
    batch = windows[:batch_size]
    with _threads(threads), torch.inference_mode():
        calls = {arm: _calls(m, batch.to(_device(m))) for arm, m in models.items()}
        number = {}
        for regime in REGIMES:
            for arm in arms:
                for _ in range(warmup):
                    calls[arm][regime]()
            number[regime] = max(1, round(block_s / _time_block(calls["dense"][regime], 1)))
        order = [round_order(arms, r) for r in range(rounds)]
        for arms_r in order:
            for regime in REGIMES:
                for arm in arms_r:
                    seconds[arm][regime].append(_time_block(calls[arm][regime], number[regime]))
    out = {"speedups": {}, "seconds": seconds, "order": order,
           "design": {"rounds": rounds, "number": number, "warmup": warmup, "threads": threads,
                      "batch_size": int(batch.shape[0]), "seqlen": int(batch.shape[1]), "block_s": block_s}}
    for arm in arms[1:]:
        stats = {}
        for regime in REGIMES:
            ratios = [d / a for d, a in zip(seconds["dense"][regime], seconds[arm][regime])]
            stats[f"{regime}_speedup"], stats[f"{regime}_speedup_iqr"] = median_iqr(ratios)
        if arm == "dense_again":
            out.update({k.replace("speedup", "dense_control"): v for k, v in stats.items()})
        else:
            out["speedups"][arm] = stats
    return out
