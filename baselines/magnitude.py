"""`magnitude`: data-free group norm of weights (FLAP repository's `mag_sp`, LLM-Pruner's `l1`/`l2`).

Default (FLAP `lib/prune.py::prune_magnitude_sp`, the "magnitude" row of FLAP's and MINI-LLM's
tables): the score of input column j of the output projection (o_proj / out_proj / dense for heads,
down_proj / fc2 / dense_4h_to_h for channels) is its norm

    s_j = ||W_out[:, j]||_p                    (p = 2 by default, FLAP's torch.norm(W, dim=0))

and a head's score is the SUM of the scores of its head_dim columns (FLAP: reshape(-1, 128).sum(1));
a channel is one column. Groups are then ranked per layer (FLAP's uniform "UL-UM" structure).

Options:
  norm     "l2" (default, FLAP mag_sp) or "l1".
  members  "output" (default, FLAP mag_sp: output-projection columns only) or "all": every weight
           of the coupled group (q/k/v rows + o_proj columns; gate/up rows + down column), scored
           as the group's p-norm (sum_{w in group} |w|^p)^(1/p) (LLM-Pruner's MagnitudeImportance
           sums |w|^p over the group, a monotone transform of the same ranking). The same word and
           values as minillm's `members`. The old spelling `weights=output|group` is accepted
           (`weights=group` is `members=all`); results record `members`.
Biases are not weights of the norm (neither reference includes them).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from suite.pruning.layerwise import resident_sets
from suite.pruning.options import MethodOptions
from suite.pruning.scoring import Scoring

NAME = "magnitude"


class Options(MethodOptions):
    norm: Literal["l2", "l1"] = "l2"
    members: Literal["output", "all"] = "output"
    weights: Literal["output", "group", None] = Field(None, exclude=True)  # old spelling of `members`

    @model_validator(mode="before")
    @classmethod
    def _old_spelling(cls, given):
        """`weights=output|group` -> `members=output|all` (one of the two spellings, not both)."""
        old = given.get("weights") if isinstance(given, dict) else None
        if old is not None and "members" in given:
            raise ValueError("give members=output|all (weights= is its old spelling), not both")
        if old in ("output", "group"):  # another value: refused by the `weights` field's choices
            given = {**given, "members": {"output": "output", "group": "all"}[old]}
        return given

    @classmethod
    def defaults(cls) -> dict:
        return {k: v for k, v in super().defaults().items() if k != "weights"}


OPTIONS = Options.defaults()
CALIBRATION = None
SELECTION = {"scope": "layer", "layers": "all"}

_P = {"l1": 1, "l2": 2}


def score(model, windows, group_sets, options, seed) -> Scoring:
    p = _P[options["norm"]]
    scores = {}
    with torch.no_grad():
        for gs in resident_sets(group_sets):  # offloaded layers: weights read on the device
            if options["members"] == "output":
                # [count, width, out_features]: one norm per column, summed over the group's columns
                blocks = gs.weight_blocks(gs.output).double()
                scores[(gs.layer, gs.kind)] = torch.linalg.vector_norm(blocks, ord=p, dim=2).sum(1)
            else:
                total = torch.zeros(gs.count, dtype=torch.float64, device=gs.linear(gs.output).weight.device)
                for member in gs.members:
                    blocks = gs.weight_blocks(member).double()
                    total += blocks.abs().pow(p).sum(dim=(1, 2))
                scores[(gs.layer, gs.kind)] = total.pow(1.0 / p)
            scores[(gs.layer, gs.kind)] = scores[(gs.layer, gs.kind)].cpu()
    return Scoring(scores,
                   info={"norm": options["norm"], "members": options["members"]})
