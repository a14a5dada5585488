"""Registry of pruning methods: name -> the path of its module (the `suite.pruning.scoring` contract).

A method's module is imported only when the method is asked for (`get_method`), so the harness
imports no method at start-up (`python -m suite --help` imports none). Adding a method is adding its
module (in `baselines/` or `minillm/`, built on the engine `suite.pruning`), one line in METHODS and
one in SUMMARIES (README "Adding a method").
"""
from __future__ import annotations

import importlib

from suite.pruning.errors import UserError

METHODS = {
    "random": "baselines.seeded_random",
    "magnitude": "baselines.magnitude",
    "wanda-sp": "baselines.wanda_sp",
    "flap": "baselines.flap",
    "llm-pruner": "baselines.llm_pruner",
    "minillm": "minillm.method",
    "slicegpt": "baselines.slicegpt",
}

# One line each for `--help` (no import needed: help stays instant); the module docstring has the rest.
SUMMARIES = {
    "random": "seeded uniform random scores: the floor every criterion must beat (data-free)",
    "magnitude": "L2 norm of each group's output weights (FLAP's mag_sp; data-free)",
    "wanda-sp": "|W| x ||X||_2 summed over each group (Wanda applied to structures, FLAP's wanda_sp)",
    "flap": "fluctuation of each channel's input x squared weight norm, global, bias compensation (FLAP)",
    "llm-pruner": "first-order Taylor |w . dL/dw| from real backprop on 10 windows (LLM-Pruner)",
    "minillm": "feature-map sensitivity |W . g . X| with g estimated by forward passes only (MINI-LLM, SPSA)",
    "slicegpt": "PCA-rotate the residual stream layer by layer and delete its least-used directions (SliceGPT)",
}


def methods_help() -> str:
    """`name  summary` lines for the CLI's help."""
    width = max(map(len, METHODS))
    return "\n".join(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip() for name in METHODS)


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
