"""Slice step of the flow: a pruning plan and its exact application to a model.

A plan is, per decoder layer, the KEPT head indices, kv-head indices (GQA only) and MLP channel
indices, in the original model's numbering, and the decoder layers it REMOVES whole (depth
pruning: ShortGPT, SLEB), in the same numbering. It is serialised as ``plan.json``:

    {"arch": "llama", "head_mode": "q-head", "allow_empty": false,
     "layers": [{"heads": [...], "kv_heads": [...], "channels": [...]}, ...],
     "removed_layers": [3, 5]}              # only when some layer is removed

`layers` always has one entry per layer of the model the plan is written for (a removed layer's
entry is ignored); files written before depth pruning have no ``removed_layers`` and load as
removing none.

Applying it slices weights and biases physically (`index_select` on rows/columns, see
`architectures.py` for which) and updates every per-layer attribute the forward pass reads, so
layers may end with different sizes. A layer left with zero heads or channels is rejected unless
``allow_empty`` is set; then that sub-block is dropped (it outputs its out-projection bias).
Removed layers are deleted from the decoder's layer list (`drop_layers`): the kept layers are
renumbered (every `layer_idx`, which the KV cache is indexed by), and the config says so
(`num_hidden_layers`; `layer_types` lists the KEPT layers' own attention types, Gemma 2/3 and
Qwen2/3 sliding/full), so the model is an ordinary transformers model with fewer layers.

A sliced model carries its plan in the original numbering (`carried_plan`). A plan applied to an
already-sliced model is written in that model's own numbering; `apply_plan` composes it with the
carried one (`compose`), so prune -> save -> load -> prune chains save a plan that rebuilds them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from suite.pruning.architectures import adapter_for, group_columns
from suite.pruning.errors import UserError
from suite.pruning.layerwise import materialised, rebind_hooked_forwards


@dataclass
class LayerPlan:
    heads: list[int]
    channels: list[int]
    kv_heads: list[int] | None = None


@dataclass
class Plan:
    arch: str
    layers: list[LayerPlan]
    head_mode: str = "q-head"
    allow_empty: bool = False
    removed_layers: list[int] = field(default_factory=list)  # whole decoder layers removed (same numbering)

    @property
    def kept_layers(self) -> list[int]:
        """Indices of the layers this plan keeps (those not in `removed_layers`), ascending."""
        removed = set(self.removed_layers)
        return [i for i in range(len(self.layers)) if i not in removed]

    def kept(self) -> "Plan":
        """This plan restricted to its kept layers, renumbered 0..K-1 (removing none): the width plan
        of the depth-pruned model, e.g. to rebuild it from a config that already has K layers."""
        return Plan(arch=self.arch, layers=[self.layers[i] for i in self.kept_layers], head_mode=self.head_mode,
                    allow_empty=self.allow_empty)

    # ---- serialisation
    def to_json(self) -> dict:
        out = {"arch": self.arch, "head_mode": self.head_mode, "allow_empty": self.allow_empty, "layers": []}
        for lp in self.layers:
            entry = {"heads": list(map(int, lp.heads))}
            if lp.kv_heads is not None:
                entry["kv_heads"] = list(map(int, lp.kv_heads))
            entry["channels"] = list(map(int, lp.channels))
            out["layers"].append(entry)
        if self.removed_layers:  # absent when none: plans without depth pruning are written as before
            out["removed_layers"] = sorted(map(int, self.removed_layers))
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        layers = [LayerPlan(heads=l["heads"], channels=l["channels"], kv_heads=l.get("kv_heads")) for l in data["layers"]]
        return cls(arch=data["arch"], layers=layers, head_mode=data.get("head_mode", "q-head"),
                   allow_empty=data.get("allow_empty", False),
                   removed_layers=[int(i) for i in data.get("removed_layers", [])])

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return cls.from_json(json.loads(Path(path).read_text()))


PLAN_ATTRIBUTE = "pruning_plan"  # the plan a sliced model carries, in its ORIGINAL model's numbering


def carried_plan(model) -> Plan | None:
    """The plan (original numbering) `model` was sliced by, or None for an unsliced model."""
    return getattr(model, PLAN_ATTRIBUTE, None)


def compose(base: Plan, new: Plan) -> Plan:
    """`new`, written in the numbering of a model already sliced by `base`, in the ORIGINAL numbering.

    Per layer, kept index i of the sliced model is original index base[i]: heads, channels and kv
    heads compose as ``[base.heads[i] for i in new.heads]``. `base` must list kv heads for GQA layers
    (plans built by this suite do); a `new` layer without kv heads follows apply_plan's reading: kv
    heads = q heads where the sliced layer has as many of each, else all kept. Layers: `new` has
    one entry per layer `base` kept; its layer j is original layer ``base.kept_layers[j]``, and the
    composed plan removes base's removed layers and those `new` removes. Pure function.
    """
    kept = base.kept_layers
    if base.arch != new.arch or len(kept) != len(new.layers):
        raise UserError(f"cannot compose a {len(new.layers)}-layer {new.arch} plan with a "
                        f"{len(base.layers)}-layer {base.arch} plan keeping {len(kept)} layers")
    _check_indices(new.removed_layers, len(new.layers), "removed_layers")
    layers, gone = list(base.layers), set(new.removed_layers)
    for j, n in enumerate(new.layers):
        if j in gone:  # a layer `new` removes keeps base's entry (not applied)
            continue
        i, b = kept[j], base.layers[kept[j]]
        _check_indices(n.heads, len(b.heads), f"layer {i} heads")
        _check_indices(n.channels, len(b.channels), f"layer {i} channels")
        kv = None
        if b.kv_heads is not None:  # GQA in the original model
            nkv = n.kv_heads if n.kv_heads is not None else (
                n.heads if len(b.heads) == len(b.kv_heads) else range(len(b.kv_heads)))
            _check_indices(list(nkv), len(b.kv_heads), f"layer {i} kv_heads")
            kv = [b.kv_heads[k] for k in nkv]
        layers[i] = LayerPlan(heads=[b.heads[k] for k in n.heads],
                              channels=[b.channels[k] for k in n.channels], kv_heads=kv)
    removed = sorted(set(base.removed_layers) | {kept[j] for j in new.removed_layers})
    return Plan(arch=base.arch, layers=layers, head_mode=new.head_mode,
                allow_empty=base.allow_empty or new.allow_empty, removed_layers=removed)


def full_plan(model) -> Plan:
    """The identity plan: every head, kv head and channel kept."""
    adapter = adapter_for(model)
    gqa = _is_gqa(model)
    layers = []
    for layer in adapter.layers(model):
        layers.append(LayerPlan(
            heads=list(range(adapter.num_heads(layer))),
            channels=list(range(adapter.num_channels(layer))),
            kv_heads=list(range(adapter.num_kv_heads(layer))) if gqa else None,
        ))
    return Plan(arch=model.config.model_type, layers=layers)


def _is_gqa(model) -> bool:
    """Whether the first layer that has heads (an emptied attention says nothing) shares kv heads."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    layer = next((layer for layer in layers if adapter.num_heads(layer)), layers[0])
    return adapter.num_kv_heads(layer) != adapter.num_heads(layer)


