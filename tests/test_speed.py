"""suite/speed.py: the cheap probe on a stub whose calls take known times (sleep); the interleaved comparison with a
stubbed clock (known times per arm and round): its ratios, order, warm-up and control copy; the cell's record."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from suite.speed import REGIMES, compare, speed
from tests.cli_output import one_line_error

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
        if not isinstance(cache, Cache):  # none, or the empty cache the probe hands its prefill
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
    # a sleep never ends early; on busy shared cores it may end late (27.7 ms for 20 ms seen at load 14)
    assert PREFILL_S <= r["prefill"]["median_s"] <= 3 * PREFILL_S
    assert DECODE_S <= r["decode"]["median_s"] <= 5 * DECODE_S
    assert r["prefill"]["tokens_per_s"] == 4 * 32 / r["prefill"]["median_s"]
    assert r["decode"]["tokens_per_s"] == 4 / r["decode"]["median_s"]
    assert r["prefill"]["iqr_s"] >= 0 and r["decode"]["runs"] >= 3
    assert set(model.seen) == {32}  # every decode step saw the prefill's context, no more


LOG = []  # module level, so that a deep copy of a Logged model logs here too


class Logged(torch.nn.Module):
    """Instant stand-in for a model: logs (its id, regime) to LOG on every call; keeps a cache like Stub's."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.seen = []

    def forward(self, input_ids, use_cache=False, cache=None):
        if not isinstance(cache, Cache):  # none, or the empty cache the probe hands its prefill
            LOG.append((id(self), "prefill"))
            return {"logits": torch.zeros(*input_ids.shape, 7), "cache": Cache(input_ids.shape[1]) if use_cache else None}
        LOG.append((id(self), "decode"))
        self.seen.append(cache.length)
        cache.length += input_ids.shape[1]
        return {"logits": torch.zeros(*input_ids.shape, 7), "cache": cache}


SIZING = {"prefill": 0.3, "decode": 0.07}  # what the block-sizing call "takes": number = round(block_s / this)


@pytest.fixture
def stubbed(monkeypatch):
    """Three Logged models (dense, two pruned), and a fake `_time_block` that runs the block's callable once,
    finds out from the log which model and regime it called, and returns a known time: per (arm, regime)
    a seeded random list, one value per round; the dense arm's first call per regime is the sizing call."""
    import suite.speed

    LOG.clear()
    log = LOG
    models = {"dense": Logged(), "p1": Logged(), "p2": Logged()}
    rng = np.random.default_rng(0)
    rounds = 6
    known = {arm: {reg: list(rng.uniform(0.5, 1.5, rounds) * (0.6 if arm == "p2" else 1.0)) for reg in REGIMES}
             for arm in ("dense", "p1", "p2", "dense_again")}
    timed = []  # (arm, regime, number) in timing order
    served = {}  # (arm, regime) -> round values returned so far

    def fake(fn, number):
        before = len(log)
        fn()
        who, regime = log[before]
        arm = next((a for a, m in models.items() if id(m) == who), "dense_again")
        sizing = arm == "dense" and not any(t[:2] == ("dense", regime) for t in timed)
        timed.append((arm, regime, number))
        if sizing:
            return SIZING[regime]
        k = served[arm, regime] = served.get((arm, regime), -1) + 1
        return known[arm][regime][k]

    monkeypatch.setattr(suite.speed, "_time_block", fake)
    return models, known, timed, log, rounds


def test_compare_speedups_and_control_are_medians_of_per_round_ratios(stubbed):
    models, known, timed, log, rounds = stubbed
    windows = torch.zeros(5, 16, dtype=torch.long)
    r = compare(models["dense"], {"p1": models["p1"], "p2": models["p2"]}, windows, batch_size=2, rounds=rounds,
                block_s=1.0, warmup=2)
    for arm in ("p1", "p2", "dense_again"):
        got = r["speedups"][arm] if arm != "dense_again" else {k.replace("dense_control", "speedup"): v
                                                               for k, v in r.items() if "dense_control" in k}
        for regime in REGIMES:
            ratios = np.array(known["dense"][regime]) / np.array(known[arm][regime])  # speed(arm) / speed(dense)
            assert got[f"{regime}_speedup"] == pytest.approx(np.median(ratios), rel=1e-12)
            iqr = np.percentile(ratios, 75) - np.percentile(ratios, 25)
            assert got[f"{regime}_speedup_iqr"] == pytest.approx(iqr, rel=1e-12)
            assert r["seconds"][arm][regime] == pytest.approx(known[arm][regime])
    assert r["design"]["number"] == {"prefill": round(1.0 / 0.3), "decode": round(1.0 / 0.07)}
    assert r["design"]["batch_size"] == 2 and r["design"]["seqlen"] == 16 and r["design"]["rounds"] == rounds


