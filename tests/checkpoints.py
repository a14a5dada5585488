"""Test helpers: heterogeneous pruned models, and loading a directory with PLAIN transformers in a
subprocess where this suite cannot be imported (`python -I`: no PYTHONPATH, no cwd on sys.path)."""
import os
import random
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from minillm.architectures import adapter_for
from minillm.plan import apply_plan, full_plan

PLAIN_SCRIPT = r"""
import importlib.util, sys
import torch
from safetensors.torch import load_file, save_file
assert importlib.util.find_spec("minillm") is None and importlib.util.find_spec("suite") is None
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
out = {}
for i, path in enumerate(sys.argv[3:]):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[str(i)] = model(ids).logits.contiguous()
save_file(out, sys.argv[2])
"""


def plain_transformers_logits(dirs, ids, tmp_path) -> list[torch.Tensor]:
    """Logits of each directory loaded by `AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)`."""
    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # the remote-code copy, private to this test
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_SCRIPT, str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "logits.safetensors"), *map(str, dirs)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = load_file(tmp_path / "logits.safetensors")
    return [logits[str(i)] for i in range(len(dirs))]


def heterogeneous_plan(model, seed=0, empty_attention_layer=1):
    """Every layer a different width; `empty_attention_layer` keeps no head at all (allow_empty)."""
    rng = random.Random(seed)
    plan = full_plan(model)
    plan.allow_empty = True
    adapter = adapter_for(model)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        lp.channels = sorted(rng.sample(range(nch), nch - 7 * (i + 1)))
        if i == empty_attention_layer:
            lp.heads = []
            if nkv != nq:
                lp.kv_heads = []
        elif nkv == nq:
            lp.heads = sorted(rng.sample(range(nq), nq - 1 - i % 3))
        else:  # GQA q-head mode: the same number of q heads from every kv group
            per = nq // nkv
            keep = per - 1 if i % 2 else per
            lp.heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), keep))
    return plan


def pruned_tiny(name, seed=0):
    """A tiny model sliced to `heterogeneous_plan`, with a bias on one bias-free out-projection (as FLAP adds)."""
    from suite.models import load_model

    model = load_model(name)
    plan = heterogeneous_plan(model, seed)
    apply_plan(model, plan)
    adapter = adapter_for(model)
    down = adapter.layers(model)[0].get_submodule(adapter.channel_members[-1][0])
    if down.bias is None:
        down.bias = torch.nn.Parameter(torch.randn(down.out_features, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model, plan
