"""Sequential pruning: score, select and slice one decoder layer, then compute the next layer's inputs.

FLAP's `lib/prune.py::prune_wanda_sp` (and SparseGPT / Wanda's sequential loops) prune layer l and
gather layer l+1's calibration statistics on the PRUNED model's hidden states, so later layers are
chosen knowing what earlier removals did. Here, for every method whose `sequential(options)` is
true:

1. the ``layer`` scope's allocation (per-layer removal counts) is fixed from the model's shapes alone
   (`select.layer_scope_allocation`: the same counts one-shot selection gives, so the budget is the same);
2. a `layerwise.LayerPass` carries the calibration hidden states; for each prunable layer i, the
   method's `score_layer(group_sets_i, stats_i, options)` scores layer i's groups from the input
   statistics of its members (`STATISTICS`: "output" = the output projections only, "all"),
   the allocation removes each kind's lowest-scoring groups, the layer is sliced (`plan.apply_plan`
   with a plan that changes layer i only) and its outputs recomputed for layer i+1.

Within a layer, the attention's and the MLP's statistics come from the same (unpruned) layer
forward, as in FLAP's loop (it hooks o_proj and down_proj, runs the layer, then prunes both).
"""
from __future__ import annotations

import copy

from suite.pruning.activations import layer_stats
from suite.pruning.architectures import GroupSet, output_only
from suite.pruning.errors import UserError
from suite.pruning.layerwise import LayerPass
from suite.pruning.plan import apply_plan, full_plan, plan_from_keep
from suite.pruning.scoring import Scoring
from suite.pruning.select import Selection, layer_scope_allocation


def statistics_sets(method, group_sets) -> list[GroupSet]:
    """The group sets whose members' inputs the method reads (`STATISTICS`: output | all)."""
    return output_only(group_sets) if getattr(method, "STATISTICS", "all") == "output" else group_sets


def prune_sequentially(model, windows, method, options: dict, ratio: float, layers, head_mode: str = "q-head",
                       allow_empty: bool = False, round_to: int | None = None, batch_size: int = 1,
                       hidden_device=None) -> tuple[Selection, Scoring]:
    """Prune `model` in place layer by layer; returns the selection (plan in the numbering the model
    had on entry, the allocation's counts) and the scoring (scores of every layer of the layer range
    `layers`, taken on the hidden states of the already-pruned earlier layers).

    Raises UserError for an unreachable budget or a method that gives ill-shaped scores."""
    allocation = layer_scope_allocation(model, ratio, layers=layers, head_mode=head_mode, allow_empty=allow_empty,
                                        round_to=round_to)
    by_layer = {}
    for gs in allocation.sets:
        by_layer.setdefault(gs.layer, []).append(gs)
    entry_plan = full_plan(model)            # the numbering on entry; filled layer by layer
    lp = LayerPass(model, windows, batch_size, hidden_device=hidden_device)
    scores, tokens = {}, lp.tokens
    for i in range(max(by_layer) + 1):
        with lp.resident(i):
            if i not in by_layer:
                lp.advance(lp.forward(i))
                continue
            sets = by_layer[i]
            stats, outputs = layer_stats(lp, i, statistics_sets(method, sets))
            part = method.score_layer(sets, stats, options)
            keep = {}
            for gs in sets:
                key = (gs.layer, gs.kind)
                if key not in part:
                    raise UserError(f"{method.NAME} gave no scores for layer {i} {gs.kind}")
                scores[key] = part[key]
                keep[key] = allocation.keep(gs, part[key])
            if any(len(k) < gs.count for k, gs in zip(keep.values(), sets)):
                step = plan_from_keep(model, keep, head_mode=head_mode, allow_empty=allow_empty)
                entry_plan.layers[i] = copy.deepcopy(step.layers[i])  # layer i: still its entry numbering
                apply_plan(model, step)      # only layer i changes; composes with a carried plan
                outputs = lp.forward(i)      # layer i+1 sees the pruned layer's outputs
        lp.advance(outputs)
    entry_plan.head_mode, entry_plan.allow_empty = head_mode, allow_empty
    selection = Selection(plan=entry_plan, target_removed=allocation.target_removed, removed=allocation.removed,
                          total=allocation.total)
    return selection, Scoring(scores, info={"tokens": tokens, "sequential": True})

