"""Benchmark: Bonsai's masked sub-model evaluations per second vs plain forwards of the same tokens.

For a model and N calibration windows of S tokens: (a) `plain`: M whole-model calibration losses
(`suite.pruning.loss.calibration_loss`, no mask); (b) `masked`: M masks evaluated by
`baselines.bonsai.masked_losses` on the layer pass (gates; `mask_batch` masks per layer residency;
`--batched`: `batched_masked_losses`, those masks in one forward).
Both process M·N·S tokens. Rounds alternate plain / masked (`--repeats`) and the medians are
reported, as evaluations per second and their ratio. Usage:
    python scripts/bench_bonsai.py --model smollm2-135m --nsamples 8 --seqlen 128 --masks 16 --mask-batch 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from baselines import bonsai
from suite.data import calibration_windows
from suite.models import load_model, load_tokenizer
from suite.pruning.architectures import all_group_sets
from suite.pruning.loss import LayerwiseLoss, calibration_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--masks", type=int, default=16)
    ap.add_argument("--mask-batch", type=int, default=16)
    ap.add_argument("--bsz", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batched", action="store_true", help="the masks of a pass in one forward (bonsai batched=true)")
    a = ap.parse_args()
    model = load_model(a.model)
    windows = calibration_windows(load_tokenizer(a.model), "c4", a.nsamples, a.seqlen, seed=0)
    sets = all_group_sets(model)
    rng = np.random.default_rng(0)
    masks = [[(rng.random(gs.count) > 0.1).astype(float) for gs in sets] for _ in range(a.masks)]
    times = {"plain": [], "masked": []}
    for _ in range(a.repeats):
        t = time.perf_counter()
        for _ in range(a.masks):
            calibration_loss(model, windows, a.bsz)
        times["plain"].append(time.perf_counter() - t)
        t = time.perf_counter()
        if a.batched:
            bonsai.batched_masked_losses(model, windows, sets, masks, a.mask_batch, a.bsz)
        else:
            bonsai.masked_losses(LayerwiseLoss(model, windows, a.bsz), sets, masks, a.mask_batch)
        times["masked"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": a.model, "nsamples": a.nsamples, "seqlen": a.seqlen, "masks": a.masks, "mask_batch": a.mask_batch, "batched": a.batched,
           "bsz": a.bsz, "threads": torch.get_num_threads(), "seconds": times,
           "plain_evals_per_s": a.masks / med["plain"], "masked_evals_per_s": a.masks / med["masked"],
           "masked_over_plain": med["plain"] / med["masked"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
