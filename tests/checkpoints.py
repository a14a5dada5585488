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

FAMILIES = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"]
KV_GROUPED = ["tiny-mistral", "tiny-qwen2", "tiny-gemma2", "tiny-phi3"]  # >= 2 kv heads: kv-group applies
FAMILY_CASES = [(n, "q-head") for n in FAMILIES] + [(n, "kv-group") for n in KV_GROUPED]
EMPTY_ATTENTION = {"q-head": 1, "kv-group": 0}  # the layer left without attention, per head mode
EMPTY_MLP = 2  # the layer left without MLP
GENERATED = 8  # new tokens: 20 + 8 > the tiny configs' 16-token sliding windows


def family_ids(seed=0):
    """[2, 20] token ids of the byte tokenizer (3..258)."""
    return torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(seed))


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
generate = int(sys.argv[3])
remote = {"remote": {"trust_remote_code": True}, "plain": {}}[sys.argv[4]]
out = {}
for i, path in enumerate(sys.argv[5:]):
    path, _, adapter = path.partition("+")  # BASE+ADAPTER: PEFT's adapter on the plain base
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **remote).eval()
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out[str(i)] = model(input_ids=ids).logits.contiguous()
        for cache in ((True, False) if generate else ()):  # greedy, exactly `generate` new tokens
            out[f"{i}.cache{int(cache)}"] = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=generate,
                min_new_tokens=generate, do_sample=False, use_cache=cache, pad_token_id=0).contiguous()
save_file(out, sys.argv[2])
"""


def plain_transformers_run(dirs, ids, tmp_path, generate=0, remote_code: bool = True) -> list[dict]:
    """Per directory, loaded by `AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)` in a
    process without the suite (`remote_code=False`: without trust_remote_code, an ordinary checkpoint;
    an entry "BASE+ADAPTER" adds `PeftModel.from_pretrained(base, ADAPTER)`):
    {"logits": [batch, seq, vocab]} and, with `generate` > 0, the greedy token ids [batch, seq +
    generate] decoded with ("cache1") and without ("cache0") the KV cache."""
    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # the remote-code copy, private to this test
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_SCRIPT, str(tmp_path / "ids.safetensors"),
                           str(tmp_path / "logits.safetensors"), str(generate),
                           "remote" if remote_code else "plain", *map(str, dirs)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(tmp_path / "logits.safetensors")
    return [{"logits": out[str(i)], **{k: out.get(f"{i}.{k}") for k in ("cache0", "cache1") if generate}}
            for i in range(len(dirs))]


def plain_transformers_logits(dirs, ids, tmp_path, remote_code: bool = True) -> list[torch.Tensor]:
    """Logits of each directory loaded by `AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)`
    (`remote_code=False`: without trust_remote_code, an ordinary checkpoint)."""
    return [run["logits"] for run in plain_transformers_run(dirs, ids, tmp_path, remote_code=remote_code)]


def heterogeneous_plan(model, seed=0, empty_attention_layer=1, head_mode="q-head", empty_mlp_layer=None):
    """Every layer a different width; `empty_attention_layer` keeps no head at all and
    `empty_mlp_layer` no channel (allow_empty). kv-group mode (GQA): each other layer keeps a random
    non-empty subset of its kv heads with all their q heads."""
    rng = random.Random(seed)
    plan = full_plan(model)
    plan.allow_empty, plan.head_mode = True, head_mode
    adapter = adapter_for(model)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        lp.channels = [] if i == empty_mlp_layer else sorted(rng.sample(range(nch), nch - 7 * (i + 1)))
        if i == empty_attention_layer:
            lp.heads = []
            if nkv != nq:
                lp.kv_heads = []
        elif nkv == nq:
            lp.heads = sorted(rng.sample(range(nq), nq - 1 - i % 3))
        elif head_mode == "kv-group":
            per = nq // nkv
            lp.kv_heads = sorted(rng.sample(range(nkv), rng.randint(1, nkv - 1) if i % 2 else nkv))
            lp.heads = [j * per + h for j in lp.kv_heads for h in range(per)]
        else:  # GQA q-head mode: the same number of q heads from every kv group
            per = nq // nkv
            keep = per - 1 if i % 2 else per
            lp.heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), keep))
    return plan


def pruned_tiny(name, seed=0, **plan_options):
    """A tiny model sliced to `heterogeneous_plan` (`plan_options`: its keywords), with a bias on one
    bias-free out-projection (as FLAP adds)."""
    from suite.models import load_model

    model = load_model(name)
    plan = heterogeneous_plan(model, seed, **plan_options)
    apply_plan(model, plan)
    adapter = adapter_for(model)
    down = adapter.layers(model)[0].get_submodule(adapter.channel_members[-1][0])
    if down.bias is None:
        down.bias = torch.nn.Parameter(torch.randn(down.out_features, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model, plan


def pruned_family(name, head_mode, seed=0):
    """`pruned_tiny` with one layer without attention (`EMPTY_ATTENTION[head_mode]`: layer 0 in
    kv-group mode, whose cache entry sets the cached length) and layer `EMPTY_MLP` without MLP."""
    return pruned_tiny(name, seed=seed, head_mode=head_mode, empty_attention_layer=EMPTY_ATTENTION[head_mode],
                       empty_mlp_layer=EMPTY_MLP)
