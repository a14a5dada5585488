"""Slice step of the flow: a pruning plan and its exact application to a model.

A plan is, per decoder layer, the KEPT head indices, kv-head indices (GQA only) and MLP channel
indices, in the original model's numbering. It is serialised as ``plan.json``:

    {"arch": "llama", "head_mode": "q-head", "allow_empty": false,
     "layers": [{"heads": [...], "kv_heads": [...], "channels": [...]}, ...]}

Applying it slices weights and biases physically (`index_select` on rows/columns, see
`architectures.py` for which) and updates every per-layer attribute the forward pass reads, so
layers may end with different sizes. A layer left with zero heads or channels is rejected unless
``allow_empty`` is set; then that sub-block is dropped (it outputs its out-projection bias).

A sliced model carries its plan in the original numbering (`carried_plan`). A plan applied to an
already-sliced model is written in that model's own numbering; `apply_plan` composes it with the
carried one (`compose`), so prune -> save -> load -> prune chains save a plan that rebuilds them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
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

    # ---- serialisation
    def to_json(self) -> dict:
        out = {"arch": self.arch, "head_mode": self.head_mode, "allow_empty": self.allow_empty, "layers": []}
        for lp in self.layers:
            entry = {"heads": list(map(int, lp.heads))}
            if lp.kv_heads is not None:
                entry["kv_heads"] = list(map(int, lp.kv_heads))
            entry["channels"] = list(map(int, lp.channels))
            out["layers"].append(entry)
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        layers = [LayerPlan(heads=l["heads"], channels=l["channels"], kv_heads=l.get("kv_heads")) for l in data["layers"]]
        return cls(arch=data["arch"], layers=layers, head_mode=data.get("head_mode", "q-head"),
                   allow_empty=data.get("allow_empty", False))

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
    heads = q heads where the sliced layer has as many of each, else all kept. Pure function.
    """
    if base.arch != new.arch or len(base.layers) != len(new.layers):
        raise UserError(f"cannot compose a {len(new.layers)}-layer {new.arch} plan with a "
                        f"{len(base.layers)}-layer {base.arch} plan")
    layers = []
    for i, (b, n) in enumerate(zip(base.layers, new.layers)):
        _check_indices(n.heads, len(b.heads), f"layer {i} heads")
        _check_indices(n.channels, len(b.channels), f"layer {i} channels")
        kv = None
        if b.kv_heads is not None:  # GQA in the original model
            nkv = n.kv_heads if n.kv_heads is not None else (
                n.heads if len(b.heads) == len(b.kv_heads) else range(len(b.kv_heads)))
            _check_indices(list(nkv), len(b.kv_heads), f"layer {i} kv_heads")
            kv = [b.kv_heads[j] for j in nkv]
        layers.append(LayerPlan(heads=[b.heads[j] for j in n.heads],
                                channels=[b.channels[j] for j in n.channels], kv_heads=kv))
    return Plan(arch=base.arch, layers=layers, head_mode=new.head_mode,
                allow_empty=base.allow_empty or new.allow_empty)


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
    for i, (lp, layer) in enumerate(zip(plan.layers, layers)):
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
    """
    validate(plan, model)
    adapter = adapter_for(model)
    base = carried_plan(model)
    explicit = _explicit_kv(plan, model)
    carried = explicit if base is None else compose(base, explicit)
    for lp, layer in zip(plan.layers, adapter.layers(model)):
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
    setattr(model, PLAN_ATTRIBUTE, carried)
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
    return Plan(arch=plan.arch, layers=layers, head_mode=plan.head_mode, allow_empty=plan.allow_empty)


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
    """Kept heads and channels per layer: the record's `plan_summary`."""
    return [{"heads": len(lp.heads), "channels": len(lp.channels)} for lp in plan.layers]
