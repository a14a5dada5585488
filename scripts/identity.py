"""Before/after identity of pruning decisions: every registered method x tiny family x selection scope.

Prunes each seeded tiny model (`suite.models.TINY_MODELS`) with each method of the registry at one
ratio, in the `layer` and the `global` scope, on a small fixed calibration (4 windows of 32 tokens),
and writes one JSON line per run: the kept heads / kv heads / channels (`Plan.to_json`) and the
SHA-256 of the pruned state dict, or the one-line error where a combination is refused. Run it on
two commits and compare the files (`cmp`, or `diff` for the first differing run): a refactor that
leaves behaviour unchanged gives identical lines.

    python scripts/identity.py --out /tmp/identity-before.jsonl
    python scripts/identity.py --out /tmp/identity-after.jsonl && cmp /tmp/identity-{before,after}.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

from suite import methods, models, pipeline

CALIB = {"corpus": "c4", "nsamples": 4, "seqlen": 32}


def state_sha(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def run_one(method: str, family: str, scope: str, ratio: float) -> dict:
    row = {"method": method, "model": family, "scope": scope, "ratio": ratio}
    torch.manual_seed(0)
    model, tokenizer = models.load_model(family), models.load_tokenizer(family)
    options = {"sequential": False} if method == "wanda-sp" and scope == "global" else None
    try:
        outcome = pipeline.prune(model, tokenizer, method, ratio, seed=0, options=options, calib=CALIB,
                                 scope=scope, allow_empty=True)
    except Exception as exc:  # a refused combination is part of the behaviour too
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row["plan"] = outcome.selection.plan.to_json()
    row["sha256"] = state_sha(model)
    row["params"] = outcome.params_pruned
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--methods", default=",".join(methods.METHODS))
    parser.add_argument("--models", default=",".join(models.TINY_MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.out, "w") as out:
        for method in args.methods.split(","):
            for family in args.models.split(","):
                for scope in ("layer", "global"):
                    row = run_one(method, family, scope, args.ratio)
                    out.write(json.dumps(row, sort_keys=True) + "\n")
                    out.flush()
                    print(method, family, scope, row.get("error", row.get("sha256", "")[:12]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
