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
    or require grad (backprop w.r.t. gates). The gate multiplies in fp32 whatever the activation
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
            scale = gate.to(device=x.device, dtype=torch.float32).repeat_interleave(width)
            return ((x.float() * scale).to(x.dtype),) + tuple(args[1:])

        handles.append(gs.linear(gs.output).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