# --------------------------------------------------------------------------- validation
def validate(plan: Plan, model) -> None:
    """Reject plans that do not fit this (unsliced) model or would leave an empty sub-block."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    if plan.arch != model.config.model_type:
        raise UserError(f"plan is for architecture {plan.arch!r}, model is {model.config.model_type!r}")
    if len(plan.layers) != len(layers):
        raise UserError(f"plan has {len(plan.layers)} layers, model has {len(layers)}")
    _check_indices(plan.removed_layers, len(layers), "removed_layers")
    if len(plan.removed_layers) >= len(layers):
        raise UserError(f"plan removes all {len(layers)} decoder layers; keep at least one")
    removed = set(plan.removed_layers)
    for i, (lp, layer) in enumerate(zip(plan.layers, layers)):
        if i in removed:  # a removed layer's entry is not applied
            continue
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        _check_indices(lp.heads, nq, f"layer {i} heads")
        _check_indices(lp.channels, nch, f"layer {i} channels")
        # a block already empty in `model` (pruned before with allow_empty) stays so: only a plan
        # that removes a block's last heads or channels needs allow_empty
        emptied = [what for what, kept, n in (("heads", lp.heads, nq), ("channels", lp.channels, nch)) if n and not kept]
        if emptied and not plan.allow_empty:
            raise UserError(f"plan removes the last {emptied[0]} of layer {i} (zero {emptied[0]} left); "
                            "pass allow_empty to drop that sub-block")
        if nkv != nq:
            kv = lp.kv_heads if lp.kv_heads is not None else list(range(nkv))
            _check_indices(kv, nkv, f"layer {i} kv_heads")
            per = nq // nkv
            if lp.heads:
                counts = {j: 0 for j in kv}
                for h in lp.heads:
                    if h // per not in counts:
                        raise UserError(f"layer {i}: q head {h} kept but its kv head {h // per} removed")
                    counts[h // per] += 1
                if len(set(counts.values())) != 1:
                    raise UserError(f"layer {i}: kept kv heads must keep equal numbers of q heads, got {counts}")


def _check_indices(idx, n, what):
    if len(set(idx)) != len(idx) or any(not 0 <= int(j) < n for j in idx) or list(idx) != sorted(idx):
        raise UserError(f"{what}: expected sorted unique indices in [0, {n}), got {list(idx)[:8]}...")


# --------------------------------------------------------------------------- application
def slice_linear(linear: nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keep only rows (dim 0; bias too) or columns (dim 1) `index` of `linear`, in place."""
    with torch.no_grad():
        weight = linear.weight.index_select(dim, index.to(linear.weight.device)).clone()
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index.to(linear.bias.device)).clone(),
                                       requires_grad=linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def apply_plan(model, plan: Plan):
    """Slice `model` (unsliced, in place) to `plan`; returns the model. Exact: the sliced model equals
    the unsliced one with the removed heads/channels zeroed at the input of o_proj/down_proj.

    `plan` is in `model`'s current numbering; afterwards the model carries (`carried_plan`) the plan
    in its original numbering: `plan` itself on an unsliced model, else composed with the carried one.
    The kept layers are sliced first, then the removed layers deleted (`drop_layers`).
    """
    validate(plan, model)
    adapter = adapter_for(model)
    base = carried_plan(model)
    explicit = _explicit_kv(plan, model)
    carried = explicit if base is None else compose(base, explicit)
    removed = set(plan.removed_layers)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        if i in removed:
            continue
        nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
        kv = lp.kv_heads if lp.kv_heads is not None else (lp.heads if nkv == nq else list(range(nkv)))
        slice_heads = list(lp.heads) != list(range(nq)) or list(kv) != list(range(nkv))
        slice_channels = list(lp.channels) != list(range(adapter.num_channels(layer)))
        # indices first (a fused Linear's sections are located by the unsliced sizes), then slicing;
        # zero channels is exact as it is: 0-width Linears output zeros (plus the bias)
        if not (slice_heads or slice_channels):
            continue
        index = adapter.keep_index(layer, lp.heads if slice_heads else None, kv,
                                   lp.channels if slice_channels else None)
        with materialised(layer):  # offloaded weights: sliced on the device, written back (layerwise.py)
            for (name, dim), keep in index.items():
                slice_linear(layer.get_submodule(name), dim, keep)
            if slice_heads:
                adapter.set_heads(layer, list(lp.heads), list(kv))
                if not lp.heads:
                    adapter.drop_attention(layer)
            if slice_channels:
                adapter.set_channels(layer, list(lp.channels))
        rebind_hooked_forwards(layer)  # a class swapped by set_heads/drop_attention, under accelerate's hooks
    if removed:
        drop_layers(model, sorted(removed))
    setattr(model, PLAN_ATTRIBUTE, carried)
    return model


PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per decoder layer, indexed by layer


def drop_layers(model, removed: list[int]) -> None:
    """Delete decoder layers `removed` (current numbering) from `model`, in place.

    What ShortGPT's `remove_layers` and SLEB's `block_remove` do (``del layers[i]``, then
    ``self_attn.layer_idx = i`` for the kept layers), for every family: every submodule of a kept
    layer that has an integer `layer_idx` (attention modules: the KV cache's index; some decoder
    layers) gets the layer's new index, ``config.num_hidden_layers`` the new depth, and each
    per-layer config list (`PER_LAYER_CONFIG`: ``layer_types`` of Gemma 2/3, Qwen2/3) the kept
    layers' OWN entries, so a kept sliding-window layer stays one (its module keeps its own
    `sliding_window`; transformers picks each layer's mask and Gemma 3's rotary table by
    ``config.layer_types[new index]`` and builds per-layer caches from it). Raises UserError when
    nothing would remain.
    """
    adapter = adapter_for(model)
    container = adapter.layer_list(model)
    n = len(container)
    gone = set(int(i) for i in removed)
    if not gone <= set(range(n)) or len(gone) >= n:
        raise UserError(f"cannot remove layers {sorted(gone)} of a {n}-layer model (keep at least one)")
    kept = [i for i in range(n) if i not in gone]
    for i in sorted(gone, reverse=True):
        del container[i]
    for new, layer in enumerate(container):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for key in PER_LAYER_CONFIG:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def apply_saved_plan(model, plan: Plan):
    """Slice `model`, built from a pruned directory's config, to that directory's `plan` (original
    numbering); returns the model. The config already has the kept layers only (depth pruning
    leaves an ordinary config with fewer layers), so the kept layers' entries (`Plan.kept`) are
    applied and the model then carries `plan` itself, so pruning it again composes."""
    kept = plan.kept()
    if len(kept.layers) != len(adapter_for(model).layers(model)):  # a directory written before depth pruning
        raise UserError(f"plan keeps {len(kept.layers)} layers, the model has {len(adapter_for(model).layers(model))}")
    apply_plan(model, kept)
    setattr(model, PLAN_ATTRIBUTE, plan)
    return model


