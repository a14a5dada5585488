"""The findings of the seventh fresh-user trial (results/notes/newcomer.md §7), one test each."""
from __future__ import annotations

import json

import pytest
import torch

from suite.pruning.errors import UserError

GRID = "name: g\nmodels: [tiny-llama]\nratios: [0.2]\nmethods: [{{name: {method}, options: {{{options}}}}}]\n{extra}"


def load(tmp_path, method="minillm", options="", extra=""):
    from suite.config import load_config

    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(method=method, options=options, extra=extra))
    return load_config(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- 1. a grid's selection options
@pytest.mark.parametrize("option, says", [
    ("scope: globl", "methods[0].options.scope: expected one of layer, global, got 'globl'"),
    ("layers: foo", "methods[0].options.layers: layers must be 'all', 'start:end' or a list, got 'foo'"),
    ("layers: 3", "methods[0].options.layers: expected 'all', 'start:end' or a list, got 3"),
    ("round_to: -1", "methods[0].options.round_to: expected a positive integer, got -1"),
    ("head_mode: x", "methods[0].options.head_mode: expected one of q-head, kv-group, got 'x'"),
    ("allow_empty: maybe", "methods[0].options.allow_empty: expected boolean, got 'maybe'"),
])
def test_a_grid_s_selection_options_are_checked_when_it_loads(tmp_path, option, says):
    """Before: accepted, and the cell failed (or --dry-run predicted it); now one line at load time."""
    with pytest.raises(UserError) as err:
        load(tmp_path, "magnitude", option)
    assert str(err.value) == f"{tmp_path / 'g.yaml'}: {says}"


def test_a_grid_s_good_selection_options_are_kept_as_given(tmp_path):
    options = "scope: global, layers: [0.125, 0.875], round_to: 8, head_mode: kv-group, allow_empty: true"
    config = load(tmp_path, "magnitude", options)
    assert config["methods"][0]["options"] == {"scope": "global", "layers": [0.125, 0.875], "round_to": 8,
                                               "head_mode": "kv-group", "allow_empty": True}


def test_an_option_typo_gets_a_did_you_mean_in_a_grid_and_on_the_cli(tmp_path):
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=r"options\.directons: unknown option of minillm \(did you mean 'directions'\?"):
        load(tmp_path, "minillm", "directons: 4")
    with pytest.raises(UserError, match=r"no option 'directons' \(did you mean 'directions'\?\)"):
        checked_options(method, {"directons": 4})


# --------------------------------------------------------------------------- 2. normalize=standard per layer
def test_standardised_scores_select_the_same_groups_in_the_layer_scope():
    """Why normalize=standard is refused with the layer scope: a z-score per (layer, kind) keeps the
    order, and the layer scope ranks each (layer, kind) apart, so the plan is the same (checked here
    with random scores against the shared selection), while the global scope's plan changes."""
    from suite.pruning.architectures import all_group_sets
    from suite.pruning.scoring import standardise
    from suite.pruning.select import select
    from suite.models import load_model

    model = load_model("tiny-llama")
    gen = torch.Generator().manual_seed(0)
    raw = {(gs.layer, gs.kind): torch.rand(gs.count, generator=gen) * (10.0 ** gs.layer) for gs in all_group_sets(model)}
    z = {key: standardise(value) for key, value in raw.items()}
    plans = {(scope, name): select(model, scores, 0.3, scope=scope).plan.to_json()
             for scope in ("layer", "global") for name, scores in (("raw", raw), ("z", z))}
    assert plans[("layer", "raw")] == plans[("layer", "z")]
    assert plans[("global", "raw")] != plans[("global", "z")]


def test_normalize_standard_is_refused_per_layer_and_accepted_globally(tmp_path):
    from minillm import method
    from suite.pruning.scoring import checked_options

    for scope in (None, "layer"):
        with pytest.raises(UserError, match="normalize=standard .* use it with --scope global"):
            checked_options(method, {"normalize": "standard"}, scope)
    assert checked_options(method, {"normalize": "standard"}, "global")["normalize"] == "standard"
    assert checked_options(method, {"normalize": "unit"}, "layer")["normalize"] == "unit"  # not monotone: read
    with pytest.raises(UserError, match="methods\\[0\\].options: minillm option normalize=standard"):
        load(tmp_path, "minillm", "normalize: standard")
    assert load(tmp_path, "minillm", "normalize: standard, scope: global")["methods"][0]["options"]["scope"] == "global"


