"""`wanda-sp`: Wanda's |W|·||X||_2 applied to structures, as the FLAP repository's `wanda_sp` does.

Wanda (Sun et al. 2023, Eq. 1) scores weight W_ij by S_ij = |W_ij| · ||X_j||_2, where ||X_j||_2 is
the l2 norm of input feature j over all N·L calibration tokens. The structured variant
(An et al. 2024, FLAP `lib/prune.py::prune_wanda_sp`) scores the INPUT COLUMNS of each block's
output projection (o_proj / out_proj / dense for heads, down_proj / fc2 / dense_4h_to_h for MLP
channels) by averaging over the output rows,

    s_j = (1/d_out) · sum_i |W_ij| · ||X_j||_2                     (FLAP: W_metric.mean(axis=0))

and a head's score is the SUM of its head_dim column scores (FLAP: reshape(-1, 128).sum(dim=1));
an MLP channel is one column. Groups are ranked per layer (FLAP prunes wanda-sp uniformly).

Differences from the FLAP script, all documented:
  - FLAP's `scaler_row` is sum_tokens x_j^2 / nsamples, i.e. ||X_j||_2^2 / N; the constant 1/sqrt(N)
    does not change any ranking, so ||X_j||_2 is used as in Wanda's Eq. 1.
  - none in the order: like FLAP's loop, the default (`sequential=true`) prunes layer by layer and
    gathers layer l+1's statistics on the PRUNED layers' outputs (`suite.pruning.sequential`: the shared
    per-layer budget, each layer's lowest-scoring groups removed, FLAP uses a per-layer threshold
    at the same ratio). `sequential=false` scores every layer on the dense model first (one-shot,
    like FLAP's own `flap`): this suite's earlier variant, recorded as `wanda-sp (one-shot)`.
  - Calibration: FLAP's wanda_sp draws 128 C4 samples of model.seqlen = 128 tokens (FLAP sets
    seqlen 128 in `get_llm`); that is the default here (Wanda's paper used 128 x 2048 for
    unstructured sparsity; 2048-token windows are out of reach on the 2-core CPU this suite targets).

Option `batch_size` (default 1): windows per forward pass while collecting ||X_j||; FLAP's script
feeds the calibration samples one at a time. Larger batches change nothing but the peak memory.
Option `sequential` (default true, FLAP's `prune_wanda_sp`): see above. Fidelity: on SmolLM2-135M
(128 x 128 C4 windows, seed 0, ratios 0.2 and 0.5) the kept heads and channels equal those of a
plain-torch loop written from FLAP's code (tests/test_wanda_sp.py; results/notes/layerwise.md).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, ValidationInfo, model_validator

from suite.pruning.activations import input_stats
from suite.pruning.architectures import output_only
from suite.pruning.errors import UserError
from suite.pruning.layerwise import resident_sets
from suite.pruning.options import Bool, Int, MethodOptions
from suite.pruning.scoring import Scoring

NAME = "wanda-sp"


class Options(MethodOptions):
    """`batch_size` is read in both variants (the layer pass's micro-batch, sequential or one-shot).
    Refused: `sequential=true` with scope "global" (each layer gets its own budget; the pipeline
    refused it too, but only after loading the model)."""

    batch_size: Annotated[Int, Field(ge=1)] = 1  # before pydantic, 0 and below silently meant 1
    sequential: Bool = True

    @model_validator(mode="after")
    def _scope(self, info: ValidationInfo):
        scope = (info.context or {}).get("scope")
        if self.sequential and scope == "global":
            raise UserError(f"{NAME} with sequential=true prunes every layer to its own budget: "
                            f"scope {scope!r} needs --opt sequential=false")
        return self


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 128, "seqlen": 128,
    "source": "FLAP repo lib/prune.py prune_wanda_sp: get_loaders('c4', nsamples=128, seqlen=model.seqlen=128)",
}
SELECTION = {"scope": "layer", "layers": "all"}
STATISTICS = "output"  # sequential pruning hooks only the output projections' inputs


def sequential(options: dict) -> bool:
    """Pruned layer by layer (FLAP's prune_wanda_sp), unless `sequential=false` (one-shot)."""
    return bool(options["sequential"])


def score_layer(group_sets, stats, options) -> dict:
    """Scores of the groups in `group_sets` (one layer's, or all layers') from their output
    projections' input statistics `stats[(layer, member name)]`: s_j summed per group."""
    scores = {}
    with torch.no_grad():
        for gs in group_sets:
            out = gs.output
            weight = gs.linear(out).weight
            norm = stats[(gs.layer, out.name)].l2.to(weight.device)          # ||X_j||_2, [in_features]
            column = weight.double().abs().mean(dim=0) * norm                # s_j
            scores[(gs.layer, gs.kind)] = column.view(gs.count, out.width).sum(1).cpu()
    return scores


def score(model, windows, group_sets, options, seed) -> Scoring:
    """One-shot (`sequential=false`): every layer scored on the dense model's statistics."""
    stats = input_stats(model, windows, output_only(group_sets), batch_size=options["batch_size"])
    scores = {}
    for gs in resident_sets(group_sets):  # offloaded layers: weights read on the device (layerwise.py)
        scores.update(score_layer([gs], stats, options))
    return Scoring(scores, info={"tokens": int(windows.numel()), "sequential": False})
