"""The gate spaces (`space=mask`, and the gates of `space=layer`): this project's, not the paper's.

One multiplicative gate per group (a head's output / a channel, `suite.pruning.gates`) and the gradient of
the calibration loss w.r.t. the gate vector, estimated by the same forward-only SPSA as the paper's
weight space, over d = #groups instead of ~1e8 weights. Score = |ĝ_gate|, which *is* the
feature-map sensitivity: the first-order loss change when the group's feature map is scaled.

Options (`GateOptions`: both gate spaces; `MaskOptions`: space=mask only):
  gate_eps = 1e-2   the step for gates: they are O(1) and few, a larger step keeps (L₊ − L₋) well
                    above forward noise.
  estimator         spsa (MeZO's, `zo.spsa_layerwise`) | coordinate: central differences per gate
                    (`zo.coordinate_layerwise`), exact up to O(ε²), 2 forwards per gate, better
                    than SPSA once q ≳ d/2.
  fms_gradient      the gradient of the part still scored by FMS (space=layer; space=mask with
                    mask_groups=heads): same (as `gradient`) | zo | none | noise | backprop.
  blockwise         one layer's gates at a time, layers ≥ i run from layer i's unperturbed inputs
                    (`zo.blockwise_layerwise`): d drops from ~46k to one layer's groups.
  mask_groups       all | heads (channels then by FMS, `minillm.method.fms`).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from minillm import zo

from suite.pruning import loss as lm_loss
from suite.pruning.errors import UserError
from suite.pruning.gates import gated
from suite.pruning.options import Bool, Float, MethodOptions
from minillm.variants import changed, refuse
from minillm.variants.controls import GradFlags

FMS_OPTIONS = ("activation", "aggregate", "abs", "members")  # the paper's FMS options (method.py)


class GateOptions(MethodOptions):
    gate_eps: Annotated[Float, Field(gt=0)] = 1e-2
    estimator: Literal["spsa", "coordinate"] = "spsa"
    fms_gradient: Literal["same", "zo", "none", "noise", "backprop"] = "same"

    @model_validator(mode="after")
    def _gate_options_need_gates(self):
        for name in changed(self, "estimator", "fms_gradient", "gate_eps"):
            if self.space == "weight":
                raise refuse(self, name, "is read only with space=mask or space=layer; with space=weight it "
                                         "would be ignored")
            if name != "fms_gradient" and self.gradient == "backprop":
                raise refuse(self, name, "sets the gates' forward-only estimate; with gradient=backprop the "
                                         "gates' gradient comes from one backward pass and it would be ignored")
        return self


class MaskOptions(MethodOptions):
    blockwise: Bool = False
    mask_groups: Literal["all", "heads"] = "all"

    @model_validator(mode="after")
    def _mask_options_need_the_mask_space(self):
        if self.space != "mask":
            for name in changed(self, "blockwise", "mask_groups"):
                raise refuse(self, name, f"is read only with space=mask; with space={self.space} it would be ignored")
            return self
        if self.blockwise and self.gradient == "backprop":
            raise UserError("minillm option blockwise=true splits the SPSA estimate layer by layer; with "
                            "gradient=backprop all gates' gradients come from one backward pass and it would be ignored")
        if self.blockwise and self.estimator == "coordinate":
            raise UserError("minillm option blockwise=true with estimator=coordinate: central differences "
                            "already perturb one gate at a time from its layer's inputs (the same estimate), "
                            "so it would be ignored")
        if self.mask_groups == "all":
            for name in changed(self, "fms_gradient", *FMS_OPTIONS):
                raise refuse(self, name, "sets FMS; with space=mask and mask_groups=all no group is scored by FMS "
                                         "(mask_groups=heads scores the channels by FMS) and it would be ignored")
        return self


def gate_estimate(runner, named, layers, options, seed, stream=0, progress=None):
    """SPSA over the gates (the paper's estimator), or central differences per gate (`coordinate`),
    on the layer-by-layer pass (`lm_loss.LayerwiseLoss`); layers[i]: the decoder layer gate i scales."""
    if options["estimator"] == "coordinate":
        return zo.coordinate_layerwise(runner, named, layers, options["gate_eps"],
                                       streams=2 * options["directions"], progress=progress)
    return zo.spsa_layerwise(runner, named, layers, options["gate_eps"], options["directions"], seed,
                             stream=stream, progress=progress)


def forwards(est) -> int:
    return est.forwards if isinstance(est, zo.CoordinateEstimate) else 2 * est.q


def gate_sensitivity(model, windows, sets, gates, names, options, seed, kind, stream=0, expand=None,
                     label="zo gates"):
    """|∂L/∂gate| for `gates` (list of tensors, edited in place) by SPSA or autograd (kind backprop).

    `expand(gates)` -> the per-group multipliers of `sets` (default: the gates themselves; the
    allocation's one scalar per sub-block is expanded to its groups)."""
    bs = options["batch_size"]
    expand = expand or (lambda tensors: tensors)
    if kind == "backprop":
        for g in gates:
            g.requires_grad_(True)
            g.grad = None
        with GradFlags(model, []), gated(sets, expand(gates)):  # expanded after requires_grad: in the graph
            loss = lm_loss.backprop_loss(model, windows, bs)
        grads = [g.grad.detach().abs().clone() for g in gates]
        for g in gates:
            g.grad = None
            g.requires_grad_(False)
        return grads, {"loss": loss, "forwards": 1, "backwards": 1}
    runner = lm_loss.LayerwiseLoss(model, windows, bs)
    with gated(sets, expand(gates)):
        est = gate_estimate(runner, list(zip(names, gates)), [gs.layer for gs in sets], options, seed, stream,
                            progress=zo.progress_bar(label))
    for g in gates:  # gates are ours: put them back exactly
        with torch.no_grad():
            g.fill_(1.0)
    return [est.gradient(i).abs() for i in range(len(gates))], est.summary() | {
        "forwards": forwards(est), "full_forward_equivalents": round(runner.layer_forwards / runner.depth, 1)}


def mask_scores(model, windows, group_sets, options, seed):
    """space=mask: {(layer, kind): |ĝ_gate|} of the gated groups (all, or the heads only with
    mask_groups=heads: the rest are left to FMS) and the estimate's info."""
    sets = group_sets if options["mask_groups"] == "all" else [gs for gs in group_sets if gs.kind == "heads"]
    return mask_sensitivity(model, windows, sets, options, seed, options["gradient"])


def mask_sensitivity(model, windows, sets, options, seed, kind):
    """One gate per group of `sets`; score = |ĝ_gate| (all layers at once, or block-wise)."""
    device = next(model.parameters()).device
    scores, info = {}, {"gradient": kind, "blockwise": bool(options["blockwise"])}
    gates = [torch.ones(gs.count, device=device) for gs in sets]
    names = [f"{gs.layer}.{gs.kind}" for gs in sets]
    if not options["blockwise"]:
        grads, part = gate_sensitivity(model, windows, sets, gates, names, options, seed, kind)
        info.update(part, dims=sum(gs.count for gs in sets))
    else:  # one SPSA estimate per layer from its unperturbed inputs
        runner = lm_loss.LayerwiseLoss(model, windows, options["batch_size"])
        grads = [None] * len(sets)
        with gated(sets, gates):
            for idx, est in zo.blockwise_layerwise(runner, list(zip(names, gates)), [gs.layer for gs in sets],
                                                   options["gate_eps"], options["directions"], seed,
                                                   progress=zo.progress_bar("zo mask (block-wise)")):
                for j, i in enumerate(idx):
                    grads[i] = est.gradient(j).abs()
        per_layer = {}
        for gs in sets:
            per_layer[gs.layer] = per_layer.get(gs.layer, 0) + gs.count
        info.update(q=options["directions"], eps=options["gate_eps"], estimator=options["estimator"],
                    full_forward_equivalents=round(runner.layer_forwards / runner.depth, 1),
                    clean_loss=runner.clean_loss, dims_per_layer=max(per_layer.values()))
        del runner
    for gs, g in zip(sets, grads):
        scores[(gs.layer, gs.kind)] = g.float().cpu()
    return scores, info
