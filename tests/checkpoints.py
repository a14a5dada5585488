"""Test helpers: heterogeneous pruned models, and loading a directory with PLAIN transformers in a
subprocess where this suite cannot be imported (`python -I`: no PYTHONPATH, no cwd on sys.path; and
`HIDE_SUITE`, since tox installs the suite into its environment)."""
import os
import random
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from suite.pruning.architectures import adapter_for
from suite.pruning.plan import apply_plan, full_plan

# Prelude of a subprocess that must run without this suite: its packages raise on import even where
# the environment has the suite installed (tox's editable install), and the script checks they do.
HIDE_SUITE = r"""
import importlib, importlib.abc, sys
SUITE_PACKAGES = ("suite", "minillm", "baselines")
class _HideSuite(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SUITE_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (a process without the suite)")
sys.meta_path.insert(0, _HideSuite())
for _name in SUITE_PACKAGES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{_name} is importable")
"""

PLAIN_SCRIPT = HIDE_SUITE + r"""
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
remote = {"remote": {"trust_remote_code": True}, "plain": {}}[sys.argv[3]]
out = {}
for i, path in enumerate(sys.argv[4:]):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **remote).eval()
    with torch.no_grad():
        out[str(i)] = model(ids).logits.contiguous()
save_file(out, sys.argv[2])
"""


def plain_transformers_logits(dirs, ids, tmp_path, remote_code: bool = True) -> list[torch.Tensor]:
    """Logits of each directory loaded by `AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)`
    (`remote_code=False`: without trust_remote_code, an ordinary checkpoint)."""
    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # the remote-code copy, private to this test
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_SCRIPT, str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "logits.safetensors"), "remote" if remote_code else "plain",
                           *map(str, dirs)],
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
