"""How many of FLAP's removed groups change between variance=exact and variance=reference.

    PYTHONPATH=. python scripts/flap_variance.py > results/runs/flap_variance.jsonl   (results/notes/layerwise.md §4)

SmolLM2-135M, C4 calibration from the suite's sampler (seed 0), 128 and 8 windows of 128 tokens,
FLAP's own selection (global, AL-AM), ratios 0.2 and 0.5. Per setting: removed heads / channels
(exact), how many removed ones differ (|removed_exact - removed_reference|), in how many layers
the kept sets differ.
"""
import json

import baselines.flap as flap
from suite.pruning.architectures import all_group_sets
from suite.pruning.select import select
from suite.data import calibration_windows
from suite.models import load_model, load_tokenizer

model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
sets = all_group_sets(model)
out = []
for nsamples in (128, 8):
    windows = calibration_windows(tokenizer, "c4", nsamples, 128, seed=0)
    scores = {v: flap.score(model, windows, sets, {**flap.OPTIONS, "variance": v, "compensate": False}, 0).scores
              for v in flap.VARIANCES}
    for ratio in (0.2, 0.5):
        plans = {v: select(model, s, ratio, scope="global").plan for v, s in scores.items()}
        row = {"nsamples": nsamples, "ratio": ratio}
        for kind in ("heads", "channels"):
            removed = {}
            for v, plan in plans.items():
                full = {gs.layer: gs.count for gs in sets if gs.kind == kind}
                removed[v] = {(i, g) for i, lp in enumerate(plan.layers)
                              for g in set(range(full[i])) - set(getattr(lp, kind))}
            row[f"{kind}_removed"] = len(removed["exact"])
            row[f"{kind}_swapped"] = len(removed["exact"] - removed["reference"])
            row[f"{kind}_layers_differ"] = sum(
                set(getattr(a, kind)) != set(getattr(b, kind))
                for a, b in zip(plans["exact"].layers, plans["reference"].layers))
        out.append(row)
        print(json.dumps(row), flush=True)
