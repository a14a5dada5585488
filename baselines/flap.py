"""`flap`: FLuctuation-based Adaptive structured Pruning (An et al., AAAI 2024), retraining-free.

Three parts, each as in the paper and its code (github CASIA-IVA-Lab/FLAP, `lib/prune.py::prune_flap`
with the defaults of `main.py`: metric WIFV, structure AL-AM):

1. Fluctuation metric (FLAP "WIFV", the paper's Eq. 4): for input column j of a block's output
   projection W (o_proj / out_proj / dense for heads, down_proj / fc2 / dense_4h_to_h for MLP
   channels), with X_{n,j} its input over the N calibration tokens,

       S_j = [ 1/(N-1) · sum_n (X_{n,j} - mean_n X_{n,j})^2 ] · ||W_{:,j}||_2^2

   i.e. the sample variance of the feature (how far the output moves from what a constant could
   replace) times the squared column norm. FLAP's code squares the attention columns' metric once
   more before standardising (`metrics[...] ** 2` for self_attn.o_proj only); option `head_power`
   (default 2, as the code) keeps that.

   Option `variance`: `exact` (default, the paper's definition) is the unbiased token variance above
   (`InputStats.var`). `reference` reproduces FLAP's streaming estimate (`lib/layerwrapper.py::
   BiasGPT.add_batch`, one window per call): it discards the first window's contribution and,
   because its running mean is overwritten before it is used, weights window j's squared deviations
   (from the running mean m_j of windows 1..j) by (j-1)/(j(K-1)) (`activations.StreamingVariance`
   derives it). It is NOT a per-module constant factor away from the token variance, and rankings
   see it: on SmolLM2-135M (C4, seed 0, FLAP's global selection) 89 of 14,289 removed channels
   swap at 128 windows and ratio 0.2 (92 of 33,035 at 0.5), in 20 (27) of 30 layers; at 8 windows
   889 (993) swap and the kept channel sets differ in 22 (29) layers; heads swap only at 8 windows
   and 0.5 (1 of 150). Command and table: results/notes/layerwise.md.

2. Standardisation and adaptive global structure (Eq. 5; structure "AL-AM"): each module's column
   scores are standardised, Ŝ = (S - mean(S)) / std(S) (mean and unbiased std over that module's
   columns, per layer), a head's score is the MEAN of its columns' standardised scores
   (`reshape(L, -1, 128).mean(dim=2)`), and heads and channels of all layers compete in ONE ranking
   whose budget counts each group's parameters (FLAP weights a head 512/3 channels for LLaMA-7B,
   which is its parameter ratio): SELECTION scope "global".

3. Baseline bias compensation (Eq. 6): removing columns R of W changes the output by W_{:,R} x_R;
   replacing x_R by its calibration mean x̄_R gives the bias B = W_{:,R} x̄_R, added to the
   projection's bias (created for LLaMA, which has none), so the pruned block outputs the same as
   the dense one whenever the removed features sit at their mean. It runs after slicing
   (`Scoring.compensate`) from the calibration means and W x̄ of the pre-slicing output projection,
   both kept from scoring: B = W x̄ - W_{:,K} x̄_K with W_{:,K} the sliced weight (float64), so no
   pre-slicing weight is held in memory between scoring and compensation (an offloaded model keeps
   one layer resident; the kept width is checked against the sliced weight). Option `compensate=false` gives
   uncompensated FLAP. Shared with minillm's `compensate` option
   (`suite/pruning/compensation.py`).

   The created bias is a real Parameter: it is counted in the pruned model's parameters (the
   pipeline reports the count after compensation), saved in the checkpoint, and recreated by
   `load_pruned`. The added entries are reported in `info["bias_entries_added"]`.

Calibration: FLAP's scripts use 1024 WikiText-2 windows of 128 tokens (`--nsamples 1024`,
model.seqlen 128). C4 replaces WikiText-2 here (calibrating on WikiText-2 and reporting WikiText-2
perplexity leaks, FLAP issue #13) and the default is 128 windows of 128 tokens (the FLAP repo's
wanda_sp setting) to keep the forward pass short on a 2-core CPU; `--nsamples 1024` restores FLAP's.
Option `batch_size` (default 1, as FLAP feeds one sample at a time): windows per statistics pass
(with `variance=reference` a micro-batch is split into its windows in order: the same value).

Runs one-shot on the dense model's statistics (as `prune_flap`: the global ranking needs every
layer's scores first), gathered layer by layer (`activations.input_stats` on `layerwise.LayerPass`).
"""
from __future__ import annotations

from typing import Annotated, Literal, get_args

import torch
from pydantic import Field

from suite.pruning.activations import input_stats
from suite.pruning.architectures import adapter_for, output_only
from suite.pruning.compensation import bias_compensator, saved_projection
from suite.pruning.layerwise import resident_sets
from suite.pruning.options import Bool, Float, Int, MethodOptions
from suite.pruning.scoring import Scoring, standardise

NAME = "flap"
Variance = Literal["exact", "reference"]
VARIANCES = get_args(Variance)


class Options(MethodOptions):
    """Every option changes the scores or the memory of every run: no combination is ignored
    (`batch_size` with `variance=reference` splits each micro-batch into its windows in order:
    the same value, its memory)."""

    compensate: Bool = True
    head_power: Float = 2.0
    batch_size: Annotated[Int, Field(ge=1)] = 1  # before pydantic, 0 and below silently meant 1
    variance: Variance = "exact"


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 128, "seqlen": 128,
    "source": "FLAP scripts/llama_7b.sh: 1024 x 128-token WikiText-2 windows; here C4 (FLAP issue #13 "
              "leak) and 128 windows (2-core CPU budget; --nsamples 1024 restores FLAP's)",
}
SELECTION = {"scope": "global", "layers": "all"}


def variant(options: dict) -> str | None:
    """The grid's default label suffix (suite.config.default_label): FLAP's streaming variance is
    a variant of this method's exact one, so its rows are named apart."""
    return "reference variance" if options["variance"] == "reference" else None


def score(model, windows, group_sets, options, seed) -> Scoring:
    """Scores (standardised fluctuation metric) of every group, from one pass of the dense model.

    `options`: checked ones (`suite.pruning.scoring.checked_options`; the pipeline checks before scoring)."""
    batch_size = options["batch_size"]
    reference = options["variance"] == "reference"
    stats = input_stats(model, windows, output_only(group_sets), batch_size=batch_size, streaming=reference)
    adapter = adapter_for(model)
    scores, saved = {}, []
    with torch.no_grad():
        for gs in resident_sets(group_sets):  # offloaded layers: weights read on the device (layerwise.py)
            out = gs.output
            linear = gs.linear(out)
            st = stats[(gs.layer, out.name)]
            col_sq = linear.weight.double().pow(2).sum(dim=0).cpu()          # ||W_{:,j}||^2
            var = st.streaming.value if reference else st.var                # FLAP's fluc_inp
            metric = var.cpu() * col_sq                                     # fluctuation metric
            if gs.kind == "heads":
                metric = metric.pow(float(options["head_power"]))
            z = standardise(metric).view(gs.count, out.width).mean(dim=1)
            scores[(gs.layer, gs.kind)] = z
            if options["compensate"]:
                saved.append(saved_projection(gs, st.mean, adapter.head_dim(gs.module) if gs.kind == "heads" else 1))
    info = {"tokens": int(windows.numel()), "compensate": bool(options["compensate"]), "variance": options["variance"]}
    compensate = bias_compensator(saved, info, NAME) if options["compensate"] else None
    return Scoring(scores, compensate=compensate, info=info)
