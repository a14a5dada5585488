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

from suite.pruning.architectures import GroupSet
from suite.pruning.layerwise import LayerPass


@dataclass
class InputStats:
    n: int
    sum: torch.Tensor
    sum_sq: torch.Tensor
    sum_abs: torch.Tensor
    streaming: "StreamingVariance | None" = None  # FLAP's per-window estimator, when asked for

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


class StreamingVariance:
    """FLAP's streaming fluctuation estimate (`lib/layerwrapper.py::BiasGPT.add_batch`, metric WIFV),
    fed one calibration window at a time as FLAP's `prune_flap` does.

    FLAP keeps a running mean of the window means, m_j after window j, and a running value F_j with
    F_1 = 0 (the first window's contribution is discarded) and, for j >= 2,

        F_j = F_{j-1} · (j-2)/(j-1) + S_j / j,    S_j = sum_t (x_{j,t} - m_j)^2

    (its `old_baseline_inp` is the same tensor as `baseline_inp`, updated in place before use, so
    the deviations are from m_j, the mean INCLUDING window j). Unrolled, after K windows

        F_K = sum_{j=2..K} (j-1) / (j (K-1)) · S_j

    i.e. window j weighted by (j-1)/(j(K-1)) around the running mean m_j; not the token variance
    (`InputStats.var`). Kept here in float64 (FLAP: the model's dtype). A micro-batch of b windows
    is split into its windows in order, so the value does not depend on the batch size (FLAP's
    add_batch with b > 1 windows would weight the batch's mean by 1/(n+b), not b/(n+b)).
    """

    def __init__(self):
        self.windows, self.mean, self.total = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        """x: [windows, seq, features] (or [seq, features]: one window), any float dtype."""
        x = x.detach().double()
        for window in (x if x.dim() == 3 else x[None]):
            window = window.reshape(-1, window.shape[-1])
            j = self.windows = self.windows + 1
            self.mean = self.mean * (j - 1) / j + window.mean(0) / j
            if j >= 2:
                self.total = self.total + (j - 1) / j * ((window - self.mean) ** 2).sum(0)

    @property
    def value(self) -> torch.Tensor:
        """F_K, [features] float64 (zeros after a single window, as FLAP)."""
        if self.windows < 2:
            return torch.zeros_like(self.mean) if torch.is_tensor(self.mean) else torch.zeros(0)
        return self.total / (self.windows - 1)


def _members(group_sets) -> dict:
    """{(layer, member name): Linear} for every member of `group_sets`, each Linear once; none of a set
    with no group (an already-emptied block: a dropped attention never calls its out-projection)."""
    out = {}
    for gs in group_sets:
        for member in gs.members if gs.count else ():
            out.setdefault((gs.layer, member.name), gs.linear(member))
    return out


def layer_stats(lp: LayerPass, i: int, group_sets, streaming: bool = False) -> tuple[dict, list]:
    """Layer i's input statistics of the members of `group_sets` (all in layer i) from the pass's
    current hidden states, and the layer's outputs (ready for `lp.advance`). `streaming`: also
    FLAP's per-window estimator (`InputStats.streaming`, a `StreamingVariance`)."""
    accs, handles = {}, []
    for key, linear in _members(group_sets).items():
        acc = accs[key] = {"n": 0, "sum": 0.0, "sum_sq": 0.0, "sum_abs": 0.0}
        if streaming:
            acc["streaming"] = StreamingVariance()

        def hook(module, args, acc=acc):
            if streaming:
                acc["streaming"].add(args[0])
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
                hidden_device=None, streaming: bool = False) -> dict:
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
                part, outputs = layer_stats(lp, i, by_layer[i], streaming=streaming)
                stats.update(part)
            else:
                outputs = lp.forward(i)
        lp.advance(outputs)
    return stats
