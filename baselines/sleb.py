"""`sleb`: Streamlining LLMs through Redundancy Verification and Elimination of Transformer Blocks
(Song et al., ICML 2024, arXiv 2402.09025): remove whole decoder layers greedily by calibration
perplexity, no retraining.

The algorithm (the paper's Algorithm 1; github jiwonsong-dev/SLEB `sleb.py::sleb`): with A the
layers still in the model, repeat `count` times: for every candidate j of A, evaluate the
calibration loss of the model without A's j-th layer (the others as they are), remove the j of
LEAST loss, and re-evaluate from scratch at the next step. The loss is the summed token NLL over
the calibration windows (SLEB's `get_loss`: each window's mean cross-entropy times seqlen, summed;
the same ranking), in float64 here; among equal losses the first candidate wins (its strict ``<``).

Barriers (SLEB's `early_barrier=1, latter_barrier=1` arguments): the first `early_barrier` and
the last `latter_barrier` layers STILL PRESENT are never candidates (the loop runs over
``range(early_barrier, len(alive) - latter_barrier)``): by default the first and the last layer
always stay. The suite's layer range further limits the candidates (default: all).

A removed layer is skipped as SLEB's `turn_off` does (its input passed on unchanged; the other
layers keep their own attention masks and positions, `layerwise.LayerPass` records each layer's).
Each evaluation runs the kept layers from the embeddings on the layer pass, one layer resident;
the layers before a candidate are run once per step and shared (the same numbers as a whole-model
forward per candidate: tests/test_sleb.py compares the order with a greedy loop over whole-model
perplexities). Cost per step: about L²/2 layer forwards over the calibration windows.

The method returns the removal order; its scores are −count … −1 for the removed layers in
removal order, 0 for the rest, so the engine's `select.select_layers` removes exactly them.

Options (from SLEB's `sleb()` arguments): early_barrier (1), latter_barrier (1); batch_size:
windows per forward (SLEB's `bs=1`; no effect on the choice beyond rounding).

Calibration: SLEB's defaults are 128 random 2048-token windows of the WikiText-2 TRAIN split,
seed 0 (`nsamples=128`, `model.seqlen = 2048` in `utils/model_utils.get_llm`,
`utils/data_utils.get_wikitext2`). The mirror here holds only WikiText-2's test split (calibrating
on it would leak into the WikiText-2 perplexity reported, FLAP issue #13), so the default corpus
is C4 with SLEB's 128 × 2048.
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch.nn import functional as F

from suite.pruning.architectures import decoder_and_head
from suite.pruning.errors import UserError
from suite.pruning.layerwise import LayerPass
from suite.pruning.options import Int, MethodOptions
from suite.pruning.scoring import Scoring
from suite.pruning.select import whole_layers

NAME = "sleb"


class Options(MethodOptions):
    """SLEB's `sleb()` arguments: the barriers (layers never removed at either end); batch_size: windows
    per forward (its `get_loss(bs=1)`)."""

    early_barrier: Annotated[Int, Field(ge=0)] = 1
    latter_barrier: Annotated[Int, Field(ge=0)] = 1
    batch_size: Annotated[Int, Field(ge=1)] = 1


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 128, "seqlen": 2048,
    "source": "SLEB sleb.py: nsamples=128 windows of model.seqlen=2048 (utils/model_utils.py) from WikiText-2 train, "
              "seed 0; here C4 (only WikiText-2 test is mirrored: calibrating on it leaks into its perplexity)",
}
SELECTION = whole_layers()


def _run(lp: LayerPass, hidden: list, layers) -> list:
    """`hidden` (per micro-batch) through decoder `layers` in order."""
    for i in layers:
        with lp.resident(i):
            hidden = lp.forward(i, hidden)
    return hidden


def _nll(lp: LayerPass, head, hidden: list, windows: torch.Tensor, batch_size: int) -> float:
    """Summed next-token NLL (float64) of the last layer's outputs `hidden` through the tail and head."""
    total = 0.0
    with torch.no_grad():
        for h, ids in zip(hidden, windows.split(batch_size)):
            logits = head(lp.finish(h.to(lp.device))).double()
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1).to(logits.device), reduction="sum"))
    return total


def score_layers(model, windows, budget, options, seed) -> Scoring:
    """SLEB's greedy removal of `budget.count` layers on `windows` ([nsamples, seqlen]).

    Raises UserError when the barriers and the layer range leave no candidate at some step."""
    batch_size = int(options["batch_size"])
    early, latter = int(options["early_barrier"]), int(options["latter_barrier"])
    _, head = decoder_and_head(model)
    lp = LayerPass(model, windows, batch_size=batch_size)
    start = list(lp.hidden)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    alive = list(range(len(lp.layers)))
    allowed = set(budget.layers)
    order, losses = [], []
    for step in range(budget.count):
        candidates = [j for j in range(early, len(alive) - latter) if alive[j] in allowed]
        if not candidates:
            raise UserError(f"sleb: no layer left to remove at step {step + 1} of {budget.count} (barriers "
                            f"{early}/{latter}, {len(alive)} layers left in the range's reach); lower the ratio")
        best, best_loss, prefix = None, float("inf"), start
        for j in range(candidates[-1] + 1):
            if j in candidates:  # the model without alive[j]: the shared prefix, then the layers after j
                loss = _nll(lp, head, _run(lp, prefix, alive[j + 1:]), windows, batch_size)
                if loss < best_loss:
                    best, best_loss = j, loss
            if j < candidates[-1]:
                prefix = _run(lp, prefix, [alive[j]])
        order.append(alive.pop(best))
        losses.append(best_loss / tokens)
    scores = {(i, "layers"): torch.tensor([0.0], dtype=torch.float64) for i in budget.layers}
    for k, i in enumerate(order):
        scores[(i, "layers")] = torch.tensor([float(k - len(order))], dtype=torch.float64)
    return Scoring(scores, info={"removal_order": order, "loss_per_token": losses,
                                 "perplexity": [float(torch.tensor(v).exp()) for v in losses],
                                 "tokens": int(tokens), "early_barrier": early, "latter_barrier": latter})
