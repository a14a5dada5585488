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
    "bonsai": "baselines.bonsai",
}

# One line each for `--help` (no import needed: help stays instant); the module docstring has the rest.
SUMMARIES = {
    "random": "seeded uniform random scores: the floor every criterion must beat (data-free)",
    "magnitude": "L2 norm of each group's output weights (FLAP's mag_sp; data-free)",
    "wanda-sp": "|W| x ||X||_2 summed over each group (Wanda applied to structures, FLAP's wanda_sp)",
    "flap": "fluctuation of each channel's input x squared weight norm, global, bias compensation (FLAP)",
    "llm-pruner": "first-order Taylor |w . dL/dw| from real backprop on 10 windows (LLM-Pruner)",
    "minillm": "feature-map sensitivity |W . g . X| with g estimated by forward passes only (MINI-LLM, SPSA)",
    "bonsai": "rounds of sampled sub-models' calibration perplexity regressed on their masks (Bonsai; forward-only)",
}

# Methods that read how the calibration LOSS responds to pruning from forward passes only (no backward):
# the question MINI-LLM and Bonsai both answer. The tables mark them (suite/tables.py FORWARD_MARK);
# the data-free and activation-statistics baselines read no loss, llm-pruner backpropagates.
FORWARD_ONLY = {"minillm", "bonsai"}


def methods_help() -> str:
    """`name  summary` lines for the CLI's help."""
    width = max(map(len, METHODS))
    return "\n".join(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip() for name in METHODS)


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
