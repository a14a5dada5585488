"""Select step of the flow: group scores + a parameter budget -> a pruning plan.

`ratio` is the fraction of the model's TOTAL parameter count (embeddings included, as LLM-Pruner
reports) to remove: the budget. The layer range (`layers`, default all) says which decoder layers
may be pruned. The budget is split into an allocation (`Allocation`: how many groups each layer of
the range removes, per kind) in one of two selection scopes:

- ``layer`` (MINI-LLM Algorithm 1, LLM-Pruner): every layer of the range removes the same fraction p
  of its heads and of its channels, its lowest-scoring ones; p is solved so the total hits the target.
  Head counts are integers, so channels absorb the rounding: the achieved count is within one
  channel's parameters of the target. Optional allocation weights w_i make layer i remove
  p_i = min(s·w_i, p_max) (MINI-LLM `layer` space: forward-only sensitivities allocate ratios).
- ``global`` (FLAP's adaptive structure search, LLM-Pruner's global ranking): heads and channels
  of all layers of the range compete in one ranking, the lowest-scoring removed first until the
  removed parameters reach the target (each group weighted by its parameter count). Scores must
  be comparable across layers (FLAP standardises them).

GQA in ``q-head`` mode removes the same number of q heads from every kv group of a layer (the
lowest-scoring within each group), so `repeat_kv` stays valid. Each layer of the range keeps at least
one head group and one channel unless ``allow_empty``.

``round_to`` (off by default; LLM-Pruner's option, torch-pruning's `round_to`): every pruned layer
keeps a multiple of `round_to` MLP channels (the nearest multiple to the budget's count, at least
one multiple, at most all), so half-precision matmuls get aligned widths (tensor cores want
multiples of 8, or 64 for best speed). Heads are not rounded (a head is head_dim wide already).
The achieved ratio then differs from the target by up to round_to/2 channels per layer; the
selection reports what it removed. torch-pruning rounds the kept count up, and a count already a
multiple up by one more multiple; this rounds to the nearest (a deliberate difference).

Whole layers (depth pruning; a method whose SELECTION unit is "layers", `scoring.py`): the budget
is a NUMBER of decoder layers (`depth_budget`, rule ``nearest`` or ``not_above`` the target), and
`select_layers` removes that many lowest-scoring layers of the layer range (plan.removed_layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.pruning.architectures import adapter_for, all_group_sets
from suite.pruning.errors import UserError
from suite.pruning.layerwise import parameter_count
from suite.pruning.plan import Plan, full_plan, plan_from_keep

Scores = dict  # (layer, "heads"|"channels") -> 1-D tensor, one score per group (higher = keep)


@dataclass
class Selection:
    plan: Plan
    target_removed: int
    removed: int
    total: int


def layer_range(n_layers: int, skip_first: int = 0, skip_last: int = 0) -> list[int]:
    """The layer range: indices of the layers that may be pruned, all but the first `skip_first` and
    the last `skip_last` of `n_layers` (LLM-Pruner's `block_attention_layer_start/end`)."""
    return list(range(skip_first, n_layers - skip_last))


def parse_layer_range(spec, n_layers: int) -> list[int]:
    """The layer range (indices of the layers that may be pruned) from `--layers` / a grid's `layers` /
    a method's SELECTION["layers"]: 'all' | [start_frac, end_frac] (proportions of depth, as LLM-Pruner's
    4..30 of 32) | 'a:b' (indices, or fractions with a '.') | [i, j, ...]. Raises UserError for another form."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        if ":" not in spec:
            raise UserError(f"layers must be 'all', 'start:end' or a list, got {spec!r}")
        a, b = spec.split(":")
        try:
            lo, hi = float(a or 0), float(b or n_layers)
        except ValueError:
            raise UserError(f"layers must be 'all', 'start:end' or a list, got {spec!r}") from None
        if lo < 1 and hi <= 1 and ("." in a or "." in b):
            return layer_range(n_layers, round(lo * n_layers), n_layers - round(hi * n_layers))
        return list(range(int(lo), min(int(hi), n_layers)))
    spec = list(spec)
    if len(spec) == 2 and all(isinstance(v, float) for v in spec):
        return layer_range(n_layers, round(spec[0] * n_layers), n_layers - round(spec[1] * n_layers))
    return sorted(int(i) for i in spec)


def _units(gs, head_mode: str, nkv: int) -> int:
    """Head groups are removed in units of `nkv` q heads in GQA q-head mode (one per kv group)."""
    return nkv if gs.kind == "heads" and head_mode == "q-head" and nkv != gs.count else 1


def _lowest(gs, scores: torch.Tensor, n_remove: int, unit: int) -> list[int]:
    """Indices of kept groups after removing the `n_remove` lowest-scoring ones (per kv group if unit>1)."""
    if unit == 1:
        order = torch.argsort(scores.double(), stable=True)
        removed = set(order[:n_remove].tolist())
    else:  # q-head GQA: n_remove//unit lowest q heads within each kv group
        per, k = gs.count // unit, n_remove // unit
        removed = set()
        for j in range(unit):
            block = scores[j * per:(j + 1) * per].double()
            removed |= {j * per + int(i) for i in torch.argsort(block, stable=True)[:k]}
    return [g for g in range(gs.count) if g not in removed]


@dataclass
class Allocation:
    """The budget allocated over the layer range: how many groups each (layer, kind) removes, fixed
    before any group is chosen.

    counts: (layer, kind) -> groups to remove; units: (layer, kind) -> removal unit (nkv q heads
    in GQA q-head mode, else 1); sets: the GroupSets the counts refer to; target_removed, removed,
    total: parameters (the budget, what the counts remove, the model's total)."""
    counts: dict
    units: dict
    sets: list
    target_removed: int
    removed: int
    total: int

    def keep(self, gs, scores: torch.Tensor) -> list[int]:
        """Kept group indices of `gs`: its count of lowest `scores` removed (per kv group if GQA)."""
        key = (gs.layer, gs.kind)
        if scores.shape != (gs.count,):
            raise UserError(f"method gave no scores of shape ({gs.count},) for layer {gs.layer} {gs.kind}")
        return _lowest(gs, scores, self.counts[key], self.units[key])


def _allocate(model, ratio, scope, layers, head_mode, allow_empty, round_to, scores=None,
              allocation_weights=None) -> Allocation:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"ratio must be in (0, 1), got {ratio}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise UserError(f"round_to must be a positive integer, got {round_to!r}")
    if scope not in ("layer", "global"):
        raise UserError(f"unknown selection scope {scope!r}; choose layer or global")
    adapter = adapter_for(model)
    n_layers = len(adapter.layers(model))
    layers = layer_range(n_layers) if layers is None else sorted(layers)
    if not layers or not all(0 <= i < n_layers for i in layers):
        raise UserError(f"prunable layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}")
    total = parameter_count(model)  # tied weights once, offloaded ones by shape
    target = round(ratio * total)
    sets = all_group_sets(model, head_mode, layers=set(layers))  # already-empty blocks: none
    if not sets:
        raise UserError(f"nothing left to prune in layers {layers}: every attention and MLP block there is empty")
    if scores is not None:
        for gs in sets:
            s = scores.get((gs.layer, gs.kind))
            if s is None or s.shape != (gs.count,):
                raise UserError(f"method gave no scores of shape ({gs.count},) for layer {gs.layer} {gs.kind}")
    nkv = {i: adapter.num_kv_heads(adapter.layers(model)[i]) for i in layers}
    pick = _global_scope_counts if scope == "global" else _layer_scope_counts
    counts = pick(sets, scores, target, head_mode, nkv, allocation_weights, allow_empty)
    if round_to and round_to > 1:
        for gs in sets:
            n = counts[(gs.layer, gs.kind)]
            if gs.kind == "channels" and n > 0 and gs.count >= round_to:
                kept = min(gs.count, max(round_to, round((gs.count - n) / round_to) * round_to))
                counts[(gs.layer, gs.kind)] = gs.count - kept
    units = {(gs.layer, gs.kind): _units(gs, head_mode, nkv[gs.layer]) for gs in sets}
    removed = sum(counts[(gs.layer, gs.kind)] * gs.params_per_group() for gs in sets)
    return Allocation(counts, units, sets, target, removed, total)


def layer_scope_allocation(model, ratio: float, layers=None, head_mode: str = "q-head", allow_empty: bool = False,
                           round_to: int | None = None) -> Allocation:
    """The ``layer`` scope's allocation (per-layer removal counts), which depends on the model's shapes
    only: what sequential pruning (`suite.pruning.sequential`) fixes before it scores layer 0. Same counts as
    `select(..., scope="layer")` for any scores. `layers`: the layer range (None: all)."""
    return _allocate(model, ratio, "layer", layers, head_mode, allow_empty, round_to)


def select(model, scores: Scores, ratio: float, scope: str = "layer", layers=None,
           head_mode: str = "q-head", allocation_weights=None, allow_empty: bool = False,
           round_to: int | None = None) -> Selection:
    """Build the plan that removes `ratio` of all parameters given per-group `scores`.

    scores: (layer, "heads"|"channels") -> [group count] tensor; scope: "layer" | "global" (the
    selection scope); layers: the layer range (indices; None: all); allocation_weights: {layer: w_i}
    for the ``layer`` scope (MINI-LLM `space=layer`); `round_to`:
    each pruned layer keeps a multiple of this many MLP channels (module docstring). Raises UserError
    for a ratio outside (0, 1), an unknown scope, a bad layer range, ill-shaped scores or an
    unreachable target."""
    allocation = _allocate(model, ratio, scope, layers, head_mode, allow_empty, round_to, scores=scores,
                           allocation_weights=allocation_weights)
    keep = {(gs.layer, gs.kind): allocation.keep(gs, scores[(gs.layer, gs.kind)]) for gs in allocation.sets}
    plan = plan_from_keep(model, keep, head_mode=head_mode, allow_empty=allow_empty)
    return Selection(plan=plan, target_removed=allocation.target_removed, removed=allocation.removed,
                     total=allocation.total)


def _max_removable(gs, allow_empty, unit):
    return gs.count if allow_empty else gs.count - unit


def _layer_scope_counts(sets, scores, target, head_mode, nkv, allocation_weights, allow_empty):
    """Per-layer fraction p_i = min(s·w_i, 1) (w_i: the allocation weights, default 1): heads rounded,
    channels fill the remaining budget."""
    heads = [gs for gs in sets if gs.kind == "heads"]
    chans = [gs for gs in sets if gs.kind == "channels"]
    w = {gs.layer: 1.0 for gs in sets}
    if allocation_weights is not None:
        w = {i: float(allocation_weights[i]) for i in w}
    # the largest fraction a layer may remove: its channels' (its heads' where its MLP is empty already)
    cap = {gs.layer: _max_removable(gs, allow_empty, 1) / gs.count for gs in heads + chans}

    def frac(s, i):
        return min(s * w[i], cap[i])

    def cost(s):  # continuous removed parameters at scale s
        return sum(frac(s, gs.layer) * gs.count * gs.params_per_group() for gs in sets)

    if cost(1e9) < target:
        raise UserError(f"target of {target:,} parameters is unreachable: the prunable layers hold at most "
                        f"{round(cost(1e9)):,} removable parameters")
    lo, hi = 0.0, 1.0
    while cost(hi) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) < target else (lo, mid)
    s = hi
    counts = {}
    for gs in heads:
        unit = _units(gs, head_mode, nkv[gs.layer])
        n = round(frac(s, gs.layer) * gs.count / unit) * unit
        counts[(gs.layer, "heads")] = min(n, _max_removable(gs, allow_empty, unit))
    left = target - sum(counts[(gs.layer, "heads")] * gs.params_per_group() for gs in heads)
    if not chans:  # every MLP of the range is empty already: the heads' rounding is the nearest plan
        return counts
    per_channel = chans[0].params_per_group()
    want = {gs.layer: frac(s, gs.layer) * gs.count for gs in chans}
    n_total = max(0, round(left / per_channel))
    # largest-remainder apportionment of n_total channels in proportion to each layer's share
    share = sum(want.values()) or 1.0
    exact = {i: n_total * want[i] / share for i in want}
    alloc = {i: min(int(exact[i]), _max_removable(gs, allow_empty, 1)) for i, gs in zip(want, chans)}
    rest = n_total - sum(alloc.values())
    room = {gs.layer: _max_removable(gs, allow_empty, 1) - alloc[gs.layer] for gs in chans}
    for i in sorted(want, key=lambda i: exact[i] - int(exact[i]), reverse=True) * 2:
        if rest <= 0:
            break
        if room[i] > 0:
            alloc[i] += 1
            room[i] -= 1
            rest -= 1
    if rest > 0:
        raise UserError(f"target of {target:,} parameters is unreachable with the given layers")
    counts.update({(i, "channels"): n for i, n in alloc.items()})
    return counts


def _global_scope_counts(sets, scores, target, head_mode, nkv, allocation_weights, allow_empty):
    """One ranking over all groups of the layer range, lowest removed first until the target.

    A head that would overshoot is skipped so finer channels close the gap. When the channels run
    out first, `_close_gap` trades: the weakest skipped head in, the strongest removed channels back
    out, if that lands nearer the target. The result is the nearest plan this ranking allows; it is
    refused as unreachable only when further than the largest group from the target.
    """
    entries = []  # (score, params, set index, unit)
    for k, gs in enumerate(sets):
        unit = _units(gs, head_mode, nkv[gs.layer])
        s = scores[(gs.layer, gs.kind)].double()
        if unit > 1:  # q-head GQA: rank the i-th weakest q head of every kv group together
            per = gs.count // unit
            s = torch.sort(s.view(unit, per), dim=1).values.mean(0)
        else:
            s = torch.sort(s).values
        for v in s.tolist():
            entries.append((v, gs.params_per_group() * unit, k, unit))
    entries.sort(key=lambda e: e[0])
    removed_n = [0] * len(sets)
    removed, taken, skipped = 0, [], []
    for e in entries:
        v, params, k, unit = e
        if removed >= target:
            break
        if removed_n[k] + unit > _max_removable(sets[k], allow_empty, unit):
            continue
        if removed + params > target and sets[k].kind == "heads":
            skipped.append(e)  # a head would overshoot: let finer channels close the gap
            continue
        removed_n[k] += unit
        removed += params
        taken.append(e)
    if removed < target:
        removed = _close_gap(sets, target, removed, removed_n, taken, skipped, allow_empty)
    largest = max(gs.params_per_group() * _units(gs, head_mode, nkv[gs.layer]) for gs in sets)
    if abs(removed - target) > largest:
        raise UserError(f"target of {target:,} parameters is unreachable in global scope: the nearest "
                        f"plan removes {removed:,}")
    return {(gs.layer, gs.kind): removed_n[k] for k, gs in enumerate(sets)}


def _close_gap(sets, target, removed, removed_n, taken, skipped, allow_empty) -> int:
    """Below the target with heads left: add the weakest skipped head that fits, give back the
    strongest removed channels while that nears the target; keep the trade if it is nearer.
    Updates `removed_n` in place; returns the removed parameter count."""
    for _, params, k, unit in skipped:  # lowest score first
        if removed_n[k] + unit > _max_removable(sets[k], allow_empty, unit):
            continue
        back, trial = [], removed + params
        for e in reversed(taken):  # strongest removed channels first
            if sets[e[2]].kind != "channels":
                continue
            if abs(trial - e[1] - target) >= abs(trial - target):
                break
            back.append(e)
            trial -= e[1]
        if abs(trial - target) < abs(removed - target):
            removed_n[k] += unit
            for e in back:
                removed_n[e[2]] -= e[3]
                taken.remove(e)
            return trial
        return removed
    return removed


# --------------------------------------------------------------------------- whole layers (depth)
DEPTH_RULES = ("nearest", "not_above")


def whole_layers(layers="all") -> dict:
    """The SELECTION of a method that chooses whole decoder layers (scoring.py): unit "layers", the
    layer range `layers` (default all); the scope reads "global" (layers of the range compete)."""
    return {"scope": "global", "unit": "layers", "layers": layers}


@dataclass
class DepthBudget:
    """The budget of a method that removes whole decoder layers (SELECTION unit "layers").

    count: layers to remove; layers: the layer range (candidates, current numbering); params: each
    decoder layer's parameter count (all layers); rule: how `count` was chosen from the target;
    target_removed, total: parameters (the budget, the model's total)."""
    count: int
    layers: list
    params: list
    rule: str
    target_removed: int
    total: int


def depth_budget(model, ratio: float, layers=None, rule: str = "nearest") -> DepthBudget:
    """How many whole layers of the layer range remove `ratio` of ALL parameters.

    Whole layers cannot hit a ratio exactly: with p the mean parameter count of the layer range's
    layers (every layer's, equal, on an unsliced model), rule ``nearest`` removes round(target / p)
    layers (the count whose removed parameters are nearest the target; halves round up) and
    ``not_above`` floor(target / p) (never more than the target). The record carries the target, the
    achieved ratio and the rule. Raises UserError for a ratio outside (0, 1), an unknown rule, a bad
    layer range, a count of zero (the ratio is below what one layer holds, or half of it with
    ``nearest``) or one that leaves no layer.
    """
    if not 0.0 < ratio < 1.0:
        raise UserError(f"ratio must be in (0, 1), got {ratio}")
    if rule not in DEPTH_RULES:
        raise UserError(f"unknown depth rule {rule!r}; choose one of {', '.join(DEPTH_RULES)}")
    all_layers = adapter_for(model).layers(model)
    n_layers = len(all_layers)
    layers = layer_range(n_layers) if layers is None else sorted(layers)
    if not layers or not all(0 <= i < n_layers for i in layers):
        raise UserError(f"prunable layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}")
    params = [sum(p.numel() for p in layer.parameters()) for layer in all_layers]
    total = parameter_count(model)
    target = round(ratio * total)
    per = sum(params[i] for i in layers) / len(layers)
    count = int(target / per + 0.5) if rule == "nearest" else int(target // per)
    if count < 1:
        raise UserError(f"ratio {ratio} removes {target:,} parameters, less than "
                        f"{'half ' if rule == 'nearest' else ''}a decoder layer ({round(per):,}): no layer "
                        f"to remove with rule {rule}")
    if count > len(layers) or count >= n_layers:
        raise UserError(f"ratio {ratio} needs {count} whole layers; the layer range has {len(layers)} of "
                        f"{n_layers} (at least one layer must stay)")
    return DepthBudget(count, layers, params, rule, target, total)


def select_layers(model, scores: Scores, budget: DepthBudget) -> Selection:
    """The plan removing the `budget.count` lowest-scoring layers of the range (ShortGPT's
    `remove_layers`: ``np.argsort(importances)[:n]``; here a stable sort: ties go to the lower index).

    scores: (layer, "layers") -> a one-element tensor per layer of the range (higher = keep).
    Raises UserError when a layer of the range has no such score."""
    values = []
    for i in budget.layers:
        s = scores.get((i, "layers"))
        if s is None or torch.as_tensor(s).numel() != 1:
            raise UserError(f"method gave no one-element score for layer {i} (kind 'layers')")
        values.append(float(torch.as_tensor(s).reshape(())))
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), stable=True)[:budget.count]
    removed = sorted(budget.layers[int(k)] for k in order)
    plan = full_plan(model)
    plan.removed_layers = removed
    return Selection(plan=plan, target_removed=budget.target_removed,
                     removed=sum(budget.params[i] for i in removed), total=budget.total)
