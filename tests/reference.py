"""The independent reference of every slicing test: the UNSLICED model with the heads/channels a plan
removes zeroed at the input of the out-projections.

Masks are built from the architecture's raw attributes (the attention's head_dim, column ranges of
o_proj / down_proj and their OPT / BLOOM names), not from the suite's GroupSet/gates code, so a
slicing bug cannot hide behind a shared helper. For BLOOM this is what proves the ALiBi slopes
follow the kept heads.
"""
import torch

from suite.pruning.architectures import adapter_for

LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")  # LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3
OUT_PROJ = {"opt": ("self_attn.out_proj", "fc2"), "bloom": ("self_attention.dense", "mlp.dense_4h_to_h")}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def masked_logits(model, plan, ids) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the unsliced `model` (any dtype) with `plan`'s removed heads and
    channels zeroed at the out-projections' input."""
    attn_out, mlp_out = OUT_PROJ.get(model.config.model_type, LLAMA_LIKE)
    handles = []
    for lp, layer in zip(plan.layers, adapter_for(model).layers(model)):
        hd = adapter_for(model).attn(layer).head_dim
        for name, kept, width in ((attn_out, lp.heads, hd), (mlp_out, lp.channels, 1)):
            linear = layer.get_submodule(name)
            mask = torch.zeros(linear.in_features, dtype=linear.weight.dtype)
            for g in kept:
                mask[g * width:(g + 1) * width] = 1
            handles.append(linear.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def logits(model, ids) -> torch.Tensor:
    """Logits [batch, seq, vocab] of `model` on `ids`, without autograd."""
    with torch.no_grad():
        return model(ids).logits
