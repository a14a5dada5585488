"""The memory model (`suite run CONFIG --dry-run`, suite/memory_model.py): its formulas recomputed here
by hand from a tiny config's own numbers, its shapes against a real model, the CLI (no weight read,
fit marks, bad sizes, unknown shapes, --compare)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from suite import memory_model as mm
from suite.config import expand_cells, validate
from suite.models import count_parameters, load_model
from tests.grids import write_grid

ROOT = Path(__file__).resolve().parents[1]

MiB, GiB = 2 ** 20, 2 ** 30


def cells_of(models, methods, device="cuda", dtype="float16", nsamples=8, seqlen=32, **extra):
    config = {"name": "mem", "models": models, "methods": methods, "ratios": [0.25], "device": device,
              "dtype": dtype, "calibration": {"apply_to": "all", "nsamples": nsamples, "seqlen": seqlen},
              "evaluation": {"perplexity": ["wikitext2"], "seqlen": 64, "tasks": [], "throughput": True}, **extra}
    return expand_cells(validate(config))


def by_method(cells):
    return {c["label"]: c for c in cells}


# tiny-llama's config (suite/models.py _tiny_config), written out again: LLaMA MHA, untied head
V, H, I, L, A, KV, HD = 512, 256, 688, 4, 8, 8, 32
PARAMS = 2 * V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H  # embed + head, q/k/v/o, gate/up/down, 2 norms; final norm


def per_token(terms, seqlen):
    return terms["h"] * H + terms["i"] * I + terms["s"] * A * seqlen


def test_shapes_equal_the_real_model():
    s = mm.shapes("tiny-llama")
    model = load_model("tiny-llama")
    assert s.params == PARAMS == count_parameters(model)
    layer = model.model.layers[0]
    assert s.layer_params == sum(p.numel() for p in layer.parameters())
    assert s.largest_matrix == max(m.weight.numel() for m in layer.modules() if hasattr(m, "in_features"))
    assert (s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, s.vocab) == (L, H, I, A, KV, HD, V)
    gqa = mm.shapes("tiny-llama-gqa")
    assert gqa.kv_heads == 2 and gqa.params == count_parameters(load_model("tiny-llama-gqa"))


def test_cuda_formulas_recomputed_by_hand():
    """Every phase of a CUDA fp16 cell on tiny-llama, from the numbers above and the constants table."""
    k = mm.CONSTANTS
    B, N, S, ES = 2, 8, 32, 64                     # fp16 bytes, calibration windows x tokens, evaluation seqlen
    W, W_pruned = PARAMS * B, round(PARAMS * 0.75) * B
    largest = I * H
    cells = by_method(cells_of(["tiny-llama"], ["wanda-sp", "flap", "magnitude", "llm-pruner", "slicegpt",
                                                {"name": "minillm", "options": {"batch_size": 2}},
                                                {"name": "minillm", "label": "mb",
                                                 "options": {"gradient": "backprop"}},
                                                {"name": "bonsai", "options": {"bsz": 2, "mask_batch": 4}}],
                               recovery={"micro_batch_size": 2, "cutoff_len": 16}))
    fwd = lambda tokens, seq: tokens * per_token(k["layer_fwd"], seq) * B
    stats = lambda tokens: k["stats_fp64_copies"] * tokens * I * 8
    layer_pass = lambda b, streams=1: (streams + 1) * N * S * H * B + fwd(b * S, S) + stats(b * S)
    saved = lambda b, seq: L * b * seq * per_token(k["backprop_saved"], seq) * B
    chunk = lambda tokens: 3 * 4 * min(k["loss_chunk_elements"], tokens * V)

    p = mm.predict(cells["wanda-sp"])
    assert p["load"] == W and p["calibrate"] == W + N * S * 8
    # wanda-sp: sequential (slices inside score: the largest matrix's new copy; 3 streams alive)
    assert p["score"] == W + largest * B + layer_pass(1, streams=2)
    flap = mm.predict(cells["flap"])
    assert flap["score"] == W + layer_pass(1) and flap["prune"] == W + largest * B
    assert mm.predict(cells["magnitude"])["score"] == W + 2 * largest * 8
    # slicegpt: the untied head's copy, a LayerPass, two [H, H] float64 matrices, a float64 rotation
    # of the largest matrix; transformed inside score, so its prune phase holds the pruned weights
    sg = mm.predict(cells["slicegpt"])
    assert sg["score"] == W + V * H * B + layer_pass(1) + 2 * H * H * 8 + 2 * largest * 8
    assert sg["prune"] == W_pruned
    assert "calibrate" not in mm.predict(cells["magnitude"])
    assert p["prune"] == W_pruned
    ppl_tokens = k["perplexity_batch"] * ES
    assert p["evaluate"] == W_pruned + (k["logit_copies_eval"] * 4 + B) * ppl_tokens * V + fwd(ppl_tokens, ES)
    speed_tokens = k["speed_batch"] * ES
    assert p["throughput"] == W + speed_tokens * V * B + fwd(speed_tokens, ES) + 2 * L * speed_tokens * KV * HD * B
    r = 2 * 16  # recovery micro-batch x cutoff
    assert p["recover"] == W_pruned + saved(2, 16) + (k["logit_copies_backprop"] * 4 + B) * r * V
    # llm-pruner: .grad per parameter + backprop of its micro-batch (all 8 windows, full logits, on
    # this branch; bounded backprop when the method chooses its own)
    from suite.methods import get_method

    lp = mm.predict(cells["llm-pruner"])["score"]
    if getattr(get_method("llm-pruner"), "auto_batch_size", None) is None:
        # one micro-batch: backward starts with every activation alive and the head's gradient only
        activations = saved(N, S) + (k["logit_copies_backprop"] * 4 + B) * N * S * V
        assert lp == W + max(activations + V * H * B, W) + 2 * largest * 8
    else:
        assert lp > 2 * W + 2 * largest * 8
    # two micro-batches of 4: the second's activations next to every gradient
    assert mm.predict(cells["mb"])["score"] == 2 * W + saved(4, S) + chunk(4 * S) + 2 * largest * 8
    streams = 2 * 16 + 1 if k["minillm_layerwise"] else 1
    zo = max(layer_pass(2, streams), fwd(2 * S, S) + chunk(2 * S))
    assert mm.predict(cells["minillm"])["score"] == W + zo + 3 * largest * 4
    # bonsai: slices in its rounds; the prior's pass, then 4 + 1 streams of masked evaluations with a gate copy
    gate = 2 * S * I * 4
    bonsai = mm.predict(cells["bonsai"])
    assert bonsai["score"] == W + largest * B + max(layer_pass(2), layer_pass(2, 5) + gate, fwd(2 * S, S) + chunk(2 * S) + gate)
    assert bonsai["prune"] == W_pruned


def test_cpu_adds_the_baseline_and_mapped_weights(tmp_path):
    """CPU: every phase + the interpreter baseline; a checkpoint in its stored dtype is mapped (no
    weights at load; the dense pages stay beside the sliced copy after pruning)."""
    model = load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    base = mm.CONSTANTS["cpu_baseline_mb"] * MiB
    W = PARAMS * 4
    kept_layers = (PARAMS - 2 * V * H) * 4 - (W - round(PARAMS * 0.75) * 4)
    mapped = mm.predict(cells_of([str(tmp_path)], ["flap"], device="cpu", dtype="float32")[-1])
    # the LayerPass's streams of 8 x 32 tokens (32 KiB tensors: from the heap, which keeps its high-water)
    residue = mm.CONSTANTS["cpu_heap_streams"] * 8 * 32 * H * 4
    unread = 2 * V * H * 4  # embedding and untied head pages: no LayerPass reads them
    assert mapped["load"] == base and mapped["prune"] == base + W - unread + kept_layers + residue
    assert mapped["evaluate"] - mapped["prune"] == unread + (2 * 4 * 4 * 64 * V) + 4 * 64 * per_token(
        mm.CONSTANTS["layer_fwd"], 64) * 4  # evaluation reads the head: 4 windows of 64 tokens, fp32 logits x2
    built = mm.predict(cells_of(["tiny-llama"], ["wanda-sp"], device="cpu", dtype="bfloat16")[-1])
    assert built["load"] == base + PARAMS * 4 + PARAMS * 2  # built in fp32, then cast
    cuda = mm.predict(cells_of(["tiny-llama"], ["wanda-sp"], device="cuda", dtype="bfloat16")[-1])
    heap = (mm.CONSTANTS["cpu_heap_streams"] - 3) * 8 * 32 * H * 2  # CPU heap: more streams than the 3 alive
    assert built["score"] - base == cuda["score"] + heap


def test_parse_size():
    assert mm.parse_size("24GiB") == 24 * GiB and mm.parse_size("24GB") == 24 * 10 ** 9  # accelerate's units
    assert mm.parse_size("512MiB") == 512 * MiB and mm.parse_size("1000") == 1000
    for bad in ("24XB", "", "-3GB", "0GB", "GB", "2x"):
        with pytest.raises(mm.UserError):
            mm.parse_size(bad)


def write_config(tmp_path, models, **extra) -> str:
    path = tmp_path / "grid.yaml"
    config = {"name": "mem", "models": models, "methods": ["wanda-sp", "llm-pruner"], "ratios": [0.2],
              "calibration": {"apply_to": "all", "nsamples": 4, "seqlen": 32}, "device": "cpu",
              "evaluation": {"perplexity": ["wikitext2"], "tasks": [], "throughput": False}, **extra}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_dry_run_reads_no_weight_and_marks_misfits(tmp_path, capsys):
    from suite.cli import main

    model_dir = tmp_path / "model"
    load_model("tiny-llama-gqa").save_pretrained(model_dir)
    for weights in model_dir.glob("*.safetensors"):
        weights.write_bytes(b"not a weight file")  # any read of the weights would fail
    config = write_config(tmp_path, [str(model_dir)])
    assert main(["run", config, "--dry-run", "--device-memory", "1MB"]) == 0
    out = capsys.readouterr().out
    assert out.count("| will not fit |") == 3 and "3 cells; 3 will not fit in 1MB" in out  # dense, wanda-sp, llm-pruner
    assert main(["run", config, "--dry-run", "--device-memory", "1000GB"]) == 0
    assert "will not fit |" not in capsys.readouterr().out
    assert not list(tmp_path.glob("*.jsonl")) and not (tmp_path / "results").exists()
    with pytest.raises(Exception):
        load_model(str(model_dir))  # control: the weights really are unreadable


def _suite(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "suite", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def test_bad_size_and_stray_flags_are_one_line(tmp_path):
    config = write_config(tmp_path, ["tiny-llama"])
    for args in (["--dry-run", "--device-memory", "24XB"], ["--device-memory", "24GB"],
                 ["--dry-run", "--compare", str(tmp_path / "missing.jsonl")]):
        proc = _suite(["run", config, *args], tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and not proc.stdout


def test_unknown_shapes_is_a_row_not_a_crash(tmp_path, monkeypatch, capsys):
    from suite.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", write_config(tmp_path, ["nobody/no-such-model", "tiny-opt"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| nobody/")]
    assert len(rows) == 3 and all("shapes unknown" in r for r in rows)
    assert "6 cells; 0 will not fit; 3 of unknown shapes" in out


def test_compare_prints_the_error_per_phase(tmp_path, capsys):
    from suite.cli import main
    from suite.records import cell_key

    config = write_config(tmp_path, ["tiny-llama"])
    from suite.config import load_config

    cells = expand_cells(load_config(config))
    records = []
    for cell, factor in zip(cells, (0.5, 1.25, 1.0)):  # measured = predicted / factor
        peaks = mm.predict(cell)
        records.append({"cell_key": cell_key(cell), "phases": {p: {"peak_mb": v / MiB / factor}
                                                             for p, v in peaks.items() if p != "throughput"}})
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["run", config, "--dry-run", "--compare", str(results)]) == 0
    out = capsys.readouterr().out
    assert "largest |error|: 50.0 %" in out
    assert "| -50.0 " in out and "| +25.0 " in out and "| +0.0 " in out


def test_offload_caps_the_weights_on_the_device():
    """A cell with `offload` and `device_memory` (the grid keys of --offload): the cap plus one layer
    materialised, instead of W; without a cap all of W."""
    cell = cells_of(["tiny-llama"], ["flap"])[-1]
    layer = (4 * H * H + 3 * H * I + 2 * H) * 2
    full = mm.predict(cell)
    capped = mm.predict({**cell, "offload": "disk", "device_memory": "1MB"})
    assert capped["load"] == 10 ** 6 + layer
    assert full["score"] - capped["score"] == PARAMS * 2 - (10 ** 6 + layer)
    assert mm.predict({**cell, "offload": "disk"})["load"] == full["load"] == PARAMS * 2


@pytest.mark.slow
def test_embedded_model_before_its_conversion_reads_the_gguf_metadata_only(tmp_path, monkeypatch):
    """No cache yet: the shapes come from the GGUF header (no conversion, no cache written) and equal
    those of the converted model's config."""
    converted = mm.shapes("smollm2-135m")
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    fresh = mm.shapes("smollm2-135m")
    assert fresh == converted and fresh.params == 134515008 and fresh.stored_dtype == "float32"
    assert not (tmp_path / "cache").exists()


