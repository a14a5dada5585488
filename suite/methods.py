"""Registry of pruning methods: name -> module implementing the `suite.pruning.scoring` contract.

Adding a method is adding one line here and one in SUMMARIES (and its module).
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
    "shortgpt": "baselines.shortgpt",
    "sleb": "baselines.sleb",
}

# One line each for `--help` (no import needed: help stays instant); the module docstring has the rest.
SUMMARIES = {
    "random": "seeded uniform random scores: the floor every criterion must beat (data-free)",
    "magnitude": "L2 norm of each group's output weights (FLAP's mag_sp; data-free)",
    "wanda-sp": "|W| x ||X||_2 summed over each group (Wanda applied to structures, FLAP's wanda_sp)",
    "flap": "fluctuation of each channel's input x squared weight norm, global, bias compensation (FLAP)",
    "llm-pruner": "first-order Taylor |w . dL/dw| from real backprop on 10 windows (LLM-Pruner)",
    "minillm": "feature-map sensitivity |W . g . X| with g estimated by forward passes only (MINI-LLM, SPSA)",
    "shortgpt": "whole layers of lowest Block Influence 1 - cos(layer input, output), one pass (ShortGPT; depth)",
    "sleb": "whole layers removed greedily, each the one whose removal least raises calibration loss (SLEB; depth)",
}


def methods_help() -> str:
    """`name  summary` lines for the CLI's help."""
    width = max(map(len, METHODS))
    return "\n".join(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip() for name in METHODS)


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
