"""Multiplicative gates on groups' feature maps: x[..., cols of group g] *= gate[g] at the input of
the out-projection (o_proj / out_proj / dense, down_proj / fc2 / dense_4h_to_h).

Gate 0 is exactly "remove the group" (the masked reference in the exactness tests); gates near 1
are what MINI-LLM's `mask` space differentiates (the gradient w.r.t. a group's gate is the
first-order change of the loss when its feature map is scaled: the feature-map sensitivity).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from suite.pruning.architectures import GroupSet


@contextmanager
def gated(group_sets: list[GroupSet], gates: list[torch.Tensor]):
    """Within the block, group g of `group_sets[i]` has its feature map multiplied by `gates[i][g]`.

    The gate tensors are read at every forward, so they may be edited in place (SPSA perturbation)
    or require grad (backprop w.r.t. gates). A 2-D gate [m, count] gates the batch in m equal
    consecutive blocks of rows, block r by gates[i][r]: m gated copies of the model in one forward
    (the batch a multiple of m; Bonsai's masks, `baselines/bonsai.py`). The gate multiplies in fp32 whatever the activation
    dtype, so a perturbation 1 ± ε is ±ε (to fp32 precision) and the product is rounded once;
    memory: one fp32 copy of the out-projection's input while it runs.
    """
    handles = []
    for gs, gate in zip(group_sets, gates):
        width = gs.output.width

        def hook(module, args, gate=gate, width=width):
            # the product in fp32 (then one rounding to the activation dtype): casting the gate
            # itself to bf16 would turn 1 ± 0.01 into 1.0078 / 0.9883 for every element alike
            x = args[0]
            scale = gate.to(device=x.device, dtype=torch.float32).repeat_interleave(width, dim=-1)
            if scale.dim() == 2:  # [m, columns]: one row of gates per block of x.shape[0] // m rows
                scale = scale.repeat_interleave(x.shape[0] // scale.shape[0], dim=0)
                scale = scale.view(x.shape[0], *([1] * (x.dim() - 2)), scale.shape[-1])
            return ((x.float() * scale).to(x.dtype),) + tuple(args[1:])

        handles.append(gs.linear(gs.output).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
