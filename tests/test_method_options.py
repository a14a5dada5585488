"""Method options as one pydantic declaration per method (suite/pruning/options.py, scoring.checked_options):
the baselines' `Options`; finite numbers; an option's choices and did-you-mean.

Defaults are compared with literal copies of the dicts the modules had before the conversion; every
refusal is one UserError line, raised by `checked_options` (the CLI, the grid config and the Python
pipeline all call it).
"""
from __future__ import annotations

import pytest

from baselines import flap, llm_pruner, magnitude, seeded_random, wanda_sp
from suite.pruning.errors import UserError
from suite.pruning.scoring import checked_options
from tests.grids import load_grid

BEFORE = {  # the modules' OPTIONS dicts before their pydantic declarations, copied literally
    flap: {"compensate": True, "head_power": 2.0, "batch_size": 1, "variance": "exact"},
    llm_pruner: {"importance": "element1", "aggregation": "sum", "batch_size": 0},
    wanda_sp: {"batch_size": 1, "sequential": True},
    seeded_random: {},
    magnitude: {"norm": "l2", "members": "output"},  # `weights` renamed `members` (minillm's word; results/notes/naming.md)
}


@pytest.mark.parametrize("module", list(BEFORE), ids=lambda m: m.NAME)
def test_defaults_are_the_dicts_of_before(module):
    assert list(module.OPTIONS.items()) == list(BEFORE[module].items())
    assert [type(v) for v in module.OPTIONS.values()] == [type(v) for v in BEFORE[module].values()]
    assert checked_options(module, None) == BEFORE[module]
    assert not hasattr(module, "check_options")  # one declaration: no second validation layer


def test_cli_strings_are_converted():
    assert checked_options(wanda_sp, {"batch_size": "4", "sequential": "false"}) == {"batch_size": 4, "sequential": False}
    assert checked_options(flap, {"head_power": "1e0", "compensate": "no"})["head_power"] == 1.0
    assert checked_options(llm_pruner, {"batch_size": 2.0})["batch_size"] == 2


@pytest.mark.parametrize("module, given, scope, says", [
    (flap, {"batch_size": 0}, None, "flap option batch_size: must be >= 1, got 0"),
    (flap, {"variance": "streaming"}, None, "flap option variance='streaming': choose one of exact, reference"),
    (flap, {"compensate": 1.5}, None, "flap option compensate: expected bool, got 1.5"),
    (wanda_sp, {"batch_size": -2}, None, "wanda-sp option batch_size: must be >= 1, got -2"),
    (wanda_sp, {"batch_size": True}, None, "wanda-sp option batch_size: expected int, got True"),
    (wanda_sp, {}, "global", "wanda-sp with sequential=true prunes every layer to its own budget: "
                             "scope 'global' needs --opt sequential=false"),
    (llm_pruner, {"batch_size": -1}, None, "llm-pruner option batch_size: must be >= 0, got -1"),
    (llm_pruner, {"aggregation": "min"}, None, "llm-pruner option aggregation='min': choose one of sum, mean, max, prod"),
    (seeded_random, {"norm": "l1"}, None, "method 'random' has no option 'norm'; options: none"),
])
def test_refusals_are_one_line(module, given, scope, says):
    with pytest.raises(UserError) as err:
        checked_options(module, given, scope)
    assert str(err.value) == says


def test_one_shot_wanda_sp_takes_a_global_scope():
    assert checked_options(wanda_sp, {"sequential": False}, "global") == {"batch_size": 1, "sequential": False}
    assert checked_options(wanda_sp, {}, "layer")["sequential"] is True


def test_the_python_pipeline_refuses_what_the_cli_refuses():
    """suite.pipeline.prune checks options (with its scope) before calibrating or scoring."""
    from suite.models import load_model
    from suite.pipeline import prune

    model = load_model("tiny-llama")
    with pytest.raises(UserError, match="wanda-sp option batch_size: must be >= 1, got 0"):
        prune(model, None, "wanda-sp", 0.2, options={"batch_size": 0})
    with pytest.raises(UserError, match="scope 'global' needs --opt sequential=false"):
        prune(model, None, "wanda-sp", 0.2, scope="global")


def test_an_option_typo_gets_a_did_you_mean_in_a_grid_and_on_the_cli(tmp_path):
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=r"options\.directons: unknown option of minillm \(did you mean 'directions'\?"):
        load_grid(tmp_path, "minillm", "directons: 4")
    with pytest.raises(UserError, match=r"no option 'directons' \(did you mean 'directions'\?\)"):
        checked_options(method, {"directons": 4})


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_a_float_option_must_be_finite(value):
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=f"minillm option eps: expected a finite number, got '{value}'"):
        checked_options(method, {"eps": value})


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf"])
def test_a_whole_number_option_must_be_finite_too(value):
    """Not an OverflowError traceback (int(inf)) on --opt directions=inf: one line."""
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=f"minillm option directions: expected a finite number, got '{value}'"):
        checked_options(method, {"directions": value})


def test_the_choices_of_an_aliased_option_do_not_show_its_internal_none():
    from baselines import magnitude
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError) as err:
        checked_options(magnitude, {"weights": "all"})
    assert str(err.value) == "magnitude option weights='all': choose one of output, group"
