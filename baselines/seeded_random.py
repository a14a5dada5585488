"""`random`: every group gets a seeded uniform random score (the floor every criterion must beat).

Data-free. Same seed -> same scores -> same plan.
"""
from __future__ import annotations

import torch

from suite.pruning.options import MethodOptions
from suite.pruning.scoring import Scoring

NAME = "random"


class Options(MethodOptions):
    """No options (any given one is refused)."""


OPTIONS = Options.defaults()
CALIBRATION = None
SELECTION = {"scope": "layer", "layers": "all"}


def score(model, windows, group_sets, options, seed) -> Scoring:
    generator = torch.Generator().manual_seed(int(seed))
    return Scoring({(gs.layer, gs.kind): torch.rand(gs.count, generator=generator) for gs in group_sets})
