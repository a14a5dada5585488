"""MINI-LLM's variants: this project's additions around the paper's Algorithm 1 (`minillm/method.py`).

Each module declares its options as a pydantic mixin (`suite.pruning.options.MethodOptions`) with the
validator that refuses the combinations it would ignore; `minillm.method.Options` composes them.

  controls.py       gradient=none | noise | backprop: the ablation and control gradients
  gate_space.py     space=mask: one gate per group (blockwise, mask_groups, estimator=coordinate)
  allocation.py     space=layer: per-layer pruning-ratio allocation from sub-block sensitivities
  normalization.py  normalize=standard | unit: z-scores for a global ranking (FLAP Eq. 5)

(`compensate=true`, FLAP's bias compensation, is `suite/pruning/compensation.py`.)
"""
from __future__ import annotations

from suite.pruning.errors import UserError


def changed(options, *names: str) -> list[str]:
    """Those of `names` whose value in `options` (the composed Options) differs from the default:
    a default given explicitly changes nothing and is accepted."""
    fields = type(options).model_fields
    return [name for name in names if getattr(options, name) != fields[name].default]


def refuse(options, name: str, why: str) -> UserError:
    """The one-line error for option `name` (its value from `options`) that would be ignored: `why`."""
    value = getattr(options, name)
    value = str(value).lower() if isinstance(value, bool) else value
    return UserError(f"minillm option {name}={value} {why}")
