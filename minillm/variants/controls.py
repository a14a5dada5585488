"""Control gradients (`gradient=none | noise | backprop`): what the paper's SPSA estimate is compared with.

  none      ĝ ≡ 1: FMS without a gradient, |W · X| per weight (the ablation of what ĝ adds).
  noise     ĝ ~ N(0, I) per weight, seeded per (seed, Linear name), no forward pass: the control for
            whether a weight-space estimate carries gradient information (for any SPSA coefficients
            ĝ has this i.i.d. Gaussian shape per weight, so an estimate that is only noise scores alike).
  backprop  the true gradient by autograd (`lm_loss.backprop_loss`, micro-batched): the upper-bound
            reference, with backprop's memory. In the gate spaces it is ∂L/∂gate (gate_space.py).

`none` and `noise` are weight-space controls; `fms_gradient` (gate_space.py) picks the gradient of
the FMS part of the gate spaces. Each class has `info` and `of(name)` -> ĝ like the Linear's weight
(None: ĝ ≡ 1), as the paper's `minillm.method.SPSAGradient`.
"""
from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import ValidationInfo, model_validator

from suite.pruning import loss as lm_loss
from suite.pruning.errors import UserError
from suite.pruning.options import MethodOptions
from minillm.variants import changed, refuse

# the options of the SPSA estimates, and what reads each (the paper's SPSAOptions in method.py)
SPSA_READERS = {
    "eps": "the weight-space SPSA estimate",
    "perturb": "the weight-space SPSA estimate",
    "restore": "the weight-space SPSA estimate",
    "directions": "an SPSA estimate (weights or gates) or estimator=coordinate (its streams)",
    "seed": "an SPSA estimate or gradient=noise",
}


class ControlOptions(MethodOptions):
    gradient: Literal["zo", "none", "noise", "backprop"] = "zo"  # zo: the paper's SPSA; the rest: controls

    @model_validator(mode="after")
    def _controls_read_no_spsa_option(self, info: ValidationInfo):
        if self.space != "weight" and self.gradient in ("none", "noise"):
            raise UserError(f"minillm option gradient={self.gradient} is a weight-space control (space=weight); in "
                            f"the {self.space} space it would score the gates by nothing or by chance")
        kinds = gradient_kinds(self.model_dump())
        weight_zo, gate_zo = kinds["fms"] == "zo", kinds["gates"] == "zo"
        reads = {"eps": weight_zo, "perturb": weight_zo, "restore": weight_zo, "directions": weight_zo or gate_zo,
                 "seed": weight_zo or kinds["fms"] == "noise" or (gate_zo and self.estimator == "spsa")}
        for name in changed(self, *SPSA_READERS):
            if not reads[name]:
                setting = ", ".join(f"{k}={getattr(self, k)}" for k in
                                    ("space", "gradient", "mask_groups", "fms_gradient", "estimator")
                                    if changed(self, k)) or "the defaults"
                raise refuse(self, name, f"is read only by {SPSA_READERS[name]}; with {setting} no such estimate runs "
                                         "and it would be ignored")
        return self


def gradient_kinds(o: dict) -> dict:
    """The gradient of each scored part: {"fms": the FMS gradient, or None where no group is scored by
    FMS (space=mask, mask_groups=all); "gates": the gates' gradient, or None in the weight space}."""
    fms_part = o["space"] != "mask" or o["mask_groups"] == "heads"
    fms = o["gradient"] if o["space"] == "weight" or o["fms_gradient"] == "same" else o["fms_gradient"]
    return {"fms": fms if fms_part else None, "gates": o["gradient"] if o["space"] != "weight" else None}


class GradFlags:
    """Within the block only `params` require grad (others' grads would cost memory for nothing)."""

    def __init__(self, model, params):
        self.model, self.params = model, {id(p) for p in params}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in self.params)
            p.grad = None

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.grad = None
            p.requires_grad_(flag)


class NoGradient:
    """ĝ ≡ 1 (FMS without gradient)."""

    def __init__(self, model, windows, members, options, seed):
        self.info = {"gradient": "none"}

    def of(self, name: str):
        return None


class NoiseGradient:
    """ĝ ~ N(0, I) per weight: a generator per Linear, so the draw does not depend on the visiting
    order (the CPU generator keeps 32 bits of its seed: the stream hashes seed and name together)."""

    def __init__(self, model, windows, members, options, seed):
        self.seed = seed
        self.info = {"gradient": "noise", "forwards": 0, "noise": "N(0, I) per weight, stream = (seed, Linear's name)"}
        self._shapes = {n: p.shape for n, p in model.named_parameters()}

    def of(self, name: str) -> torch.Tensor:
        key = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=4).digest()
        return torch.randn(self._shapes[name], generator=torch.Generator().manual_seed(int.from_bytes(key, "little")))


class BackpropGradient:
    """The true ∂L/∂W of the member weights `members` [(name, weight)]: one gradient per weight held."""

    def __init__(self, model, windows, members, options, seed):
        with GradFlags(model, [w for _, w in members]):
            loss = lm_loss.backprop_loss(model, windows, options["batch_size"])
            self._grads = {n: w.grad.detach().float() for n, w in members}  # the flags' exit clears .grad
        self.info = {"gradient": "backprop", "loss": loss, "forwards": 1, "backwards": 1}

    def of(self, name: str) -> torch.Tensor:
        return self._grads[name]


GRADIENTS = {"none": NoGradient, "noise": NoiseGradient, "backprop": BackpropGradient}
