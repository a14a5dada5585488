"""MINI-LLM's options (minillm/method.py `Options`): every option a combination leaves unread is refused
(one line, exit 2, nothing written) by the CLI, a grid and the Python API alike; the same option is
accepted where something reads it; the defaults; the diagnosis checks options one by one."""
from __future__ import annotations

import pytest

from suite.pruning.errors import UserError
from tests.grids import load_grid


REFUSED = {  # --opt values -> the option the one-line error must name
    "blockwise with backprop": (["space=mask", "blockwise=true", "gradient=backprop"], "blockwise=true"),
    "abs=group with aggregate=max": (["abs=group", "aggregate=max"], "abs=group"),
    "fms_gradient in the weight space": (["fms_gradient=zo"], "fms_gradient=zo"),
    "gate_eps in the weight space": (["gate_eps=0.05"], "gate_eps=0.05"),
    "estimator in the weight space": (["estimator=coordinate"], "estimator=coordinate"),
    "mask_groups in the weight space": (["mask_groups=heads"], "mask_groups=heads"),
    "layer_lambda in the weight space": (["layer_lambda=0.2"], "layer_lambda=0.2"),
    "blockwise in the weight space": (["blockwise=true"], "blockwise=true"),
    "blockwise in the layer space": (["space=layer", "blockwise=true"], "blockwise=true"),
    "layer_lambda in the mask space": (["space=mask", "layer_lambda=0.2"], "layer_lambda=0.2"),
    "fms_gradient without FMS groups": (["space=mask", "fms_gradient=none"], "fms_gradient=none"),
    # every other option that a combination leaves unread
    "activation without FMS groups": (["space=mask", "activation=std"], "activation=std"),
    "activation without FMS groups, compensated": (["space=mask", "activation=std", "compensate=true"],
                                                   "activation=std"),  # compensation reads the mean, not X
    "aggregate without FMS groups": (["space=mask", "aggregate=mean"], "aggregate=mean"),
    "abs without FMS groups": (["space=mask", "abs=group"], "abs=group"),
    "members without FMS groups": (["space=mask", "members=output"], "members=output"),
    "aggregate with normalize=unit": (["normalize=unit", "aggregate=max"], "aggregate=max"),
    "directions with backprop": (["gradient=backprop", "directions=4"], "directions=4"),
    "eps with backprop": (["gradient=backprop", "eps=0.01"], "eps=0.01"),
    "perturb with backprop": (["gradient=backprop", "perturb=all"], "perturb=all"),
    "restore with backprop": (["gradient=backprop", "restore=arithmetic"], "restore=arithmetic"),
    "seed with backprop": (["gradient=backprop", "seed=3"], "seed=3"),
    "gate_eps with backprop gates": (["space=mask", "gradient=backprop", "gate_eps=0.05"], "gate_eps=0.05"),
    "estimator with backprop gates": (["space=layer", "gradient=backprop", "estimator=coordinate"],
                                      "estimator=coordinate"),
    "directions with gradient=none": (["gradient=none", "directions=4"], "directions=4"),
    "eps with gradient=none": (["gradient=none", "eps=0.01"], "eps=0.01"),
    "perturb with gradient=none": (["gradient=none", "perturb=all"], "perturb=all"),
    "restore with gradient=none": (["gradient=none", "restore=checkpoint"], "restore=checkpoint"),
    "seed with gradient=none": (["gradient=none", "seed=3"], "seed=3"),
    "directions with gradient=noise": (["gradient=noise", "directions=4"], "directions=4"),
    "eps with gradient=noise": (["gradient=noise", "eps=0.01"], "eps=0.01"),
    "perturb with gradient=noise": (["gradient=noise", "perturb=all"], "perturb=all"),
    "restore with gradient=noise": (["gradient=noise", "restore=arithmetic"], "restore=arithmetic"),
    "weight eps in the mask space": (["space=mask", "eps=0.01"], "eps=0.01"),
    "seed with coordinate gates and no weight SPSA": (["space=layer", "estimator=coordinate", "fms_gradient=none",
                                                      "seed=3"], "seed=3"),
    "blockwise with coordinate": (["space=mask", "blockwise=true", "estimator=coordinate"], "blockwise=true"),
}


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_option_that_would_be_ignored_is_refused_by_the_cli(case, tmp_path, capsys):
    from suite.cli import main

    given, named = REFUSED[case]
    out = tmp_path / "pruned"
    opts = [arg for pair in given for arg in ("--opt", pair)]
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out", str(out),
                 *opts]) == 2
    assert named in _one_error_line(capsys)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_space_layer_with_global_scope_is_refused_by_prune_and_by_a_grid(tmp_path, capsys):
    from suite.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out", str(out),
                 "--opt", "space=layer", "--scope", "global"]) == 2
    line = _one_error_line(capsys)
    assert "space=layer" in line and "global" in line and not out.exists()
    config = tmp_path / "grid.yaml"
    config.write_text("name: g\nmodels: [tiny-llama]\nmethods:\n  - name: minillm\n"
                      "    options: {space: layer, scope: global}\nratios: [0.2]\n")
    results = tmp_path / "results.jsonl"
    assert main(["run", str(config), "--out", str(results), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "methods[0].options" in line and "space=layer" in line and "global" in line
    assert not results.exists()


def test_defaults_given_explicitly_and_the_options_own_spaces_are_accepted():
    # the scope is checked by the Options validator (the scope as parse's context)
    from minillm import method as minillm_method
    from minillm.method import OPTIONS
    from suite.pruning.scoring import checked_options
    from minillm import method

    # a value equal to the default changes nothing, so it is not refused (the record holds it anyway)
    checked_options(minillm_method, {**OPTIONS, "gate_eps": OPTIONS["gate_eps"], "blockwise": False, "mask_groups": "all"})
    # not with estimator=coordinate: blockwise=true with it is refused (the same estimate)
    checked_options(minillm_method, {**OPTIONS, "space": "mask", "blockwise": True, "mask_groups": "heads", "fms_gradient": "zo",
                   "gate_eps": 0.05})
    checked_options(minillm_method, {**OPTIONS, "space": "mask", "mask_groups": "heads", "estimator": "coordinate", "directions": 4})
    checked_options(minillm_method, {**OPTIONS, "space": "layer", "layer_lambda": 0.2, "fms_gradient": "none"})
    checked_options(minillm_method, {**OPTIONS, "abs": "group", "aggregate": "mean"})
    checked_options(minillm_method, {**OPTIONS, "space": "layer"}, None)  # minillm's default scope is per layer
    checked_options(minillm_method, {**OPTIONS, "space": "weight"}, "global")
    assert checked_options(method, {"space": "layer"}, "layer")["space"] == "layer"
    with pytest.raises(UserError, match="space=layer"):
        checked_options(method, {"space": "layer"}, "global")


def test_options_read_in_some_combination_only_are_accepted_there():
    """The refusals name what reads each option; where something does, the option is accepted."""
    from minillm import method
    from suite.pruning.scoring import checked_options

    for given in ({"gradient": "noise", "seed": 3},  # the noise draw is seeded
                  {"gradient": "backprop", "directions": 16, "eps": 1e-3, "seed": -1},  # defaults, explicitly
                  {"space": "layer", "gradient": "backprop", "fms_gradient": "zo", "directions": 4, "eps": 0.01,
                   "seed": 3, "restore": "arithmetic"},  # the FMS part's weight SPSA reads them
                  {"space": "mask", "mask_groups": "heads", "activation": "std", "members": "output", "eps": 0.01},
                  {"space": "mask", "estimator": "coordinate", "directions": 4},  # the coordinate streams
                  {"space": "mask", "gradient": "backprop", "mask_groups": "heads", "fms_gradient": "zo", "seed": 3},
                  {"normalize": "unit", "abs": "group", "members": "output", "activation": "std"},
                  {"normalize": "standard", "aggregate": "mean"}):
        # normalize=standard is read by the global scope only (test_normalize_standard_is_refused_per_layer...)
        scope = "global" if given.get("normalize") == "standard" else None
        assert checked_options(method, given, scope) == {**method.OPTIONS, **given}


def test_the_option_defaults_are_unchanged():
    """`OPTIONS` (the record's and the cell key's defaults) is the dict of before the pydantic declaration,
    value for value and type for type (a literal copy of it)."""
    from minillm.method import OPTIONS

    before = {"space": "weight", "gradient": "zo", "fms_gradient": "same", "eps": 1e-3, "gate_eps": 1e-2,
              "directions": 16, "perturb": "prunable", "activation": "l2", "aggregate": "sum", "abs": "element",
              "members": "all", "estimator": "spsa", "blockwise": False, "mask_groups": "all", "layer_lambda": 0.3,
              "normalize": "param", "compensate": False, "restore": "auto", "batch_size": 4, "hidden_on": "device",
              "seed": -1}
    assert OPTIONS == before
    assert {k: type(v) for k, v in OPTIONS.items()} == {k: type(v) for k, v in before.items()}


def test_an_ignored_option_is_refused_by_a_grid_config(tmp_path):
    from suite.config import load_config

    config = tmp_path / "grid.yaml"
    config.write_text("name: g\nmodels: [tiny-llama]\nmethods:\n  - name: minillm\n"
                      "    options: {gradient: backprop, directions: 4}\nratios: [0.2]\n")
    with pytest.raises(UserError) as err:
        load_config(config)
    line = str(err.value)
    assert "\n" not in line and "methods[0].options" in line and "directions=4" in line and "backprop" in line


def test_normalize_standard_is_refused_per_layer_and_accepted_globally(tmp_path):
    from minillm import method
    from suite.pruning.scoring import checked_options

    for scope in (None, "layer"):
        with pytest.raises(UserError, match="normalize=standard .* use it with --scope global"):
            checked_options(method, {"normalize": "standard"}, scope)
    assert checked_options(method, {"normalize": "standard"}, "global")["normalize"] == "standard"
    assert checked_options(method, {"normalize": "unit"}, "layer")["normalize"] == "unit"  # not monotone: read
    with pytest.raises(UserError, match="methods\\[0\\].options: minillm option normalize=standard"):
        load_grid(tmp_path, "minillm", "normalize: standard")
    assert load_grid(tmp_path, "minillm", "normalize: standard, scope: global")["methods"][0]["options"]["scope"] == "global"


def test_the_diagnosis_checks_each_option_but_not_the_methods_combinations():
    """zo-diagnose runs every space on one set of options: it checks each option's type, choices and
    range against minillm's declaration, not the combinations the method refuses."""
    from minillm import method as minillm_method
    from minillm.diagnose import _Fields
    from minillm.method import NAME, OPTIONS
    from suite.pruning.options import parse
    from suite.pruning.scoring import checked_options

    given = {**OPTIONS, "space": "mask", "activation": "std", "blockwise": True}
    with pytest.raises(UserError, match="activation=std"):
        checked_options(minillm_method, given)  # the method: no FMS group reads activation with mask_groups=all
    assert parse(_Fields, NAME, given) == given
    assert parse(_Fields, NAME, {**given, "estimator": "coordinate"})["estimator"] == "coordinate"
    with pytest.raises(UserError, match=r"^minillm option directions: must be >= 1, got 0$"):
        parse(_Fields, NAME, {"directions": 0})
