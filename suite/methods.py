"""Registry of pruning methods: name -> module implementing the `minillm.scoring` contract.

Adding a method is adding one line here (and its module).
"""
from __future__ import annotations

import importlib

from minillm.errors import UserError

METHODS = {
    "random": "baselines.seeded_random",
    "magnitude": "baselines.magnitude",
    "wanda-sp": "baselines.wanda_sp",
    "flap": "baselines.flap",
    "llm-pruner": "baselines.llm_pruner",
    "minillm": "minillm.method",
}


def get_method(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
