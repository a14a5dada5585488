"""`normalize=standard | unit`: z-scores for a global ranking (this project's; the paper ranks per layer).

The default, `normalize=param` (score per parameter of the group), is the paper path's
(`minillm.method.score`). These two matter for `--scope global` (`standard` is monotone within a
layer and kind, so Algorithm 1's per-layer ranking is unchanged by it; `unit` is not):
  standard  z-score of the group scores within each layer's heads / channels (`scoring.standardise`);
  unit      FLAP's Eq. 5 structure (An et al. 2024; FLAP `lib/prune.py::prune_flap`, AL-AM): z-scores
            over a module's feature-map units (a head's head_dim dimensions, a channel), a group's
            score the MEAN of its units' (a head averages head_dim z-scores, which keeps heads out of
            the global ranking's low end unless all their dimensions are weak). Groups scored by gates
            have no units: they are standardised per group. Unit scores are per-unit SUMS of the
            element sensitivities (`minillm.method.fms_scores`' `units`): `aggregate` is not read.
"""
from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, model_validator

from suite.pruning.errors import UserError
from suite.pruning.options import MethodOptions
from suite.pruning.scoring import standardise
from minillm.variants import changed, refuse


class NormalizationOptions(MethodOptions):
    normalize: Literal["param", "standard", "unit"] = "param"

    @model_validator(mode="after")
    def _unit_scores_are_sums(self, info: ValidationInfo):
        if self.normalize == "standard" and (info.context or {}).get("scope") in (None, "layer"):
            raise UserError("minillm option normalize=standard z-scores each layer's heads and channels apart, "
                            "which keeps their order; the layer scope (minillm's default) ranks each layer's heads "
                            "and channels apart too, so it would be ignored: use it with --scope global (a grid: scope: global)")
        if self.normalize == "unit":
            for name in changed(self, "aggregate"):
                raise refuse(self, name, "aggregates a group's element sensitivities; normalize=unit scores a "
                                         "group by its units' per-unit sums instead and it would be ignored")
        return self


def normalized(scores: dict, units: dict, group_sets, how: str) -> dict:
    """{(layer, kind): scores} z-scored as `how` ("standard" | "unit"); `units[(layer, kind)]`: the
    [count, width] per-unit FMS of the FMS-scored groups (gate-scored groups have none)."""
    out = dict(scores)
    for gs in group_sets:
        key = (gs.layer, gs.kind)
        if how == "unit" and key in units:
            u = units[key]
            out[key] = standardise(u.flatten()).view_as(u).mean(dim=1).float()
        else:
            out[key] = standardise(scores[key])
    return out
