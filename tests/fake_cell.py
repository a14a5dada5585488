"""A stand-in for `suite.pipeline.run_cell` in the runner's tests: `MINILLM_CELL_FN=fake_cell:run_cell`.

Sleeps FAKE_CELL_SLEEP seconds (default 0.5) so a test can kill a grid mid-cell, fails for the model
named "broken", and otherwise returns a record that depends only on the cell (and, for the
concurrency test, when it slept and its OMP_NUM_THREADS).
"""
from __future__ import annotations

import os
import time


def run_cell(cell: dict) -> dict:
    started = time.time()
    time.sleep(float(os.environ.get("FAKE_CELL_SLEEP", "0.5")))
    if cell["model"] == "broken":
        raise RuntimeError(f"fake failure for {cell['label']}")
    ratio = cell["ratio"]
    dense = 1_000_000
    return {
        "model": cell["model"], "method": cell["method"], "label": cell["label"], "seed": cell["seed"],
        "ratio_target": ratio, "ratio_achieved": ratio,
        "params": {"dense": dense, "pruned": int(dense * (1 - ratio))},
        "phases": {"score": {"seconds": 0.1, "peak_mb": 10.0 + 100 * ratio}} if ratio else {},
        "perplexity": {"wikitext2": 10.0 / (1.0 - ratio) + len(cell["label"])},
        "zero_shot": {"piqa": {"acc": 0.6 - ratio / 2}},
        "zero_shot_mean": 0.6 - ratio / 2,
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or None,  # as the pipeline reports it
        "fake_interval": [started, time.time()],
        "fake_cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
