"""suite/speed.py: timings of a stub model whose calls take known times (sleep), and the cache it must leave as found."""
from __future__ import annotations

import time
import torch

from suite.speed import compare, speed

PREFILL_S, DECODE_S = 0.02, 0.005


class Cache:
    def __init__(self, length):
        self.length = length

    def crop(self, n):
        assert n < 0
        self.length += n


class Stub(torch.nn.Module):
    """Prefill (no cache) sleeps PREFILL_S × scale, a decode step DECODE_S × scale; records cache lengths."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scale, self.seen = scale, []

    def forward(self, input_ids, use_cache=False, cache=None):
        if cache is None:
            time.sleep(PREFILL_S * self.scale)
            new = Cache(input_ids.shape[1]) if use_cache else None
        else:
            self.seen.append(cache.length)
            time.sleep(DECODE_S * self.scale)
            cache.length += input_ids.shape[1]
            new = cache
        return {"logits": torch.zeros(*input_ids.shape, 7), "cache": new}


def test_speed_times_prefill_and_decode_separately():
    model = Stub()
    windows = torch.zeros(6, 32, dtype=torch.long)
    r = speed(model, windows, batch_size=4, min_run_time=0.2, max_run_time=1.0, warmup=1)
    assert abs(r["prefill"]["median_s"] - PREFILL_S) <= 0.3 * PREFILL_S
    assert abs(r["decode"]["median_s"] - DECODE_S) <= 0.6 * DECODE_S
    assert r["prefill"]["tokens_per_s"] == 4 * 32 / r["prefill"]["median_s"]
    assert r["decode"]["tokens_per_s"] == 4 / r["decode"]["median_s"]
    assert r["prefill"]["iqr_s"] >= 0 and r["decode"]["runs"] >= 3
    assert set(model.seen) == {32}  # every decode step saw the prefill's context, no more


def test_compare_reports_speedup_and_a_dense_dense_control():
    windows = torch.zeros(4, 16, dtype=torch.long)
    r = compare(Stub(), Stub(scale=0.5), windows, min_run_time=0.2, max_run_time=1.0, warmup=1)
    assert 1.4 <= r["prefill_speedup"] <= 2.6  # half the time: 2x
    assert 0.7 <= r["prefill_dense_control"] <= 1.3
    assert r["prefill_speedup"] == ((r["dense"]["prefill"]["median_s"] + r["dense_again"]["prefill"]["median_s"]) / 2
                                    / r["pruned"]["prefill"]["median_s"])


def test_costs_table_shows_every_phase_and_the_speed_of_the_records():
    from suite.tables import costs_frame, format_costs

    def record(label, ratio, seed, load, score, prefill):
        return {"model": "m", "method": label, "label": label, "ratio_target": ratio, "seed": seed, "status": "ok",
                "cell": {"device": "cuda"}, "perplexity": {"wikitext2": 10.0},
                "phases": {"load": {"peak_mb": load, "seconds": 1.0}, "score": {"peak_mb": score, "seconds": 2.0}},
                "throughput": {"prefill_speedup": prefill, "prefill_dense_control": 1.01}}

    records = [record("dense", 0.0, 0, 100.0, None, 1.0), record("random", 0.5, 0, 100.0, 300.0, 1.5),
               record("random", 0.5, 1, 120.0, 500.0, 1.7)]
    records[0]["phases"].pop("score")
    frame = costs_frame(records)
    assert list(frame["Method"]) == ["dense", "random"]
    assert frame.loc[1, "load MB"] == 110.0 and frame.loc[1, "score MB"] == 400.0  # seeds averaged
    assert frame.loc[1, "Prefill x"] == 1.6 and frame.loc[0, "Prefill ctl"] == 1.01
    assert frame.loc[0, "score MB"] != frame.loc[0, "score MB"]  # NaN: the dense cell has no score phase
    text = format_costs(records)
    assert "score MB" in text and "400.0" in text and "1.600" in text and "cuda" in text
