"""Save step of the flow: a pruned model as a STANDARD transformers directory (nothing pickled).

A pruned directory holds safetensors weights, the tokenizer, `plan.json` (kept heads / kv heads /
channels in the original numbering) and a config that loads with plain transformers:
the dense config plus ``pruned_layers`` (every layer's head, kv-head and channel counts, its
biases, BLOOM's kept ALiBi heads; every family in `modeling_pruned.FAMILIES`: LLaMA, Mistral,
Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, OPT, BLOOM) and ``auto_map`` naming `modeling_pruned.py`, which
`save_pruned` copies beside it (see that file). So

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads it in any process (lm-eval's CLI, PEFT/TRL scripts, serving stacks). The directory is
written to a temporary sibling and renamed into place, so a killed run never leaves a half-written
model. `load_pruned` reads this format with the suite's own copy of the modeling classes, and the
older one (dense config + plan.json, before the standard config existed) by deriving
``pruned_layers`` from the plan and the weights' keys; either way transformers builds the model on
the meta device and loads the pruned tensors into it: the dense model is never materialised.
A model whose residual stream was rotated and sliced (SliceGPT, `rotation.py`: ``residual_widths``
in its config) is saved the same way with `modeling_sliced.py` as its modeling file (its config
states every width, the shortcut matrices are weights), and `load_pruned` loads it with that file's
class. A family that `modeling_pruned.FAMILIES` does not list yet is saved and loaded as before (dense
config + plan.json, rebuilt and sliced), so adding an architecture adapter never breaks saving.
Every file gets the mode of a file this process creates (0644 under the usual umask 022):
safetensors writes its file 0600, the rest follow the umask. Replacing an existing `out_dir` is the
caller's decision (`suite prune --force`). A loaded model carries its plan
(`suite.pruning.plan.carried_plan`, from plan.json), so pruning it again composes.

Depth pruning (whole layers removed, `plan.drop_layers`) leaves an ordinary model with fewer
layers: its config has the new ``num_hidden_layers`` and the kept layers' own ``layer_types``.
A model whose kept layers all have their dense shapes (`width_pruned` false: depth pruning alone)
is saved as an ORDINARY checkpoint (no ``pruned_layers``, no ``auto_map``, the transformers class
in ``architectures``): ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it without
trust_remote_code or this suite. With narrowed layers too, ``pruned_layers`` lists the KEPT
layers, and the mechanism above applies unchanged. plan.json keeps the original numbering
(``removed_layers``) either way.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from suite.pruning import modeling_pruned, modeling_sliced
from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError
from suite.pruning.layerwise import offloaded
from suite.pruning.plan import PLAN_ATTRIBUTE, Plan

PLAN_FILE = "plan.json"
MODELING_FILE = "modeling_pruned.py"
SLICED_MODELING_FILE = "modeling_sliced.py"


def residual_sliced(config) -> bool:
    """Whether a config (object or dict) is a residual-sliced model's (`modeling_sliced.CONFIG_KEY`)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    return get(modeling_sliced.CONFIG_KEY) is not None


def sliced_config(config: dict) -> dict:
    """A residual-sliced model's saved config made standard: `auto_map` and `architectures` naming its
    class in `modeling_sliced.py` (the widths, norm epsilon and head bias are already in it)."""
    cls = modeling_sliced.FAMILIES.get(config["model_type"])
    if cls is None:
        raise UserError(f"no standard sliced checkpoint for architecture {config['model_type']!r}; "
                        f"supported: {', '.join(sorted(modeling_sliced.FAMILIES))}")
    config = dict(config, tie_word_embeddings=False)
    config["auto_map"] = {"AutoModelForCausalLM": f"{Path(SLICED_MODELING_FILE).stem}.{cls.__name__}"}
    config["architectures"] = [cls.__name__]
    return config


