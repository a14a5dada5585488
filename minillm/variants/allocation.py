"""Per-layer pruning-ratio allocation (`space=layer`): this project's, not the paper's.

One scalar gate per sub-block (each layer's attention output and MLP output, d = 2·layers), its
sensitivity |∂L/∂gate| estimated forward-only (`gate_space.gate_estimate`: SPSA or coordinate) or by
backprop; a layer's sensitivity is the sum of its two. The allocation gives each layer a weight
w_i, rank-linear in [1 − λ, 1 + λ] (the least sensitive layer 1 + λ: pruned most), and the shared
per-layer selection prunes p_i ∝ w_i (`select(allocation_weights=...)`); FMS (`minillm.method.fms`)
still ranks the groups inside each layer. Only a per-layer selection scope reads an allocation.

Option: layer_lambda = 0.3 (λ; ≤ 0.4 at ratio 0.5 on SmolLM2, results/notes/minillm.md).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, ValidationInfo, model_validator

from suite.pruning.errors import UserError
from suite.pruning.options import Float, MethodOptions
from minillm.variants import changed, refuse
from minillm.variants.gate_space import gate_sensitivity


class AllocationOptions(MethodOptions):
    layer_lambda: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.3

    @model_validator(mode="after")
    def _allocation_needs_the_layer_space_and_scope(self, info: ValidationInfo):
        if self.space != "layer":
            for name in changed(self, "layer_lambda"):
                raise refuse(self, name, f"is read only with space=layer; with space={self.space} it would be ignored")
        elif (info.context or {}).get("scope") == "global":  # None: minillm's SELECTION default, per layer
            raise UserError("minillm option space=layer computes per-layer pruning ratios; with --scope global "
                            "(scope: global) one ranking over all layers ignores them: use --scope layer")
        return self


def allocate(model, windows, group_sets, options, seed) -> dict:
    """The `info` entries of space=layer: "layer" (the estimate's info, each layer's sub-block
    sensitivities and its weight) and "layer_weights" ({layer: w_i}, what the selection reads)."""
    per_layer, part = layer_sensitivity(model, windows, group_sets, options, seed, options["gradient"])
    weights = allocation_from_sensitivity({i: sum(v.values()) for i, v in per_layer.items()}, options["layer_lambda"])
    return {"layer": part | {"sensitivity": {str(i): per_layer[i] for i in sorted(per_layer)},
                             "weights": {str(i): round(weights[i], 4) for i in sorted(weights)}},
            "layer_weights": weights}


def layer_sensitivity(model, windows, group_sets, options, seed, kind):
    """One scalar gate per GroupSet (a layer's attention / MLP output): {layer: {kind: |ĝ|}}, info."""
    device = next(model.parameters()).device
    scalars = [torch.ones(1, device=device) for _ in group_sets]
    names = [f"{gs.layer}.{gs.kind}" for gs in group_sets]
    grads, info = gate_sensitivity(model, windows, group_sets, scalars, names, options, seed, kind, stream=1 << 20,
                                   expand=lambda gates: [g.expand(gs.count) for g, gs in zip(gates, group_sets)],
                                   label="zo layer")
    grads = [float(g) for g in grads]
    per_layer = {}
    for gs, g in zip(group_sets, grads):
        per_layer.setdefault(gs.layer, {})[gs.kind] = g
    return per_layer, info


def allocation_from_sensitivity(sensitivity: dict, lam: float) -> dict:
    """{layer: w} rank-linear in [1 − λ, 1 + λ] over `sensitivity` ({layer: Σ|ĝ|}): the least
    sensitive layer gets 1 + λ (pruned most), ties broken by layer index."""
    layers = sorted(sensitivity, key=lambda i: (sensitivity[i], i))
    n = len(layers)
    if n == 1:
        return {layers[0]: 1.0}
    return {i: 1.0 + lam * (1.0 - 2.0 * r / (n - 1)) for r, i in enumerate(layers)}
