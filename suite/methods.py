"""Registry of pruning methods: name -> `Method`, everything the harness needs beyond the module.

Adding a method is writing its module (the `suite.pruning.scoring` contract; README "Adding a method
in minutes") and adding ONE entry here:

    "my-method": Method(module="mypackage.my_method", summary="one line for --help"),

The registry's order is the tables' and the figure's order of methods (after the dense row).
`forward_only` says whether scoring runs without backprop (the generic memory formula and the
docs read it); `memory` names a score-phase formula `suite.memory_model:<function>` (Setting ->
bytes); without one, `suite run --dry-run` uses the generic formula (`suite.memory_model.generic_score`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from suite.pruning.errors import UserError


@dataclass(frozen=True)
class Method:
    module: str                # import path of the module implementing the scoring contract
    summary: str               # one line for `--help` (no import needed: help stays instant)
    forward_only: bool = True  # False: scoring backpropagates (gradients of the weights)
    memory: str | None = None  # "package.module:function" predicting the score phase's peak; None: generic
    zeroth_order: bool = False  # reads the loss of perturbed or masked models by forward passes alone (tables: †)


METHODS: dict[str, Method] = {
    "magnitude": Method(
        module="baselines.magnitude", memory="suite.memory_model:score_data_free",
        summary="L2 norm of each group's output weights (FLAP's mag_sp; data-free)"),
    "random": Method(
        module="baselines.seeded_random", memory="suite.memory_model:score_data_free",
        summary="seeded uniform random scores: the floor every criterion must beat (data-free)"),
    "wanda-sp": Method(
        module="baselines.wanda_sp", memory="suite.memory_model:score_layer_pass",
        summary="|W| x ||X||_2 summed over each group (Wanda applied to structures, FLAP's wanda_sp)"),
    "flap": Method(
        module="baselines.flap", memory="suite.memory_model:score_layer_pass",
        summary="fluctuation of each channel's input x squared weight norm, global, bias compensation (FLAP)"),
    "slicegpt": Method(
        module="baselines.slicegpt", memory="suite.memory_model:score_slicegpt",
        summary="PCA-rotate the residual stream layer by layer and delete its least-used directions (SliceGPT)"),
    "llm-pruner": Method(
        module="baselines.llm_pruner", forward_only=False, memory="suite.memory_model:score_llm_pruner",
        summary="first-order Taylor |w . dL/dw| from real backprop on 10 windows (LLM-Pruner)"),
    "minillm": Method(
        module="minillm.method", memory="suite.memory_model:score_minillm", zeroth_order=True,
        summary="feature-map sensitivity |W . g . X| with g estimated by forward passes only (MINI-LLM, SPSA)"),
    "bonsai": Method(
        module="baselines.bonsai", memory="suite.memory_model:score_bonsai", zeroth_order=True,
        summary="rounds of sampled sub-models' calibration perplexity regressed on their masks (Bonsai; forward-only)"),
    "shortgpt": Method(
        module="baselines.shortgpt", memory="suite.memory_model:score_shortgpt",
        summary="whole layers of lowest Block Influence 1 - cos(layer input, output), one pass (ShortGPT; depth)"),
    "sleb": Method(
        module="baselines.sleb", memory="suite.memory_model:score_sleb",
        summary="whole layers removed greedily, each the one whose removal least raises calibration loss (SLEB; depth)"),
}


def zeroth_order() -> set[str]:
    """The methods that estimate the loss's response to pruning from forward passes alone (MINI-LLM's
    SPSA, Bonsai's sub-models): the papers' "forward-only" methods, marked † in tables."""
    return {name for name, method in METHODS.items() if method.zeroth_order}


def method_order() -> list[str]:
    """Row order of tables and figures: the dense row, then the registry's order."""
    return ["dense", *METHODS]


def methods_help() -> str:
    """`name  summary` lines for the CLI's help."""
    width = max(map(len, METHODS))
    return "\n".join(f"  {name:<{width}}  {entry.summary}".rstrip() for name, entry in METHODS.items())


def registered(name: str) -> Method:
    """The registry entry of `name`; UserError naming the registered methods otherwise."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def get_method(name: str):
    """The method's module (imported)."""
    return importlib.import_module(registered(name).module)
