"""Baseline bias compensation (FLAP, An et al. AAAI 2024, Eq. 6), run after slicing.

Removing input columns R of a block's output projection W (o_proj / out_proj / dense for heads,
down_proj / fc2 / dense_4h_to_h for MLP channels) changes its output by W_{:,R} x_R; replacing x_R
by its calibration mean x̄_R gives the bias

    B = W_{:,R} x̄_R

added to the projection's bias (a new frozen Parameter where the Linear has none, e.g. LLaMA), so
the pruned block outputs what the dense one did whenever the removed features sit at their mean.
Source: FLAP (github CASIA-IVA-Lab/FLAP) `lib/prune.py::compress` with `bias=True` (the output
bias from the removed columns' mean input, called by `prune_flap`). Deliberate differences: B is
computed in float64 from the exact calibration mean (`InputStats.mean`), as W x̄ - W_{:,K} x̄_K
(W x̄ kept from scoring, W_{:,K} the sliced weight: no pre-slicing weight is held). The
created bias is a real Parameter: counted in the pruned model's parameters, saved, and recreated by
`load_pruned`. Used by `flap` (its part 3) and by `minillm`'s `compensate=true` option.
"""
from __future__ import annotations

import torch
from torch import nn

from suite.pruning.architectures import GroupSet, adapter_for, group_columns
from suite.pruning.errors import UserError
from suite.pruning.layerwise import materialised


def saved_projection(gs: GroupSet, mean: torch.Tensor, column_width: int) -> dict:
    """What compensation needs of one group set, taken BEFORE slicing (while the projection's
    weight is resident): the output projection, W x̄ of its pre-slicing weight (float64
    [out_features]), the calibration mean of its input (float64 [in_features]), its input width and
    the columns per group. No weight is kept: B = W_{:,R} x̄_R is computed after slicing as
    W x̄ - W_{:,K} x̄_K from the sliced weight W_{:,K}, so an offloaded model holds no pre-slicing
    layer between scoring and compensation."""
    linear = gs.linear(gs.output)
    mean = mean.to(linear.weight.device)
    return {"layer": gs.layer, "kind": gs.kind, "linear": linear, "full_mean": linear.weight.double() @ mean,
            "in_features": linear.weight.shape[1], "mean": mean, "column_width": column_width}


def saved_projections(model, group_sets, stats) -> list[dict]:
    """`saved_projection` of every group set, the means from `stats` (activations.input_stats)."""
    adapter = adapter_for(model)
    out = []
    for gs in group_sets:
        with materialised(gs.linear(gs.output)):
            out.append(saved_projection(gs, stats[(gs.layer, gs.output.name)].mean,
                                        adapter.head_dim(gs.module) if gs.kind == "heads" else 1))
    return out


def bias_compensator(saved: list[dict], info: dict, method: str):
    """compensate(model, plan) adding B = W_{:,R} x̄_R = W x̄ - W_{:,K} x̄_K to each output projection
    of `saved`.

    R / K: the columns of the groups `plan` removed / kept (plan in the scored model's numbering).
    Each projection must already be sliced to the plan's kept columns (its input width is checked:
    else UserError naming `method`). Writes `info["compensated_modules"]` and
    `info["bias_entries_added"]`. B is computed in float64 and cast to the projection's dtype; an
    offloaded projection is materialised for the step and its new bias written back
    (`layerwise.materialised`).
    """
    def compensate(model, plan) -> None:
        added, modules = 0, 0
        try:
            for entry in saved:
                lp = plan.layers[entry["layer"]]
                kept = group_columns(lp.heads if entry["kind"] == "heads" else lp.channels, entry["column_width"])
                if len(kept) == entry["in_features"]:
                    continue
                linear: nn.Linear = entry["linear"]
                with materialised(linear):
                    current = linear.weight
                    if current.shape[1] != len(kept):
                        raise UserError(f"{method} compensation: layer {entry['layer']} {entry['kind']} output "
                                        "projection was not sliced to the plan's kept columns")
                    mean = entry["mean"].to(current.device)
                    kept_part = current.detach().double() @ mean[kept.to(current.device)]
                    delta = (entry["full_mean"].to(current.device) - kept_part).to(current.dtype)
                    with torch.no_grad():
                        if linear.bias is None:
                            linear.bias = nn.Parameter(delta.clone(), requires_grad=False)
                            added += delta.numel()
                        else:
                            linear.bias.add_(delta.to(linear.bias.device))
                modules += 1
        finally:
            saved.clear()
        info["compensated_modules"] = modules
        info["bias_entries_added"] = added

    return compensate
