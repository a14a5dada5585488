"""Tuning helper (not part of the suite): score once, select+slice at several ratios, PTB/C4 ppl.

python scripts/minillm_tune.py LABEL RATIOS KEY=VALUE ...   (minillm options; calib nsamples=.. seqlen=.. via n=, L=)
Appends one JSON line per ratio to results/zo/tune.jsonl (results/notes/minillm.md §3). Never evaluates WikiText-2.
"""
import copy, json, sys, time
from pathlib import Path
import torch
from suite.pruning.architectures import all_group_sets
from suite.pruning.plan import apply_plan
from suite.pruning.scoring import checked_options
from suite.pruning.select import select
from suite.data import calibration_windows
from suite.evaluate import perplexity
from suite.methods import get_method
from suite.models import load_model, load_tokenizer

label, ratios, *pairs = sys.argv[1:]
kv = dict(p.split("=", 1) for p in pairs)
method_name = kv.pop("method", "minillm")
n, L = int(kv.pop("n", 16)), int(kv.pop("L", 128))
scope = kv.pop("scope", None)
layers = kv.pop("layers", None)
tokens = int(kv.pop("tokens", 8192))
lams = [float(x) for x in kv.pop("lams", "").split(",") if x]
method = get_method(method_name)
opts = checked_options(method, kv, scope)
model = load_model("smollm2-135m"); tok = load_tokenizer("smollm2-135m")
win = calibration_windows(tok, "c4", n, L, seed=0)
sets = all_group_sets(model)
t0 = time.time()
sc = method.score(model, win, sets, opts, 0)
ts = time.time() - t0
scope = scope or method.SELECTION["scope"]
lay = None
if layers:
    a, b = layers.split(":"); lay = list(range(int(a), int(b)))
from minillm.variants.allocation import allocation_from_sensitivity
variants = [(None, sc.info.get("layer_weights"))]
if lams:
    sens = {int(i): sum(v.values()) for i, v in sc.info["layer"]["sensitivity"].items()}
    variants = [(lam, allocation_from_sensitivity(sens, lam)) for lam in lams]
from suite.pruning.errors import UserError
pristine = copy.deepcopy(model) if sc.compensate is not None else None
for (lam, lw), r in [(v, float(x)) for v in variants for x in ratios.split(",")]:
    if sc.compensate is not None:  # the compensation closure holds its model's modules: rescore a fresh copy
        m = copy.deepcopy(pristine)
        sc = method.score(m, win, all_group_sets(m), opts, 0)
    else:
        m = copy.deepcopy(model)
    try:
        sel = select(m, sc.scores, r, scope=scope, layers=lay, allocation_weights=lw)
    except UserError as e:
        print("skip", lam, r, e, flush=True)
        continue
    apply_plan(m, sel.plan)
    if sc.compensate is not None:
        sc.compensate(m, sel.plan)
    out = {"label": label, "method": method_name, "ratio": r, "options": {k: v for k, v in opts.items() if k in kv},
           "n": n, "L": L, "scope": scope, "layers": layers, "score_s": round(ts, 1), "lam": lam}
    for c in ("ptb", "c4"):
        out[c] = round(perplexity(m, tok, c, seq_len=128, max_tokens=tokens, quiet=True), 3)
    out["heads"] = [len(l.heads) for l in sel.plan.layers]
    print(json.dumps(out), flush=True)
    with open(Path(__file__).resolve().parents[1] / "results" / "zo" / "tune.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    del m
