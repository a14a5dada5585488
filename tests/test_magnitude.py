"""Magnitude (baselines/magnitude.py): every group score recomputed independently (tests/group_scores.py),
and the old spelling of its `members` option (`weights=output|group`)."""
from __future__ import annotations

import pytest

from baselines import magnitude
from suite.models import load_model
from tests.group_scores import CASES, arch, close, members, output_weights, per_vector, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("norm,given", [("l2", {}), ("l1", {"members": "output"}), ("l2", {"members": "all"}),
                                        ("l1", {"members": "all"}), ("l2", {"weights": "output"}),
                                        ("l1", {"weights": "group"})])
def test_magnitude_scores(models, name, mode, norm, given):
    """`members=all` is the p-norm over every weight of the group; `weights=output|group` is the old spelling
    of `members=output|all` (same scores, computed here from the spelling's meaning, not through the alias)."""
    model = models(name)
    p = 1 if norm == "l1" else 2
    whole_group = given.get("members") == "all" or given.get("weights") == "group"
    want = {}
    if whole_group:
        for i, layer in enumerate(arch(model)["layers"](model)):
            for kind in ("heads", "channels"):
                mems, count = members(model, kind, mode)
                total = 0
                for mname, dim, width in mems:
                    w = layer.get_submodule(mname).weight.detach().double()
                    total = total + per_vector(w, dim, width, count).abs().pow(p).sum(dim=(1, 2))
                want[(i, kind)] = total.pow(1 / p)
    else:
        for i, kind, count, width, w in output_weights(model, mode):
            col = w.abs().pow(p).sum(0).pow(1 / p)                   # FLAP mag_sp: torch.norm(W, dim=0)
            want[(i, kind)] = col.view(count, width).sum(1)
    result = run(magnitude, model, None, mode, norm=norm, **given)
    close(result.scores, want)
    assert result.info == {"norm": norm, "members": "all" if whole_group else "output"}  # the canonical spelling


def test_magnitude_old_spelling_prunes_as_members_all_and_records_members():
    """`weights=group` (the old spelling) and `members=all` keep the same heads and channels through
    `suite.pipeline.prune`; the outcome's options (the record's `options`) name `members` only."""
    from suite.pipeline import prune

    outcomes = {}
    for spelling in ({"weights": "group"}, {"members": "all"}, {"weights": "output"}, {}):
        model = load_model("tiny-llama-gqa")
        outcomes[str(spelling)] = prune(model, None, "magnitude", 0.3, options=spelling)
    old, new = outcomes["{'weights': 'group'}"], outcomes["{'members': 'all'}"]
    assert old.selection.plan.to_json() == new.selection.plan.to_json()
    assert old.options == new.options == {"norm": "l2", "members": "all"}
    assert outcomes["{'weights': 'output'}"].options == outcomes["{}"].options == {"norm": "l2", "members": "output"}
    assert outcomes["{}"].selection.plan.to_json() != new.selection.plan.to_json()  # the option does change the plan


def test_a_grid_accepts_magnitude_old_spelling(tmp_path):
    from suite.config import load_config

    path = tmp_path / "grid.yaml"
    path.write_text("name: t\nmodels: [tiny-llama]\nmethods: [{name: magnitude, options: {weights: group}}]\n"
                    "ratios: [0.2]\n")
    assert load_config(path)["methods"][0]["options"] == {"weights": "group"}


def test_prune_cli_takes_magnitude_old_spelling_and_refuses_both(tmp_path, capsys):
    import json

    from suite.cli import main

    out = {}
    for name, opts in (("old", ["--opt", "weights=group"]), ("new", ["--opt", "members=all"])):
        out[name] = tmp_path / name
        assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.3", "--out",
                     str(out[name]), "--quiet", *opts]) == 0
    plans = [json.loads((out[name] / "plan.json").read_text()) for name in ("old", "new")]
    assert plans[0] == plans[1]
    capsys.readouterr()
    assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.3", "--out",
                 str(tmp_path / "both"), "--opt", "weights=group", "--opt", "members=all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: magnitude options: give members=output|all") and err.count("\n") == 1
    assert not (tmp_path / "both").exists()
