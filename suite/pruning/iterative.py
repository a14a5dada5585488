"""Iterative pruning: a method that chooses its groups itself, round after round, on the model as
the earlier rounds physically left it.

Some methods re-score the pruned model between removals (Bonsai: `ldery/Bonsai` `main.py::main`,
rounds of `prune_frac` until the target sparsity; LLM-Pruner's iterative steps). They cannot give
one set of scores for `select.select`, and they are not layer-sequential (`sequential.py`): every
round looks at the whole model. Such a method defines (`scoring.py`, "SELF-PRUNING")

    prune(model, windows, options, ratio, *, layers, head_mode, allow_empty, round_to, seed)
        -> (Selection, Scoring)

and does its rounds with `prune_in_rounds`: each round returns a `Plan` in the model's CURRENT
numbering (built with `plan.plan_from_keep` or `select.select`), which `plan.apply_plan` slices
exactly; the loop returns the whole selection as one plan in the numbering the model had on entry,
with the parameters actually removed, so `suite.pipeline.prune` records and checks it like any other.
"""
from __future__ import annotations

from typing import Callable

from suite.pruning.layerwise import parameter_count
from suite.pruning.plan import LayerPlan, Plan, apply_plan, carried_plan, full_plan
from suite.pruning.select import Selection


def _in_entry_numbering(entry: Plan, final: Plan, head_mode: str, allow_empty: bool) -> Plan:
    """`final` (original numbering) rewritten in the numbering of a model sliced by `entry`."""
    layers = []
    for e, f in zip(entry.layers, final.layers, strict=True):
        pos = lambda kept, idx: [kept.index(i) for i in idx]  # noqa: E731
        kv = None if f.kv_heads is None or e.kv_heads is None else pos(list(e.kv_heads), f.kv_heads)
        layers.append(LayerPlan(heads=pos(list(e.heads), f.heads), channels=pos(list(e.channels), f.channels),
                                kv_heads=kv))
    return Plan(arch=entry.arch, layers=layers, head_mode=head_mode, allow_empty=allow_empty)


def prune_in_rounds(model, next_round: Callable[[object, int], Plan | None], ratio: float,
                    head_mode: str = "q-head", allow_empty: bool = False) -> Selection:
    """Prune `model` in place round by round; returns the Selection of all rounds together.

    `next_round(model, round_index)` returns the round's plan (current numbering) or None to stop;
    each plan is applied at once (`apply_plan`, exact slicing), so the next call sees the sliced
    model. `ratio` only fills `Selection.target_removed` (round(ratio · parameters on entry)): the
    stopping rule is the method's. Selection.removed is what the rounds removed, counted
    (`layerwise.parameter_count`), and Selection.plan maps the entry model to the result.
    Raises what `apply_plan` raises for an invalid plan (UserError)."""
    entry = carried_plan(model)
    total = parameter_count(model)
    index = 0
    while True:
        plan = next_round(model, index)
        if plan is None:
            break
        apply_plan(model, plan)
        index += 1
    final = carried_plan(model)
    if final is None:  # no round pruned anything
        plan = full_plan(model)
    elif entry is None:  # the entry model was unsliced: its numbering is the original one
        plan = Plan(arch=final.arch, layers=final.layers, head_mode=head_mode, allow_empty=allow_empty)
    else:
        plan = _in_entry_numbering(entry, final, head_mode, allow_empty)
    plan.head_mode, plan.allow_empty = head_mode, allow_empty
    return Selection(plan=plan, target_removed=round(ratio * total), removed=total - parameter_count(model),
                     total=total)