def test_compare_warms_up_then_interleaves_rotated_rounds(stubbed):
    models, known, timed, log, rounds = stubbed
    ids = {id(m): arm for arm, m in models.items()}
    windows = torch.zeros(2, 8, dtype=torch.long)
    r = compare(models["dense"], {"p1": models["p1"], "p2": models["p2"]}, windows, rounds=rounds, warmup=3)
    arms = ["dense", "p1", "p2", "dense_again"]
    expected = [("dense", "prefill"), ("dense", "decode")]  # sizing, after the warm-up
    for k in range(rounds):
        order = arms[k % 4:] + arms[:k % 4]
        assert r["order"][k] == order
        expected += [(arm, regime) for regime in REGIMES for arm in order]
    assert [t[:2] for t in timed] == expected
    assert all(t[2] == r["design"]["number"][t[1]] for t in timed[2:])
    for arm in arms:  # over 4 rounds every arm held every position once
        assert sorted(o.index(arm) for o in r["order"][:4]) == [0, 1, 2, 3]
    # every model call in order: 1 cache-building prefill per model, then per regime 3 untimed warm-up calls
    # per model and the dense model's sizing call, then the rounds (the fake calls each block's callable once)
    calls = [(ids.get(who, "dense_again"), reg) for who, reg in log]
    warm = [(arm, "prefill") for arm in arms]
    for regime in REGIMES:
        warm += [(arm, regime) for arm in arms for _ in range(3)] + [("dense", regime)]
    assert calls == warm + expected[2:]
    # the control is a copy with its own storage, every decode call saw the prefill's context only
    assert not any(who == id(models["dense"]) for who, _ in log if ids.get(who) is None)
    assert set(models["p1"].seen) == {8}


def test_compare_control_is_a_separate_copy_of_the_dense_weights(monkeypatch):
    import suite.speed

    seen = []
    monkeypatch.setattr(suite.speed, "_calls", lambda m, batch: seen.append(m) or {r: (lambda: None) for r in REGIMES})
    monkeypatch.setattr(suite.speed, "_time_block", lambda fn, number: 0.1)
    dense, pruned = Stub(), Stub()
    r = compare(dense, pruned, torch.zeros(1, 4, dtype=torch.long), rounds=2)
    assert seen[0] is dense and seen[1] is pruned and seen[2] is not dense
    assert seen[2].w.data_ptr() != dense.w.data_ptr() and torch.equal(seen[2].w, dense.w)
    assert r["prefill_dense_control"] == 1.0 and r["speedups"]["pruned"]["decode_speedup"] == 1.0


def test_speed_record_of_the_cheap_cell_probe():
    from suite.pipeline import speed_record

    def timing(prefill, decode):
        return {"prefill": {"median_s": prefill, "iqr_s": 0.01, "runs": 3, "tokens_per_s": 4 * 16 / prefill},
                "decode": {"median_s": decode, "iqr_s": 0.001, "runs": 9, "tokens_per_s": 4 / decode},
                "batch_size": 4, "seqlen": 16}

    dense = [timing(0.50, 0.040), timing(0.40, 0.050)]
    pruned = timing(0.30, 0.030)
    rec = speed_record(dense, pruned)
    assert rec["prefill_speedup"] == round(0.45 / 0.30, 4) and rec["decode_speedup"] == round(0.045 / 0.030, 4)
    assert rec["prefill_dense_control"] == round(0.40 / 0.50, 4) and rec["decode_dense_control"] == round(0.050 / 0.040, 4)
    assert rec["pruned_tokens_per_s"] == 64 / 0.30 and rec["dense_tokens_per_s"] == pytest.approx(64 / 0.45)
    assert rec["interleaved"] is False and "indicative" in rec["probe"] and "bench-speed" in rec["probe"]
    assert rec["timings"] == {"dense": dense[0], "dense_again": dense[1], "pruned": pruned}


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


