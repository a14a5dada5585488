"""Regression gate: compare fresh records with reference records, cell by cell (`suite check`).

A cell is (model, label, target ratio, seed). For every reference cell the fresh one must:

    keep the same groups        exactly: the kept heads, kv-heads and channels of every layer
                                (the record's `kept`, `kept_indices`: ranges or a hex bitmask,
                                `compact`); a change is reported with the
                                number of groups whose kept/removed status differs
    parameter counts            exactly (dense and pruned)
    achieved ratio              within 1e-6 (absolute)
    perplexity                  not more than 1 % higher (CPU BLAS kernels differ across machines in
                                the last bits; a changed pruning decision moves it by far more)
    zero-shot acc / acc_norm    not more than 0.03 lower (on `limit`-capped tasks one item is 1/limit)

A metric that moves the other way beyond its tolerance (perplexity > 1 % lower, accuracy > 0.03
higher) is an IMPROVEMENT: reported on its own line ("improved: ... update the reference"), not a
failure, so a better method does not break CI, and not silent either (`--strict` fails on it).
A fresh cell without a reference cell is reported as "no reference" (record one with
`suite check --record CONFIG`), and a reference cell absent from the fresh records as "missing".

Outcome (`Report.exit_code`): 0 pass (improvements and unreferenced cells listed), 1 at least one
regression, changed plan, failed or missing cell; with `strict`, improvements and unreferenced
cells also give 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from suite.records import cell_identity as identity

TOLERANCES = {"ppl_rel": 0.01, "acc_abs": 0.03, "ratio_abs": 1e-6}
KINDS = ("heads", "kv_heads", "channels")


# --------------------------------------------------------------------------- kept indices, compactly
def compact(indices) -> str:
    """Sorted indices as ranges, [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" ("" for none), or, where the ranges
    run past 64 characters and the mask is shorter (hundreds of scattered channels), as "x" + the hex
    digits of the bitmask sum(2**i): every kept
    MLP channel of a SmolLM2 layer in ~400 characters."""
    indices = sorted(int(i) for i in indices)
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    ranges = ",".join(out)
    mask = "x" + format(sum(1 << i for i in indices), "x") if indices else ""
    return mask if len(ranges) > 64 and len(mask) < len(ranges) else ranges  # readable where short


def expand(text: str) -> set[int]:
    """The inverse of `compact` (either form)."""
    if text.startswith("x"):
        bits = int(text[1:], 16)
        return {i for i in range(bits.bit_length()) if bits >> i & 1}
    out = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def kept_indices(plan) -> list[dict]:
    """The record's `kept`: per decoder layer the kept heads, kv-heads (GQA) and channels of the plan
    (`suite.pruning.plan.Plan`, original numbering) as `compact` ranges; a layer the plan removes
    whole (depth pruning, `Plan.removed_layers`) is `{"removed": true}`."""
    out, removed = [], set(plan.removed_layers)
    for i, lp in enumerate(plan.layers):
        if i in removed:
            out.append({"removed": True})
            continue
        entry = {"heads": compact(lp.heads), "channels": compact(lp.channels)}
        if lp.kv_heads is not None:
            entry["kv_heads"] = compact(lp.kv_heads)
        out.append(entry)
    return out


def changed_groups(reference: list[dict], fresh: list[dict]) -> int:
    """Groups (heads, kv-heads, channels, over all layers) kept in one plan and removed in the other;
    a layer removed whole in one plan only counts its groups kept in the other, plus one (the layer)."""
    if len(reference) != len(fresh):
        return sum(len(expand(layer.get(k, ""))) for layer in reference + fresh for k in KINDS)
    return sum(len(expand(a.get(k, "")) ^ expand(b.get(k, ""))) for a, b in zip(reference, fresh) for k in KINDS) + \
        sum(1 for a, b in zip(reference, fresh) if bool(a.get("removed")) != bool(b.get("removed")))


# --------------------------------------------------------------------------- one cell
def cell_name(record: dict) -> str:
    model, label, ratio, seed = identity(record)
    return f"{model} / {label} @ {ratio:g} seed {seed}"


@dataclass
class CellCheck:
    problems: list[str] = field(default_factory=list)      # regressions, changed plan: fail
    improvements: list[str] = field(default_factory=list)  # better beyond tolerance: update the reference
    notes: list[str] = field(default_factory=list)         # what could not be compared


def compare(reference: dict, fresh: dict, tol: dict = TOLERANCES) -> CellCheck:
    """One cell: `fresh` against `reference` (see the module docstring for what is compared)."""
    where, out = cell_name(reference), CellCheck()
    if fresh.get("status", "ok") != "ok":
        out.problems.append(f"{where}: failed: {fresh.get('error', 'status ' + str(fresh.get('status')))}")
        return out
    if reference.get("kept") is not None:
        if fresh.get("kept") is None:
            out.problems.append(f"{where}: the fresh record has no kept indices to compare")
        else:
            changed = changed_groups(reference["kept"], fresh["kept"])
            if changed:
                out.problems.append(f"{where}: plan changed: {changed} groups kept/removed differently")
    elif reference.get("method") != "dense":
        out.notes.append(f"{where}: the reference has no kept indices (recorded before they were): plan not "
                         "compared; re-record it")
    ref_params, new_params = reference.get("params", {}), fresh.get("params", {})
    for key in ("dense", "pruned"):
        if ref_params.get(key) != new_params.get(key):
            out.problems.append(f"{where}: params.{key} {new_params.get(key)} != reference {ref_params.get(key)}")
    if abs(fresh.get("ratio_achieved", math.nan) - reference.get("ratio_achieved", 0.0)) > tol["ratio_abs"]:
        out.problems.append(f"{where}: ratio_achieved {fresh.get('ratio_achieved')} != "
                            f"reference {reference.get('ratio_achieved')}")
    for corpus, ref in (reference.get("perplexity") or {}).items():
        new = (fresh.get("perplexity") or {}).get(corpus)
        line = f"{where}: perplexity {corpus} {new if new is None else f'{new:.4f}'} vs reference {ref:.4f}"
        if new is None or math.isnan(new) or new > ref * (1 + tol["ppl_rel"]):
            out.problems.append(f"{line} (worse beyond {tol['ppl_rel']:.0%})")
        elif new < ref * (1 - tol["ppl_rel"]):
            out.improvements.append(f"{line} (better beyond {tol['ppl_rel']:.0%})")
    for task, ref in (reference.get("zero_shot") or {}).items():
        new = (fresh.get("zero_shot") or {}).get(task, {})
        for metric in ("acc", "acc_norm"):
            if ref.get(metric) is None:
                continue
            value = new.get(metric)
            line = f"{where}: {task} {metric} {value} vs reference {ref[metric]:.4f}"
            if value is None or value < ref[metric] - tol["acc_abs"]:
                out.problems.append(f"{line} (worse beyond {tol['acc_abs']})")
            elif value > ref[metric] + tol["acc_abs"]:
                out.improvements.append(f"{line} (better beyond {tol['acc_abs']})")
    return out


# --------------------------------------------------------------------------- a results file
@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)
    compared: int = 0

    def exit_code(self, strict: bool = False) -> int:
        if self.problems or (strict and (self.improvements or self.unreferenced)):
            return 1
        return 0

    def lines(self, strict: bool = False) -> list[str]:
        out = [f"FAIL {p}" for p in self.problems]
        out += [f"improved: {i}: update the reference (suite check --record CONFIG)" for i in self.improvements]
        out += [f"no reference: {u} (record one: suite check --record CONFIG)" for u in self.unreferenced]
        out += [f"note: {n}" for n in self.notes]
        verdict = "FAIL" if self.exit_code(strict) else "PASS"
        out.append(f"{verdict}: {self.compared} cells compared, {len(self.problems)} problems, "
                   f"{len(self.improvements)} improvements, {len(self.unreferenced)} without reference")
        return out


def check(fresh: list[dict], reference: list[dict], tol: dict = TOLERANCES) -> Report:
    """Every reference cell against its fresh one (the last ok record of a cell wins, as in tables)."""
    from suite.records import latest

    report = Report()
    fresh_cells = {identity(r): r for r in latest(fresh)}
    reference_cells = {identity(r): r for r in latest(reference) if r.get("status", "ok") == "ok"}
    for key, ref in reference_cells.items():
        if key not in fresh_cells:
            report.problems.append(f"{cell_name(ref)}: missing from the fresh records")
            continue
        cell = compare(ref, fresh_cells[key], tol)
        report.compared += 1
        report.problems += cell.problems
        report.improvements += cell.improvements
        report.notes += cell.notes
    report.unreferenced = [cell_name(r) for key, r in fresh_cells.items() if key not in reference_cells]
    return report
