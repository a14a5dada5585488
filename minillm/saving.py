"""Save step of the flow: a pruned model as a directory of safetensors + config + tokenizer +
plan.json (nothing pickled), written to a temporary sibling and renamed into place so a killed
run never leaves a half-written model. Every file gets the mode of a file this process creates
(0644 under the usual umask 022): safetensors writes its file 0600, the rest follow the umask.
Replacing an existing `out_dir` is the caller's decision (`suite prune --force`). `load_pruned` rebuilds the unpruned architecture from the
config, applies the plan (which also restores BLOOM's per-layer ALiBi head selection), creates
any bias the pruning method added (FLAP compensation) and loads the weights strictly. The loaded
model carries its plan (`minillm.plan.carried_plan`), so pruning it again composes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from minillm.plan import Plan, apply_plan

PLAN_FILE = "plan.json"


def save_pruned(model, tokenizer, plan: Plan, out_dir, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # config describes the UNPRUNED architecture; plan.json says how to slice it
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        if extra:
            (tmp / "pruning.json").write_text(json.dumps(extra, indent=1, sort_keys=True, default=str))
        mode = (tmp / PLAN_FILE).stat().st_mode & 0o777  # written by open(): the umask's mode
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(mode)
        if out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir)
        elif out_dir.exists() or out_dir.is_symlink():
            out_dir.unlink()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_pruned(path, dtype: torch.dtype = torch.float32):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_plan(model, Plan.load(path / PLAN_FILE))
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    for key, tensor in state.items():  # biases created by the method (e.g. FLAP) on bias-free Linears
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.empty_like(tensor, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ValueError(f"pruned checkpoint mismatch: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    return model.eval()
