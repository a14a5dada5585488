"""CLI end to end: info, prune (random), and bad input = one line on stderr, exit 2, nothing written."""
import json
import os
import subprocess
import sys

import pytest

from suite.models import load_model


def run_cli(*args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "suite", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def test_info_matches_config():
    proc = run_cli("info", "--model", "tiny-llama-gqa", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = load_model("tiny-llama-gqa").config
    assert info["layers"] == cfg.num_hidden_layers and info["heads"] == cfg.num_attention_heads
    assert info["kv_heads"] == cfg.num_key_value_heads and info["intermediate_size"] == cfg.intermediate_size
    assert info["head_dim"] == cfg.hidden_size // cfg.num_attention_heads
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * info["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # attention, MLP, two RMSNorms
    assert info["parameters"] == cfg.num_hidden_layers * per_layer + 2 * v * h + h


def test_prune_random_end_to_end(tmp_path):
    out = tmp_path / "pruned"
    proc = run_cli("prune", "--model", "tiny-opt", "--method", "random", "--ratio", "0.3", "--seed", "3",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "pruning.json").read_text())
    model = load_model(str(out))
    assert sum(p.numel() for p in model.parameters()) == record["params"]["pruned"]
    assert abs(record["ratio_achieved"] - 0.3) <= 0.01
    assert record["provenance"]["seed"] == 3 and "git_commit" in record["provenance"]
    assert record["phases"]["score"]["peak_mb"] > 0
    # same seed -> same plan
    again = tmp_path / "again"
    assert run_cli("prune", "--model", "tiny-opt", "--method", "random", "--ratio", "0.3", "--seed", "3",
                   "--out", str(again)).returncode == 0
    assert (again / "plan.json").read_text() == (out / "plan.json").read_text()


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0).save_pretrained(d)
    return d


@pytest.mark.parametrize("case", ["unknown model", "unsupported architecture", "ratio 0", "ratio 1.5",
                                  "missing mirror file", "unknown method", "bad option"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, gpt2_dir, case):
    out = tmp_path / "out"
    args = {"model": "tiny-llama", "method": "random", "ratio": "0.2"}
    env = None
    extra = []
    if case == "unknown model":
        args["model"] = "no-such-model"
    elif case == "unsupported architecture":
        args["model"] = str(gpt2_dir)
    elif case == "ratio 0":
        args["ratio"] = "0"
    elif case == "ratio 1.5":
        args["ratio"] = "1.5"
    elif case == "missing mirror file":
        env = {"MINILLM_DATA": str(tmp_path / "empty-mirror")}
        extra = ["--ppl", "wikitext2"]
    elif case == "unknown method":
        args["method"] = "sparsegpt-2"
    elif case == "bad option":
        extra = ["--opt", "nonsense=1"]
    proc = run_cli("prune", "--model", args["model"], "--method", args["method"], "--ratio", args["ratio"],
                   "--out", str(out), *extra, env=env)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "missing mirror file":
        assert str(tmp_path / "empty-mirror") in lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())
