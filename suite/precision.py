"""Half precision: the `--dtype` option every model-loading command shares, and casting weights only.

Why weights only. `model.to(dtype=torch.bfloat16)` casts every floating buffer too, among them
LLaMA's rotary `inv_freq` (θ_i = base^(-2i/d)); the rotary embedding then computes its angles
`position · θ_i` from a bf16 θ and is off by 0.16 rad at position 127 and 1.25 rad at 1023 (fp16:
0.03 / 0.12 rad at 127 / 511). `transformers.from_pretrained(dtype=...)` keeps such buffers in
fp32 (they are built at init in fp32, and the rotary forward computes in fp32); the models this
suite builds in code are cast with `cast_weights`, which leaves buffers alone. Moving to a device
uses `model.to(device=...)` only, which never changes a dtype.
"""
from __future__ import annotations

import torch

from suite.pruning.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype among those) -> torch.dtype; UserError otherwise."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def add_dtype_argument(parser) -> None:
    """The shared `--dtype` option of the commands that load a model (prune, eval, zo-diagnose, info)."""
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weights' dtype (default float32); rotary and other buffers stay float32")


def cast_weights(model, dtype: torch.dtype):
    """Cast the floating parameters of `model` to `dtype` in place; buffers keep their dtype.

    Returns the model. Tied parameters stay tied (each Parameter object is cast once, in place).
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model
