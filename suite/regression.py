"""Quality regression: compare fresh records with committed reference records.

`results/reference/*.jsonl` hold records from a real run (`python -m suite run
configs/reference-tiny.yaml --out results/reference/reference-tiny.jsonl`, likewise
`reference-smollm2`). The regression test reruns
those cells and fails when a metric drifts beyond these tolerances:

    parameter counts            exact (pruning decisions must not change)
    achieved ratio              1e-6 absolute
    perplexity                  1% relative (CPU BLAS kernels differ across machines in the last
                                bits; a changed pruning decision moves perplexity by far more)
    zero-shot acc / acc_norm    0.03 absolute (on `limit`-capped tasks one item is 1/limit)
"""
from __future__ import annotations

import math

TOLERANCES = {"ppl_rel": 0.01, "acc_abs": 0.03, "ratio_abs": 1e-6}


def cell_name(record: dict) -> str:
    return f"{record['model']} / {record.get('label', record['method'])} @ {record.get('ratio_target', 0)}"


def compare(reference: dict, fresh: dict, tol: dict = TOLERANCES) -> list[str]:
    """Every metric of `reference` that `fresh` misses or moves beyond tolerance, one line each."""
    where = cell_name(reference)
    problems = []
    ref_params, new_params = reference.get("params", {}), fresh.get("params", {})
    for key in ("dense", "pruned"):
        if ref_params.get(key) != new_params.get(key):
            problems.append(f"{where}: params.{key} {new_params.get(key)} != reference {ref_params.get(key)}")
    if abs(fresh.get("ratio_achieved", math.nan) - reference.get("ratio_achieved", 0.0)) > tol["ratio_abs"]:
        problems.append(f"{where}: ratio_achieved {fresh.get('ratio_achieved')} != {reference.get('ratio_achieved')}")
    for corpus, ref in (reference.get("perplexity") or {}).items():
        new = (fresh.get("perplexity") or {}).get(corpus)
        if new is None or not abs(new - ref) <= tol["ppl_rel"] * ref:
            problems.append(f"{where}: perplexity {corpus} {new} vs reference {ref:.4f} (tolerance {tol['ppl_rel']:.0%})")
    for task, ref in (reference.get("zero_shot") or {}).items():
        new = (fresh.get("zero_shot") or {}).get(task, {})
        for metric in ("acc", "acc_norm"):
            if ref.get(metric) is None:
                continue
            if new.get(metric) is None or abs(new[metric] - ref[metric]) > tol["acc_abs"]:
                problems.append(f"{where}: {task} {metric} {new.get(metric)} vs reference {ref[metric]:.4f} "
                                f"(tolerance {tol['acc_abs']})")
    return problems
