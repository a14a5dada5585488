"""Dump Bonsai regression problems for a fidelity run of the authors' ScoreModelHP outside the repo.

Writes OUT/synthetic.npz (the issue's synthetic problem, tests/test_bonsai.py `synthetic`) and
OUT/tiny-llama.npz (one global round on tiny-llama: its 0/1 masks and −perplexities), each with x
[masks, units], y [masks] and beta_ours (`baselines.bonsai.score_model_hp` with the authors' default
grid) and, for the synthetic one, beta_true. Usage:
    python scripts/bonsai_fidelity.py OUT_DIR [SEED]
    python scripts/bonsai_fidelity.py --sweep      # τ(β̂, β_true) of ours, least squares and ridge,
                                                   # seeds 0-2, noise 10 % and 1 % (results/notes/bonsai.md)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from baselines import bonsai
from suite.models import load_model
from suite.pruning.scoring import checked_options
from tests.test_bonsai import synthetic
from tests.tiny import token_ids


def main(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x, y, beta = synthetic(seed)
    ours, info = bonsai.score_model_hp(x, y, seed=seed)
    np.savez(out / "synthetic.npz", x=x, y=y, beta_true=beta, beta_ours=ours)
    print("synthetic", info, "tau(ours, true) =", round(kendalltau(ours, beta).statistic, 4))
    model = load_model("tiny-llama")
    options = checked_options(bonsai, {"masks_per_iter": 200})
    _, modules, _, masks, y, _ = bonsai.sub_model_data(model, token_ids(8, 32, seed), options, 0.05,
                                                       range(len(model.model.layers)), "q-head",
                                                       np.random.default_rng(seed))
    x = bonsai.global_design(modules, masks)
    ours, info = bonsai.score_model_hp(x, y, seed=seed)
    np.savez(out / "tiny-llama.npz", x=x, y=y, beta_ours=ours)
    print("tiny-llama", x.shape, info)


def sweep() -> None:
    """The synthetic problem's ceiling: ours at the test's setting vs least squares and ridge (λ 0.1)."""
    for noise in (0.1, 0.01):
        for seed in range(3):
            x, y, beta = synthetic(seed, noise)
            ours, _ = bonsai.score_model_hp(x, y, reg_weight=[1e-4], lr_factor=[0.1], bsz=[32], seed=seed)
            ols = np.linalg.lstsq(np.c_[x, np.ones(len(y))], y, rcond=None)[0][:-1]
            xc = x - x.mean(0)
            ridge = np.linalg.solve(xc.T @ xc + 0.1 * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
            tau = {k: round(kendalltau(v, beta).statistic, 3) for k, v in (("ours", ours), ("lstsq", ols),
                                                                           ("ridge", ridge))}
            print(f"noise {noise} seed {seed}", tau, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--sweep":
        sweep()
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