def pruned_layers(model) -> list[dict]:
    """The ``pruned_layers`` config entry of a (sliced) in-memory model: per-layer sizes and biases."""
    adapter = adapter_for(model)
    names = _linear_names(adapter)
    out = []
    for layer in adapter.layers(model):
        spec = {"heads": adapter.num_heads(layer), "kv_heads": adapter.num_kv_heads(layer),
                "channels": adapter.num_channels(layer),
                "biases": [n for n in names if layer.get_submodule(n).bias is not None]}
        if model.config.model_type == "bloom":
            attn = adapter.attn(layer)
            kept = getattr(attn, "kept_alibi_heads", None)
            spec["alibi_heads"] = [int(h) for h in kept] if kept is not None else list(range(spec["heads"]))
        out.append(spec)
    return out


def _linear_names(adapter) -> list[str]:
    """The prunable Linears of a decoder layer, each once (a fused Linear is named several times)."""
    return list(dict.fromkeys([m[0] for m in adapter.head_members] + [m[0] for m in adapter.channel_members]))


def standard_config(config: dict, layers: list[dict]) -> dict:
    """A dense config dict made the pruned directory's: `pruned_layers`, `auto_map`, `architectures`."""
    cls = modeling_pruned.FAMILIES.get(config["model_type"])
    if cls is None:
        raise UserError(f"no standard pruned checkpoint for architecture {config['model_type']!r}; "
                        f"supported: {', '.join(sorted(modeling_pruned.FAMILIES))}")
    config = dict(config)
    config[modeling_pruned.CONFIG_KEY] = layers
    config["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{cls.__name__}"}
    config["architectures"] = [cls.__name__]
    return config


def standard_format(config) -> bool:
    """Whether a pruned model of this config is saved as a standard checkpoint (modeling_pruned.py).

    Not for families modeling_pruned.py does not list yet, nor for BLOOM with ``pretraining_tp > 1``
    and ``slow_but_exact``: its sliced projections sum by original shard (`TensorParallelSum`),
    which only the suite's slicing reproduces; those keep the dense config + plan.json format.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("model_type") not in modeling_pruned.FAMILIES:
        return False
    return not (get("model_type") == "bloom" and (get("pretraining_tp") or 1) > 1 and get("slow_but_exact"))


def width_pruned(model) -> bool:
    """Whether any kept layer of `model` differs from its dense shape (heads, kv heads, channels, or
    biases a method added), compared with the same architecture built from `model.config` on the
    meta device (depth pruning alone: False)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, modeling_pruned.CONFIG_KEY):
        delattr(config, modeling_pruned.CONFIG_KEY)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config)
    return pruned_layers(model) != pruned_layers(dense)


def ordinary_config(config: dict, model) -> dict:
    """A config dict as transformers writes a dense model's: no ``pruned_layers`` / ``auto_map``,
    ``architectures`` naming the transformers class `model` is (or derives from)."""
    config = {k: v for k, v in config.items() if k not in (modeling_pruned.CONFIG_KEY, "auto_map")}
    base = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
    config["architectures"] = [base.__name__]
    return config


OFFLOADED_SHARD_SIZE = "500MB"