def test_compare_warns_when_the_records_come_from_another_commit(tmp_path, capsys):
    from suite import memory_model as mm
    from suite.cli import main
    from suite.config import expand_cells, load_config
    from suite.records import cell_key

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if len(head) != 40:
        pytest.skip("not a git checkout: the code has no commit to compare with")
    config = write_grid(tmp_path)
    cells = expand_cells(load_config(config))  # dense and wanda-sp

    def results(*commits):
        path = tmp_path / "r.jsonl"
        path.write_text("".join(json.dumps({
            "cell_key": cell_key(cell), "provenance": {"git_commit": commit},
            "phases": {"load": {"peak_mb": mm.predict(cell)["load"] / 2 ** 20}}}) + "\n"
            for cell, commit in zip(cells, commits)))
        return str(path)

    old = "0123456789ab" * 3 + "0123"
    assert main(["run", config, "--dry-run", "--compare", results(old, head)]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "warning" in line.lower()] == [
        f"warning: {tmp_path / 'r.jsonl'}: 1 of 2 compared records come from commit {old[:12]} (1), not the "
        f"current code's {head[:12]}: measured peaks of older code may differ from what these formulas model"]
    assert "largest |error|: 0.0 %" in out
    assert main(["run", config, "--dry-run", "--compare", results(head, head)]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_an_unreachable_hub_id_keeps_its_shapes_unknown_row(tmp_path, capsys, monkeypatch):
    from suite.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", write_grid(tmp_path, models=["nobody/no-such-model"], methods=["magnitude"]),
                 "--dry-run"]) == 0
    assert capsys.readouterr().out.count("shapes unknown") == 2  # dense and magnitude
