"""Calibrate step of the flow: input-activation statistics of every prunable Linear.

One pass of the model over the calibration windows with forward pre-hooks; for each Linear that
holds a group member we accumulate, per input feature j over all N calibration tokens, in float64:
    sum x_j, sum x_j^2, sum |x_j|.
From these: Wanda's ||X_j||_2 (Sun et al. 2023, Eq. 1), FLAP's fluctuation (sample variance of
x_j, An et al. 2024, Eq. 4) and its baseline E[x_j] (bias compensation, Eq. 6), and mean |x_j|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.architectures import GroupSet, decoder_and_head


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


def input_stats(model, windows: torch.Tensor, group_sets: list[GroupSet], batch_size: int = 1,
                progress=None) -> dict:
    """Stats keyed by (layer, member name) for every member Linear of `group_sets`."""
    stats, handles = {}, []
    seen = set()
    for gs in group_sets:
        for member in gs.members:
            key = (gs.layer, member.name)
            if key in seen:
                continue
            seen.add(key)
            linear = gs.linear(member)
            acc = {"n": 0, "sum": 0.0, "sum_sq": 0.0, "sum_abs": 0.0}
            stats[key] = acc

            def hook(module, args, acc=acc):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                acc["n"] += x.shape[0]
                acc["sum"] = acc["sum"] + x.sum(0)
                acc["sum_sq"] = acc["sum_sq"] + (x * x).sum(0)
                acc["sum_abs"] = acc["sum_abs"] + x.abs().sum(0)

            handles.append(linear.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    # no prunable Linear reads the logits: run the decoder only, never the [batch, seq, vocab] tensor
    base, _ = decoder_and_head(model)
    decoder = model if base is None else base
    try:
        with torch.inference_mode():
            starts = range(0, len(windows), batch_size)
            for start in (progress(starts) if progress else starts):
                decoder(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: InputStats(**v) for k, v in stats.items()}