def test_bench_speed_command_writes_every_run(tmp_path, monkeypatch, capsys):
    """`suite bench-speed` on tiny-llama and a random-pruned copy, the clock stubbed (1 call, a fixed time per
    regime): one comparison per run, printed and written with the design and provenance; bad input exits 2."""
    import json

    import suite.speed
    from suite.cli import main

    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llama", "--method", "random", "--ratio", "0.3", "--out", str(pruned),
                 "--quiet"]) == 0
    monkeypatch.setattr(suite.speed, "_time_block", lambda fn, number: fn() or 0.25)
    capsys.readouterr()
    out = tmp_path / "speed.json"
    assert main(["bench-speed", "--model", "tiny-llama", "--pruned", str(pruned), "--runs", "2", "--rounds", "3",
                 "--threads", "1", "--batch-size", "2", "--seqlen", "16", "--json", str(out), "--quiet"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(pruned)[-32:])]
    assert len(printed) == 2 and printed[0].split()[1:] == ["0", "1.000", "(0.000)"] * 1 + ["1.000", "(0.000)"] * 3
    data = json.loads(out.read_text())
    assert data["kind"] == "bench-speed" and data["pruned"] == [str(pruned)] and len(data["runs"]) == 2
    run = data["runs"][0]
    assert run["design"] == {"rounds": 3, "number": {"prefill": 2, "decode": 2}, "warmup": 2, "threads": 1,
                             "batch_size": 2, "seqlen": 16, "block_s": 0.5}
    assert set(run["seconds"]) == {"dense", str(pruned), "dense_again"} and len(run["order"]) == 3
    assert run["speedups"][str(pruned)]["decode_speedup"] == 1.0 and run["prefill_dense_control"] == 1.0
    assert data["config"]["rounds"] == 3 and "git_commit" in data["provenance"]
    assert main(["bench-speed", "--model", "tiny-llama", "--pruned", str(pruned), "--rounds", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --runs, --rounds")


def test_recorded_tokens_per_s_are_tokens_over_the_timers_own_measurement(monkeypatch):
    """The cell's tokens/s (suite/speed.py `speed`, the record's `throughput`) are the timed batch's token
    count over the median seconds of torch.utils.benchmark's own Measurement: the Measurements are caught as
    the Timer returns them and their median recomputed from their raw block times (numpy)."""
    from torch.utils import benchmark

    from suite.pipeline import speed_record

    caught = []
    original = benchmark.Timer.adaptive_autorange

    def spy(self, *args, **kwargs):
        caught.append(original(self, *args, **kwargs))
        return caught[-1]

    monkeypatch.setattr(benchmark.Timer, "adaptive_autorange", spy)
    windows = torch.zeros(6, 24, dtype=torch.long)
    runs = [speed(Stub(scale), windows, batch_size=3, min_run_time=0.1, max_run_time=0.5, warmup=1)
            for scale in (1.0, 1.0, 0.5)]
    assert len(caught) == 6  # prefill, decode per run
    for r, (prefill, decode) in zip(runs, zip(caught[::2], caught[1::2])):
        for regime, m, tokens in (("prefill", prefill, 3 * 24), ("decode", decode, 3)):
            per_call = np.array(m.raw_times) / m.number_per_run  # seconds per call of each timed block
            assert r[regime]["tokens_per_s"] == pytest.approx(tokens / np.median(per_call), rel=1e-12)
            assert r[regime]["runs"] == len(m.raw_times) * m.number_per_run
    record = speed_record(runs[:2], runs[2])
    assert record["pruned_tokens_per_s"] == pytest.approx(72 / np.median(np.array(caught[4].raw_times)
                                                                         / caught[4].number_per_run), rel=1e-12)
    dense_s = [np.median(np.array(m.raw_times) / m.number_per_run) for m in (caught[0], caught[2])]
    assert record["dense_tokens_per_s"] == pytest.approx(72 / np.mean(dense_s), rel=1e-12)


def test_bench_speed_refuses_a_model_pruned_from_another_base(tmp_path, capsys, monkeypatch):
    import torch

    from suite import speed
    from suite.cli import main
    from suite.models import _tiny_model, byte_tokenizer

    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--ratio", "0.3", "--out", str(pruned),
                 "--quiet"]) == 0
    twin = tmp_path / "twin"  # tiny-llama's shapes and weights, but one embedding row changed
    model = _tiny_model("tiny-llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[7] += 1.0
    model.save_pretrained(twin)
    byte_tokenizer().save_pretrained(twin)
    capsys.readouterr()

    class Timed(Exception):
        pass

    def timed(*a, **k):
        raise Timed

    monkeypatch.setattr(speed, "compare", timed)
    args = ["--pruned", str(pruned), "--runs", "1", "--rounds", "1", "--seqlen", "8", "--batch-size", "1"]
    for dense, why in (("tiny-opt", "its dense model_type is llama, the dense model's opt"),
                       (str(twin), "its input embeddings differ from the dense model's")):
        assert main(["bench-speed", "--model", dense, *args]) == 2
        err = one_line_error(capsys)
        assert f"--pruned {pruned} was not pruned from --model {dense}: {why}" in err
        assert "(pruning.json names tiny-llama)" in err
    with pytest.raises(Timed):  # the model it was pruned from: accepted, timing starts
        main(["bench-speed", "--model", "tiny-llama", *args])


def test_bench_speed_times_a_depth_pruned_directory_against_its_dense_model(tmp_path, monkeypatch, capsys):
    """A shortgpt directory (fewer layers, an ordinary checkpoint) is recognised as pruned from its dense
    model by its plan's layer count, and timed; a dense model of another depth is refused."""
    import suite.speed
    from suite.cli import main
    from suite.commands.bench_speed import base_mismatch
    from suite.models import load_model

    pruned = tmp_path / "shortgpt"
    assert main(["prune", "--model", "tiny-llama", "--method", "shortgpt", "--ratio", "0.45", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(pruned), "--quiet"]) == 0
    loaded = load_model(str(pruned))
    assert loaded.config.num_hidden_layers == 2 and base_mismatch(load_model("tiny-llama"), loaded) is None
    shallow = load_model("tiny-llama")
    shallow.config.num_hidden_layers = 3
    assert "num_hidden_layers is 4, the dense model's 3" in base_mismatch(shallow, loaded)
    monkeypatch.setattr(suite.speed, "_time_block", lambda fn, number: fn() or 0.25)
    capsys.readouterr()
    assert main(["bench-speed", "--model", "tiny-llama", "--pruned", str(pruned), "--runs", "1", "--rounds", "2",
                 "--threads", "1", "--batch-size", "1", "--seqlen", "16", "--quiet"]) == 0
    assert any(line.startswith(str(pruned)[-32:]) for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma2", "tiny-mistral"])
def test_decode_probe_runs_past_a_sliding_window_and_matches_uncached_logits(name):
    """The probe's decode step on a family with sliding-window layers, its context (48 tokens) past the
    window (16): it runs again and again (the cache is cut back to the prefill each time), and the
    step's logits equal the uncached model's at the same position."""
    import torch

    from suite.models import load_model
    from suite.speed import _calls

    model = load_model(name).eval()
    assert model.config.sliding_window and model.config.sliding_window < 48
    batch = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        calls = _calls(model, batch)
        for _ in range(3):
            calls["decode"]()
        step = model(input_ids=batch).logits[:, -1:].argmax(-1)
        want = model(input_ids=torch.cat([batch, step], 1)).logits[:, -1]
        seen = {}
        handle = model.register_forward_hook(lambda m, a, out: seen.setdefault("logits", out.logits[:, -1]))
        try:
            calls["decode"]()
        finally:
            handle.remove()
    assert float((seen["logits"] - want).abs().max() / want.abs().max()) <= 1e-5