def _explicit_kv(plan: Plan, model) -> Plan:
    """A copy of `plan` listing kv heads for every GQA layer of `model` (as apply_plan reads them)."""
    adapter = adapter_for(model)
    layers = []
    for lp, layer in zip(plan.layers, adapter.layers(model)):
        nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
        kv = lp.kv_heads
        if kv is None and nkv != nq:
            kv = list(range(nkv))
        layers.append(LayerPlan(heads=list(lp.heads), channels=list(lp.channels),
                                kv_heads=None if kv is None else list(kv)))
    return Plan(arch=plan.arch, layers=layers, head_mode=plan.head_mode, allow_empty=plan.allow_empty,
                removed_layers=list(plan.removed_layers))


def plan_from_keep(model, keep: dict, head_mode: str = "q-head", allow_empty: bool = False) -> Plan:
    """Build a plan from kept GROUP indices: keep[(layer, "heads"|"channels")] -> sorted indices.

    In kv-group mode a kept head group is a kv head with its q heads; in q-head mode, q heads.
    Layers/kinds missing from `keep` are kept whole.
    """
    plan = full_plan(model)
    plan.head_mode, plan.allow_empty = head_mode, allow_empty
    adapter = adapter_for(model)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        if (i, "channels") in keep:
            lp.channels = sorted(int(c) for c in keep[(i, "channels")])
        if (i, "heads") in keep:
            groups = sorted(int(h) for h in keep[(i, "heads")])
            nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
            if head_mode == "kv-group" and nkv != nq:
                per = nq // nkv
                lp.kv_heads = groups
                lp.heads = group_columns(groups, per).tolist()  # each kept kv head's q heads
            else:
                lp.heads = groups
                if nkv == nq and lp.kv_heads is not None:  # a GQA model's layer sliced to one q per kv head
                    lp.kv_heads = groups
    return plan


def plan_summary(plan: Plan) -> list[dict]:
    """Kept heads and channels per layer: the record's `plan_summary` (a removed layer: zero of each
    and ``"removed": true``)."""
    removed = set(plan.removed_layers)
    return [{"heads": 0, "channels": 0, "removed": True} if i in removed else
            {"heads": len(lp.heads), "channels": len(lp.channels)} for i, lp in enumerate(plan.layers)]
