"""Calibrate step of the flow: input-activation statistics of every prunable Linear.

One layer-by-layer pass over the calibration windows (`layerwise.LayerPass`) with forward
pre-hooks; for each Linear that holds a group member we accumulate, per input feature j over all N calibration tokens, in float64:
    sum x_j, sum x_j^2, sum |x_j|.
From these: Wanda's ||X_j||_2 (Sun et al. 2023, Eq. 1), FLAP's fluctuation (sample variance of
x_j, An et al. 2024, Eq. 4) and its baseline E[x_j] (bias compensation, Eq. 6), and mean |x_j|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.architectures import GroupSet
from minillm.layerwise import LayerPass


@dataclass
class InputStats:
    n: int
    sum: torch.Tensor
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda)."""
        return self.sum_sq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def var(self) -> torch.Tensor:
        """Unbiased sample variance of x_j over calibration tokens (FLAP's fluctuation)."""
        return (self.sum_sq - self.n * self.mean ** 2) / (self.n - 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / self.n


def _members(group_sets) -> dict:
    """{(layer, member name): Linear} for every member of `group_sets`, each Linear once."""
    out = {}
    for gs in group_sets:
        for member in gs.members:
            out.setdefault((gs.layer, member.name), gs.linear(member))
    return out


def layer_stats(lp: LayerPass, i: int, group_sets) -> tuple[dict, list]:
    """Layer i's input statistics of the members of `group_sets` (all in layer i) from the pass's
    current hidden states, and the layer's outputs (ready for `lp.advance`)."""
    accs, handles = {}, []
    for key, linear in _members(group_sets).items():
        acc = accs[key] = {"n": 0, "sum": 0.0, "sum_sq": 0.0, "sum_abs": 0.0}

        def hook(module, args, acc=acc):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc["n"] += x.shape[0]
            acc["sum"] = acc["sum"] + x.sum(0)
            acc["sum_sq"] = acc["sum_sq"] + (x * x).sum(0)
            acc["sum_abs"] = acc["sum_abs"] + x.abs().sum(0)

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        outputs = lp.forward(i)
    finally:
        for h in handles:
            h.remove()
    return {k: InputStats(**v) for k, v in accs.items()}, outputs


def input_stats(model, windows: torch.Tensor, group_sets: list[GroupSet], batch_size: int = 1,
                hidden_device=None) -> dict:
    """Stats keyed by (layer, member name) for every member Linear of `group_sets`, on the dense model.

    Runs layer by layer (`layerwise.LayerPass`: one layer resident, the [batch, seq, vocab] logits
    never computed) up to the last layer `group_sets` mention; equal to one whole-model forward
    with hooks on those Linears (tests/test_layerwise.py)."""
    by_layer = {}
    for gs in group_sets:
        by_layer.setdefault(gs.layer, []).append(gs)
    stats = {}
    if not by_layer:
        return stats
    lp = LayerPass(model, windows, batch_size, hidden_device=hidden_device)
    for i in range(max(by_layer) + 1):
        with lp.resident(i):
            if i in by_layer:
                part, outputs = layer_stats(lp, i, by_layer[i])
                stats.update(part)
            else:
                outputs = lp.forward(i)
        lp.advance(outputs)
    return stats