@contextmanager
def written_atomically(out_dir: Path, mode_of: str):
    """Yield a temporary sibling of `out_dir` to write into; on success give every file the mode of
    its file `mode_of` (written by open(): the umask's mode; safetensors writes 0600) and rename it
    into place, replacing `out_dir` (the caller's decision); on any failure remove it."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
        mode = (tmp / mode_of).stat().st_mode & 0o777
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


def save_pruned(model, tokenizer, plan: Plan, out_dir, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    with written_atomically(out_dir, PLAN_FILE) as tmp:
        # offloaded weights are read back shard by shard: small shards bound the memory this takes
        shards = {"max_shard_size": OFFLOADED_SHARD_SIZE, "state_dict": _untied_state(model)} if offloaded(model) else {}
        model.save_pretrained(tmp, safe_serialization=True, **shards)
        config_path = tmp / "config.json"
        written = json.loads(config_path.read_text())
        config, modeling = written, None  # else: the dense config + plan.json
        if plan.removed_layers and not width_pruned(model):  # depth alone: an ordinary checkpoint
            config = ordinary_config(written, model)
        elif residual_sliced(model.config):  # SliceGPT: narrower residual stream, shortcut matrices
            config, modeling = sliced_config(written), (modeling_sliced, SLICED_MODELING_FILE)
        elif standard_format(model.config):
            config, modeling = standard_config(written, pruned_layers(model)), (modeling_pruned, MODELING_FILE)
        if config is not written:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if modeling is not None:
            shutil.copyfile(modeling[0].__file__, tmp / modeling[1])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        if extra:
            (tmp / "pruning.json").write_text(json.dumps(extra, indent=1, sort_keys=True, default=str))
    return out_dir


def _untied_state(model) -> dict:
    """`model.state_dict()` without the targets of its declared weight ties (`all_tied_weights_keys`,
    e.g. a tied lm_head.weight), so a tied head is written once. transformers drops a tie's copy by
    tensor identity; accelerate's offload gives each offloaded module its own meta parameter, so
    that test misses an offloaded tied head and it was written a second time."""
    state = model.state_dict()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in state:
            state.pop(target, None)
    return state


def _layers_from_plan(config, plan: Plan, keys: set[str]) -> list[dict]:
    """`pruned_layers` of an old-format directory: counts from the plan, biases from the weight keys."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the dense architecture's module names and sizes, no memory
        dense = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(dense)
    names = _linear_names(adapter)
    prefix = {id(layer): name for name, layer in dense.named_modules()}
    out = []
    for lp, layer in zip(plan.kept().layers, adapter.layers(dense)):  # the config has the kept layers only
        nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
        kv = lp.kv_heads if lp.kv_heads is not None else (lp.heads if nkv == nq else list(range(nkv)))
        spec = {"heads": len(lp.heads), "kv_heads": len(kv) if nkv != nq else len(lp.heads),
                "channels": len(lp.channels),
                "biases": [n for n in names if f"{prefix[id(layer)]}.{n}.bias" in keys]}
        if config.model_type == "bloom":
            spec["alibi_heads"] = list(lp.heads)
        out.append(spec)
    return out


def load_pruned(path, dtype: torch.dtype = torch.float32):
    """A pruned directory (standard or old format) as the suite's pruned model class, in eval mode.

    Raises ValueError when the weights do not match the config (a missing or extra tensor).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    sliced = residual_sliced(config)
    if not sliced and not standard_format(config):
        return _load_by_slicing(path, config, dtype)
    plan = Plan.load(path / PLAN_FILE) if (path / PLAN_FILE).is_file() else None
    if not sliced and not hasattr(config, modeling_pruned.CONFIG_KEY):  # old format: dense config + plan.json
        keys = set()
        for shard in sorted(path.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                keys.update(f.keys())
        layers = _layers_from_plan(config, plan, keys)
        setattr(config, modeling_pruned.CONFIG_KEY, layers)
    cls = (modeling_sliced if sliced else modeling_pruned).FAMILIES[config.model_type]
    model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    tied = {k for k in info["missing_keys"] if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    missing, unexpected = set(info["missing_keys"]) - tied, set(info["unexpected_keys"])
    if missing or unexpected or info.get("mismatched_keys"):
        raise ValueError(f"pruned checkpoint mismatch: missing {sorted(missing)[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}, mismatched {list(info.get('mismatched_keys') or [])[:5]}")
    if plan is not None:  # as apply_plan leaves a sliced model: pruning it again composes (plan.compose)
        setattr(model, PLAN_ATTRIBUTE, _carried(config, plan))
    return model.eval()


def _carried(config, plan: Plan) -> Plan:
    """plan.json as `apply_plan` carries it: kv heads listed for every GQA layer (original numbering)."""
    nq = config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nq
    for lp in plan.layers:
        if lp.kv_heads is None and nkv != nq:
            lp.kv_heads = list(range(nkv))
    return plan


def _load_by_slicing(path: Path, config, dtype):
    """A family without a pruned class in modeling_pruned.py: the dense model from its config, sliced
    to plan.json, biases the method created (FLAP) added, the weights loaded strictly."""
    from safetensors.torch import load_file
    from torch import nn
    from transformers import AutoModelForCausalLM

    from suite.pruning.plan import apply_saved_plan

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_saved_plan(model, Plan.load(path / PLAN_FILE))
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    for key, tensor in state.items():
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
