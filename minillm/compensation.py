"""Baseline bias compensation (FLAP, An et al. AAAI 2024, Eq. 6), run after slicing.

Removing input columns R of a block's output projection W (o_proj / out_proj / dense for heads,
down_proj / fc2 / dense_4h_to_h for MLP channels) changes its output by W_{:,R} x_R; replacing x_R
by its calibration mean x̄_R gives the bias

    B = W_{:,R} x̄_R

added to the projection's bias (a new frozen Parameter where the Linear has none, e.g. LLaMA), so
the pruned block outputs what the dense one did whenever the removed features sit at their mean.
Source: FLAP (github CASIA-IVA-Lab/FLAP) `lib/prune.py::compress` with `bias=True` (the output
bias from the removed columns' mean input, called by `prune_flap`). Deliberate difference: B is
computed in float64 from the exact calibration mean (`InputStats.mean`). The
created bias is a real Parameter: counted in the pruned model's parameters, saved, and recreated by
`load_pruned`. Used by `flap` (its part 3) and by `minillm`'s `compensate=true` option.
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.architectures import GroupSet, adapter_for, group_columns
from minillm.errors import UserError


def saved_projection(gs: GroupSet, mean: torch.Tensor, column_width: int) -> dict:
    """What compensation needs of one group set, taken BEFORE slicing: the output projection and a
    reference to its pre-slicing weight Parameter (slicing replaces it, it does not edit it; not a
    copy), the calibration mean of its input (float64 [in_features]) and the columns per group."""
    linear = gs.linear(gs.output)
    return {"layer": gs.layer, "kind": gs.kind, "linear": linear, "weight": linear.weight,
            "mean": mean, "column_width": column_width}


def saved_projections(model, group_sets, stats) -> list[dict]:
    """`saved_projection` of every group set, the means from `stats` (activations.input_stats)."""
    adapter = adapter_for(model)
    return [saved_projection(gs, stats[(gs.layer, gs.output.name)].mean,
                             adapter.head_dim(gs.module) if gs.kind == "heads" else 1) for gs in group_sets]


def bias_compensator(saved: list[dict], info: dict, method: str):
    """compensate(model, plan) adding B = W_{:,R} x̄_R to each output projection of `saved`.

    R: the columns of the groups `plan` removed (plan in the scored model's numbering). Each
    projection must already be sliced to the plan's kept columns (checked against the kept
    reference: else UserError naming `method`). Writes `info["compensated_modules"]` and
    `info["bias_entries_added"]`; drops the references to the pre-slicing weights when done.
    B is computed in float64 and cast to the projection's dtype.
    """
    def compensate(model, plan) -> None:
        added, modules = 0, 0
        try:
            for entry in saved:
                lp = plan.layers[entry["layer"]]
                kept = group_columns(lp.heads if entry["kind"] == "heads" else lp.channels, entry["column_width"])
                full = entry["weight"]
                removed_mask = torch.ones(full.shape[1], dtype=torch.bool)
                removed_mask[kept] = False
                if not removed_mask.any():
                    continue
                linear: nn.Linear = entry["linear"]
                current = linear.weight
                if current is full or current.shape[1] != len(kept) or not torch.equal(
                        full.detach()[:, kept.to(full.device)], current.detach()):
                    raise UserError(f"{method} compensation: layer {entry['layer']} {entry['kind']} output "
                                    "projection was not sliced to the plan's kept columns")
                removed = removed_mask.nonzero().view(-1).to(full.device)
                mean = entry["mean"].to(full.device)[removed]
                delta = (full.detach()[:, removed].double() @ mean).to(current.dtype)   # B = W_{:,R} x̄_R
                with torch.no_grad():
                    if linear.bias is None:
                        linear.bias = nn.Parameter(delta.clone(), requires_grad=False)
                        added += delta.numel()
                    else:
                        linear.bias.add_(delta.to(linear.bias.device))
                modules += 1
        finally:
            saved.clear()  # drop the references to the pre-slicing weights
        info["compensated_modules"] = modules
        info["bias_entries_added"] = added

    return compensate