# --------------------------------------------------------------------------- 4. finite numbers, choices
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
def test_a_float_option_must_be_finite(value):
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=f"minillm option eps: expected a finite number, got '{value}'"):
        checked_options(method, {"eps": value})


def test_a_grid_s_infinite_float_option_is_refused(tmp_path):
    with pytest.raises(UserError, match="minillm option eps: expected a finite number, got inf"):
        load(tmp_path, "minillm", "eps: .inf")


def test_the_choices_of_an_aliased_option_do_not_show_its_internal_none():
    from baselines import magnitude
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError) as err:
        checked_options(magnitude, {"weights": "all"})
    assert str(err.value) == "magnitude option weights='all': choose one of output, group"


# --------------------------------------------------------------------------- 3. one hidden-state setting
@pytest.mark.parametrize("engine, own", [("cpu", "device"), ("device", "cpu")])
def test_contradicting_hidden_state_settings_are_refused_before_loading(tmp_path, capsys, monkeypatch, engine, own):
    from suite import models
    from suite.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out",
                 str(tmp_path / "o"), "--hidden-on", engine, "--opt", f"hidden_on={own}"]) == 2
    assert f"--opt hidden_on={own} contradicts --hidden-on {engine}" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=r"methods\[0\]\.options\.hidden_on: 'device' contradicts the grid's"):
        load(tmp_path, "minillm", "hidden_on: device", extra="hidden_on: cpu\n")


@pytest.mark.parametrize("args", [["--hidden-on", "cpu"], ["--opt", "hidden_on=cpu"]])
def test_pruning_json_says_cpu_in_all_three_places_whichever_spelling(tmp_path, args):
    """Before: `--hidden-on cpu` recorded options.hidden_on device; `--opt hidden_on=cpu` recorded
    the top-level hidden_on device. Both spellings: the same setting, said the same everywhere."""
    from suite.cli import main

    out = tmp_path / "o"
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out", str(out),
                 "--quiet", "--nsamples", "2", "--seqlen", "16", "--opt", "directions=1", *args]) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert (record["hidden_on"], record["options"]["hidden_on"], record["method_info"]["hidden_on"]) == ("cpu",) * 3


# --------------------------------------------------------------------------- trial 7b (the re-check)
@pytest.mark.parametrize("args, says", [
    (["--scope", "globl"], "argument --scope: invalid choice: 'globl'"),
    (["--round-to", "abc"], "argument --round-to: invalid int value: 'abc'"),
    (["--head-mode", "kv"], "argument --head-mode: invalid choice: 'kv'"),
])
def test_argparse_errors_are_one_line_too(tmp_path, capsys, args, says):
    """Before: argparse's 13-line usage block; now the suite's one line, exit 2."""
    from suite.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--ratio", "0.2", "--out",
              str(tmp_path / "o"), *args])
    assert exit_.value.code == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf"])
def test_a_whole_number_option_must_be_finite_too(value):
    """Before: OverflowError traceback (int(inf)) on --opt directions=inf."""
    from minillm import method
    from suite.pruning.scoring import checked_options

    with pytest.raises(UserError, match=f"minillm option directions: expected a finite number, got '{value}'"):
        checked_options(method, {"directions": value})


@pytest.mark.parametrize("layers", ["'5:2'", "'0.9:0.1'", "[]", "'-1:4'"])
def test_a_grid_s_layer_range_empty_or_negative_on_any_model_is_refused(tmp_path, layers):
    with pytest.raises(UserError, match=r"methods\[0\]\.options\.layers: the layer range .* (empty|negative) on any model"):
        load(tmp_path, "magnitude", f"layers: {layers}")
