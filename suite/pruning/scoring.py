"""The contract of a pruning method: score groups, nothing else (Wanda's `lib/prune.py` spirit).

A method is one module (in `baselines/` or `minillm/`) registered in `suite/methods.py`. It builds on
this engine package (`suite.pruning`: groups, the layer pass, statistics, the loss, compensation)
and imports nothing from the harness (`suite.*` outside `suite.pruning`) or another method. It has:

    NAME        the registry name, e.g. "wanda-sp"
    Options     its options: a `suite.pruning.options.MethodOptions` subclass (types, choices, ranges,
                and the combinations it refuses, declared once; `suite/pruning/options.py`)
    OPTIONS     `Options.defaults()`: {option: default} (every unknown of a paper is one of these)
    CALIBRATION None (data-free) or {"corpus", "nsamples", "seqlen", "source"}: its paper's defaults
    SELECTION   {"scope": "layer"|"global", "layers": "all" | [start_frac, end_frac)}: defaults
    score(model, windows, group_sets, options, seed) -> Scoring

`score` receives options already checked by `checked_options` (the pipeline checks them first).
`group_sets` lists every layer's head and channel GroupSets (architectures.py); `windows` is the
[nsamples, seqlen] calibration batch (None for data-free methods). Selection, slicing, budget and
saving are shared (select.py, plan.py, saving.py). A method may return `compensate`, run after
slicing with the plan (FLAP's bias compensation is the only one).

Offloaded weights (`--offload`): a layer's weights are meta tensors except while it is resident.
A method that reads or changes weights outside the layer pass iterates
`layerwise.resident_sets(group_sets)` instead of `group_sets` (or uses
`with layerwise.resident_layer(model, i):`); changes made there are written back.

A method may also be SEQUENTIAL (pruned layer by layer, as FLAP's `prune_wanda_sp` and SparseGPT /
Wanda's loops: layer l+1's statistics are gathered on the hidden states of the already PRUNED
layers 0..l). It then defines:

    sequential(options) -> bool
                true: `suite.pipeline.prune` runs `suite.pruning.sequential.prune_sequentially` (the shared
                layer loop on `suite.pruning.layerwise.LayerPass`) instead of `score`; false: `score` as
                above (one-shot; a grid entry without a label is then named "NAME (one-shot)" and
                the record says `variant: one-shot`). Sequential pruning needs scope "layer".
    STATISTICS  "output" (only the output projections' inputs are hooked: o_proj / down_proj and
                their OPT / BLOOM equivalents) or "all" (every member Linear; default)
    score_layer(group_sets, stats, options) -> {(layer, kind): scores}
                scores of ONE layer's groups: `group_sets` are that layer's head and channel sets,
                `stats[(layer, member name)]` its members' `activations.InputStats` over all
                calibration tokens (float64, [in_features] each); scores 1-D of length gs.count,
                higher = more important. The shared per-layer budget (`select.layer_scope_allocation`, fixed
                from shapes before layer 0) removes each kind's lowest-scoring groups; the layer is
                sliced and its outputs recomputed before the next layer is scored.

A method may also be SELF-PRUNING (it re-scores the model between removals, as Bonsai's rounds of
`prune_frac`): it defines

    prune(model, windows, options, ratio, *, layers, head_mode, allow_empty, round_to, seed)
                -> (Selection, Scoring)
                `suite.pipeline.prune` calls it instead of `score` + `select`; it slices the model
                in place through `suite.pruning.iterative.prune_in_rounds` (each round's plan applied
                by `plan.apply_plan`) and returns the Selection in the entry numbering with the
                parameters it removed (the pipeline checks them against the model). `bonsai` is the
                example (`baselines/bonsai.py`).

`wanda-sp` is the example (`baselines/wanda_sp.py`: sequential by default, `sequential=false` for
the one-shot variant, whose `score` calls the same `score_layer` on dense statistics).

A method may instead TRANSFORM the model itself, removing parameters that are not heads or channels
(SliceGPT deletes directions of the residual stream). It then defines, in place of `score`:

    transform(model, windows, ratio, options, seed, round_to) -> Transform
                changes `model` in place so that it keeps as close to (1 − ratio) of ALL its
                parameters as the method's own unit allows (`round_to`: the width's multiple,
                None: 1) and reports what it removed. `suite.pipeline.prune` then skips
                selection and slicing (there are no groups to select): the scope and the layer
                range do not apply, and a model so transformed is not pruned again by another
                method (its checkpoint format holds one kind of change).

`slicegpt` is the example (`baselines/slicegpt.py`, on the engine's `suite/pruning/rotation.py`).

A method may instead choose WHOLE DECODER LAYERS (depth pruning: ShortGPT, SLEB). Its SELECTION
then says ``"unit": "layers"`` and it defines, instead of `score`:

    score_layers(model, windows, budget, options, seed) -> Scoring
                `budget` (`select.DepthBudget`) says how many layers to remove (`budget.count`,
                fixed from the ratio, the layer range and the rule `nearest` | `not_above` before
                scoring: a greedy method stops there) and which may go (`budget.layers`);
                scores {(layer, "layers"): one-element tensor} for every layer of the range,
                higher = more important; `select.select_layers` removes the `count` lowest and
                `plan.apply_plan` deletes them (`plan.drop_layers`).

`shortgpt` (a score per layer, one pass) and `sleb` (a greedy order) are the examples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from suite.pruning.errors import UserError



@dataclass
class Scoring:
    scores: dict  # (layer, "heads"|"channels"|"layers") -> 1-D tensor, higher = more important
    compensate: Callable | None = None  # compensate(model, plan) after slicing
    info: dict = field(default_factory=dict)  # method diagnostics recorded with the result


@dataclass
class Transform:
    """What a transforming method (`transform`, above) did: parameters it aimed to remove and removed
    (net, as counted on the model before and after), and its diagnostics for the record."""

    target_removed: int
    removed: int
    info: dict = field(default_factory=dict)


def transforms(method) -> bool:
    """Whether the method module transforms the model itself (`transform`) instead of scoring groups."""
    return callable(getattr(method, "transform", None))


def checked_options(method, given: dict | None, scope: str | None = None, name: str | None = None) -> dict:
    """The method module's options: its `Options` defaults overridden by `given`, validated
    (`suite.pruning.options.parse`), as a plain dict. The one entry point: the CLI, the grid config and
    `suite.pipeline.prune` call it (so the Python API refuses what the CLI refuses).

    `scope` ("layer" | "global" | None: the method's default) reaches the combination checks;
    `name` (default `method.NAME`) names the method in the messages. Raises UserError (one line)
    for an unknown key, an ill-typed value, a value outside its choices or range, or a combination
    the method would ignore; needs no model, so commands call it before loading one.
    """
    from suite.pruning.options import parse

    return parse(method.Options, name or method.NAME, given, scope)


def group_tensor(values: torch.Tensor, gs, member) -> torch.Tensor:
    """Per-element values of the member's whole Linear, laid out like `gs.weight_blocks(member)`:
    [count, width, other] (only the member's section of a fused Linear)."""
    v = values if member.dim == 0 else values.t()
    return v.narrow(0, member.offset, gs.count * member.width).reshape(gs.count, member.width, v.shape[1])


def standardise(x: torch.Tensor) -> torch.Tensor:
    """z-score (x − mean) / std over all of `x` (unbiased std, as torch.std in FLAP), computed in
    float64 and returned in x's dtype; all zeros where the std is 0 or not finite.

    FLAP Eq. 5 (An et al. 2024; github CASIA-IVA-Lab/FLAP `lib/prune.py::prune_flap`, structure
    AL-AM: `(metric - mean) / std` per module before the global ranking). Used by `flap` (float64
    metrics: exactly FLAP's arithmetic) and by minillm's `normalize=standard|unit`.
    """
    x64 = x.double()
    std = x64.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return ((x64 - x64.mean()) / std).to(x.dtype)


def removes_layers(method) -> bool:
    """Whether the method chooses whole decoder layers (SELECTION unit "layers")."""
    return getattr(method, "SELECTION", {}).get("unit") == "layers"


def check_selection(method, name: str, scope=None, layers=None, head_mode: str | None = None,
                    allow_empty: bool = False, round_to=None, depth_rule=None) -> None:
    """UserError (one line) for a selection setting the method's kind never reads, before any model
    is loaded: `suite prune`'s flags, a grid entry's options and `suite.pipeline.prune` alike.
    A transforming method (`transform`) selects no groups: no scope, layer range, kv-group head mode
    or allow_empty; a method removing whole layers: no `layer` scope, round_to, allow_empty or
    kv-group head mode; `depth_rule` is for those alone. None / False / "q-head": not given."""
    if depth_rule is not None and not removes_layers(method):
        raise UserError(f"depth_rule applies to methods that remove whole layers; {name} removes heads "
                        "and channels")
    if transforms(method):
        ignored = [flag for flag, given in (("--scope", scope is not None), ("--layers", layers is not None),
                                           ("--head-mode kv-group", head_mode == "kv-group"),
                                           ("--allow-empty", allow_empty)) if given]
        if ignored:
            raise UserError(f"{name} transforms the whole model (no groups to select): {ignored[0]} does not "
                            "apply; leave it out")
    if removes_layers(method):
        ignored = [flag for flag, given in (("--scope layer", scope == "layer"), ("--round-to", round_to),
                                           ("--allow-empty", allow_empty),
                                           ("--head-mode kv-group", head_mode == "kv-group")) if given]
        if ignored:
            raise UserError(f"{name} removes whole layers: {', '.join(ignored)} would do nothing; leave it out")
