"""`shortgpt`: remove the decoder layers of lowest Block Influence (Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect", arXiv 2403.03853), one shot, no retraining.

Block Influence of layer i (the paper's Eq. 1; github icip-cas/ShortGPT `shortgpt/metrics.py::
block_influence`, summed by `shortgpt/shortgpt.py::ShortGPT.compute_bi`):

    BI_i = sum over calibration tokens t of  1 − (x_{i,t} · y_{i,t}) / (||x_{i,t}|| ||y_{i,t}||)

with x_i the layer's input hidden state and y_i its output; a similarity that is NaN (a zero
vector: 0/0) counts as 0.5, as the authors' `nan_to_num(nan=0.5)`. The n layers of lowest BI are
removed (`ShortGPT.remove_layers`: ``np.argsort(importances)[:n]``; the engine's
`select.select_layers` sorts stably, so exact ties go to the lower index), n from the suite's
budget (`select.depth_budget`: the ratio of ALL parameters as a number of layers, rule nearest or
not above).

The ends, as the authors' code sees them: `compute_bi` pairs consecutive entries of transformers'
``output_hidden_states``, which are the embeddings' output (the first layer's input, after Gemma's
√hidden scaling) first, each layer's output, and LAST the output of the final norm (OPT: after
`final_layer_norm` / `project_out`; BLOOM: after `ln_f`), not the last layer's raw output. This
module computes BI from the layer pass (`layerwise.LayerPass`: each layer's inputs and outputs)
and MATCHES that convention: the last layer's output goes through `LayerPass.finish` (the decoder's
tail) before the cosine (tests/test_shortgpt.py checks it against ``output_hidden_states`` on
LLaMA, OPT, BLOOM and Gemma 2). Option ``last_layer=raw`` compares with the raw output instead
(the definition in the paper's text, where the final norm is not part of any layer).

Options (each from the authors' code):
  angular     false (default: `compute_bi` calls `block_influence` without it) or true: the
              angular distance arccos(sim)/π (`block_influence(angular=True)`; the similarity is
              clamped to [-1, 1] first, so a rounding 1 + 1e-16 gives 0, not NaN: a deliberate
              difference).
  last_layer  "final-norm" (default, the authors' hidden_states) or "raw" (above).
  batch_size  windows per forward of the layer pass (default 1: `run_shortgpt.py` feeds one
              document at a time). No effect on the scores beyond rounding.

Arithmetic: cosines in float64 from the model's hidden states (the authors: the model dtype, fp16,
through a [tokens, tokens] product whose diagonal they keep; the same numbers without that
matrix).

Calibration: the authors' `run_shortgpt.py` reads every PG19 validation book in 256-token chunks
(`stride=256`, each chunk its own forward). PG19 is not mirrored here; the suite's default is C4
(the corpus every other method calibrates on), 128 windows of 256 tokens (the authors' chunk).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from suite.pruning.layerwise import LayerPass
from suite.pruning.options import Bool, Int, MethodOptions
from suite.pruning.scoring import Scoring
from suite.pruning.select import whole_layers

NAME = "shortgpt"


class Options(MethodOptions):
    angular: Bool = False
    last_layer: Literal["final-norm", "raw"] = "final-norm"
    batch_size: Annotated[Int, Field(ge=1)] = 1


CALIBRATION = {
    "corpus": "c4", "nsamples": 128, "seqlen": 256,
    "source": "ShortGPT shortgpt/run_shortgpt.py: all PG19 validation books in 256-token chunks (stride=256); "
              "here C4 (PG19 not mirrored) and 128 windows of the authors' 256 tokens",
}
SELECTION = whole_layers()
OPTIONS = Options.defaults()


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor, angular: bool = False) -> torch.Tensor:
    """Per-token Block Influence of a layer: 1 − cos(input, output), or arccos(cos)/π if `angular`.

    inputs, outputs: [..., hidden] (same shape); returns [...] float64. A NaN cosine (a zero
    vector) reads 0.5 (ShortGPT `metrics.py::block_influence`)."""
    x, y = inputs.double(), outputs.double()
    sim = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    sim = sim.nan_to_num(nan=0.5)
    if angular:
        return torch.arccos(sim.clamp(-1.0, 1.0)) / torch.pi
    return 1 - sim


def score_layers(model, windows, budget, options, seed) -> Scoring:
    """BI of every decoder layer from one layer-by-layer pass over `windows` ([nsamples, seqlen]);
    scores {(i, "layers"): [BI_i]} for the layers of `budget.layers` (higher BI = keep)."""
    lp = LayerPass(model, windows, batch_size=int(options["batch_size"]))
    n = len(lp.layers)
    bi = [0.0] * n
    for i in range(n):
        with lp.resident(i):
            outputs = lp.forward(i)
        for x, y in zip(lp.hidden, outputs):
            if i == n - 1 and options["last_layer"] == "final-norm":
                with torch.no_grad():  # transformers' last hidden state: after the final norm
                    y = lp.finish(y.to(lp.device))
            bi[i] += float(block_influence(x.to(y.device), y, options["angular"]).sum())
        lp.advance(outputs)
    scores = {(i, "layers"): torch.tensor([bi[i]], dtype=torch.float64) for i in budget.layers}
    order = sorted(budget.layers, key=lambda i: bi[i])
    return Scoring(scores, info={"block_influence": bi, "prune_order": order, "tokens": lp.tokens,
                                 "angular": bool(options["angular"]), "last_layer": options["last_layer"]})
