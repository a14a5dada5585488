"""Issue 13: the shared helpers that replaced duplicates, and the option combinations that used to be
silently ignored (now one-line errors, exit 2, nothing written)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from suite.pruning.architectures import all_group_sets, group_columns, output_only
from suite.pruning.errors import UserError
from suite.pruning.scoring import standardise
from suite.models import load_model


# --------------------------------------------------------------------------- shared helpers
def test_standardise_is_the_unbiased_z_score_in_the_input_dtype():
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(257, generator=gen, dtype=torch.float64) * 5 + 2
    a = x64.numpy()
    expected = (a - a.mean()) / a.std(ddof=1)  # numpy: an independent computation
    got = standardise(x64)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # flap's arithmetic (its metrics are float64) is kept to the bit
    assert torch.equal(got, (x64 - x64.mean()) / x64.std())
    # minillm's float32 scores: computed in float64, returned in float32
    x32 = x64.float()
    got32 = standardise(x32)
    a32 = x32.double().numpy()
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ((a32 - a32.mean()) / a32.std(ddof=1)).astype(np.float32),
                               rtol=0, atol=2e-7)
    constant = torch.full((5,), 3.0)  # std 0: zeros
    assert torch.equal(standardise(constant), torch.zeros_like(constant))


def test_group_columns_lists_each_groups_block():
    assert group_columns([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert group_columns([4, 1], 1).tolist() == [4, 1]
    assert group_columns([], 5).tolist() == [] and group_columns([], 5).dtype == torch.long


def test_output_only_keeps_the_out_projection_member():
    model = load_model("tiny-llama")
    sets = all_group_sets(model)
    only = output_only(sets)
    assert [(g.layer, g.kind, g.count) for g in only] == [(g.layer, g.kind, g.count) for g in sets]
    assert all(g.members == (s.output,) and g.output == s.output and g.module is s.module
               for g, s in zip(only, sets))
    assert {s.output.name for s in sets} == {"self_attn.o_proj", "mlp.down_proj"}


def test_minillm_compensation_refuses_an_unsliced_projection_naming_the_method():
    from minillm.method import OPTIONS, score
    from suite.pruning.select import select

    model = load_model("tiny-llama")
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = score(model, windows, all_group_sets(model), {**OPTIONS, "gradient": "none", "compensate": True},
                   seed=0)
    plan = select(model, result.scores, 0.3).plan
    with pytest.raises(UserError, match=r"^minillm compensation: layer \d+ \w+ output projection was not sliced"):
        result.compensate(model, plan)  # never sliced: refused, the model is left as it was
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


# --------------------------------------------------------------------------- refused combinations
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
    # issue 13, part 2: every other option that a combination leaves unread (results/notes/simplification.md)
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
    # issue 13: one schema, one wording: check_scope is the Options validator (the scope as parse's context)
    from minillm import method as minillm_method
    from minillm.method import OPTIONS
    from suite.pruning.scoring import checked_options
    from suite.pruning.scoring import checked_options
    from minillm import method

    # a value equal to the default changes nothing, so it is not refused (the record holds it anyway)
    checked_options(minillm_method, {**OPTIONS, "gate_eps": OPTIONS["gate_eps"], "blockwise": False, "mask_groups": "all"})
    # issue 13: estimator=coordinate dropped here (blockwise=true with it is refused now: the same estimate)
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
        # issue 13 (trial 7): normalize=standard is read by the global scope only (tests/test_trial7.py)
        scope = "global" if given.get("normalize") == "standard" else None
        assert checked_options(method, given, scope) == {**method.OPTIONS, **given}


def test_the_option_defaults_are_unchanged():
    """issue 13: `OPTIONS` (the record's and the cell key's defaults) is today's dict, value for value
    and type for type (a literal copy of the dict before the split)."""
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


def test_one_hidden_state_knob_the_info_says_where_and_the_scores_are_the_same(monkeypatch):
    """`--hidden-on cpu` (layerwise.hidden_on) and `--opt hidden_on=cpu` are one mechanism: every
    layer-by-layer pass of minillm (statistics, SPSA) sees the same placement, the record's method
    info says where the hidden states were, and the scores do not depend on it."""
    from suite.pruning import layerwise
    from minillm.method import OPTIONS, score

    seen = []
    capture = layerwise.LayerPass._capture

    def spy(self, windows, batch_size):
        seen.append(layerwise.hidden_device())
        return capture(self, windows, batch_size)

    monkeypatch.setattr(layerwise.LayerPass, "_capture", spy)
    model = load_model("tiny-llama")
    sets = all_group_sets(model)
    windows = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    o = {**OPTIONS, "directions": 2, "batch_size": 2}
    on_device = score(model, windows, sets, o, seed=0)
    assert on_device.info["hidden_on"] == "device" and seen == [None, None]  # statistics, then SPSA
    runs = {}
    with layerwise.hidden_on("cpu"):  # what --hidden-on cpu / a grid's hidden_on: cpu set
        runs["engine"] = score(model, windows, sets, o, seed=0)
    runs["option"] = score(model, windows, sets, {**o, "hidden_on": "cpu"}, seed=0)
    assert seen[2:] == ["cpu"] * 4 and layerwise.hidden_device() is None  # reset after score
    for run in runs.values():
        assert run.info["hidden_on"] == "cpu"
        assert run.scores.keys() == on_device.scores.keys()
        assert all(torch.equal(run.scores[k], on_device.scores[k]) for k in on_device.scores)


# --------------------------------------------------------------------------- library replacements
def test_spearman_averages_ties_and_is_nan_for_a_constant_side():
    from minillm.diagnose import spearman

    a = torch.tensor([10.0, 20.0, 20.0, 30.0, 5.0])
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    ra, rb = np.array([1, 2.5, 2.5, 4, 0]), np.array([0, 2, 1, 4, 3])  # ranks by hand, ties averaged
    expected = ((ra - ra.mean()) @ (rb - rb.mean())) / np.sqrt(((ra - ra.mean()) ** 2).sum() * ((rb - rb.mean()) ** 2).sum())
    assert spearman(a, b) == pytest.approx(expected, abs=1e-15)
    assert spearman(torch.arange(6.0), -torch.arange(6.0) ** 3) == pytest.approx(-1.0)
    assert np.isnan(spearman(torch.ones(4), torch.arange(4.0))) and np.isnan(spearman(torch.ones(1), torch.ones(1)))


def test_safetensors_index_and_read_give_back_the_saved_tensors(tmp_path):
    from safetensors.torch import save_file

    from minillm.zo import _read_tensor, _safetensors_index

    gen = torch.Generator().manual_seed(1)
    saved = {"w": torch.randn(3, 4, generator=gen), "h": torch.randn(5, generator=gen).half(),
             "b": torch.randn(2, 2, generator=gen).bfloat16(), "d": torch.randn(2, generator=gen).double(),
             "empty": torch.zeros(0, 3), "ids": torch.arange(4)}
    path = tmp_path / "model.safetensors"
    save_file(saved, str(path))
    index = _safetensors_index(path)
    assert sorted(index) == ["b", "d", "empty", "h", "w"]  # float tensors only: SPSA perturbs nothing else
    for name, (where, key, shape) in index.items():
        assert (where, key, shape) == (path, name, tuple(saved[name].shape))
        got = _read_tensor(index[name])
        assert got.dtype == saved[name].dtype and torch.equal(got, saved[name])  # bit for bit


def test_checkpoint_restore_skips_an_unreadable_safetensors_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from minillm import zo

    from suite.pruning import loss as lm_loss
    from minillm.method import member_weights

    load_model("tiny-llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "broken.safetensors").write_bytes(b"\xff" * 64)  # a header length far past the end
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = member_weights(model, all_group_sets(model))
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    est = zo.spsa(lambda: lm_loss.calibration_loss(model, windows), named, 1e-3, 1, seed=0)
    summary = zo.restore_from_checkpoint(model, named, est.drift_bound)
    assert summary["restore"] == "checkpoint" and summary["restored"] == len(named)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_nan_perplexity_among_seeds_makes_the_cell_nan_instead_of_failing():
    """tables' seed statistics are pandas' now: a seed whose perplexity is NaN (a diverged model; the
    records keep NaN) makes that cell's mean and std NaN, shown as '–', as one NaN seed does; the old
    statistics.stdev raised AttributeError on it. The other columns keep their seeds' statistics."""
    import math
    import statistics

    from suite.tables import results_frame, to_markdown

    base = {"model": "m", "method": "random", "label": "random", "ratio_target": 0.2, "status": "ok",
            "params": {"pruned": 10}, "zero_shot": {}}
    records = [{**base, "seed": 0, "perplexity": {"wikitext2": 10.0, "ptb": 20.0}},
               {**base, "seed": 1, "perplexity": {"wikitext2": float("nan"), "ptb": 26.0}},
               {**base, "seed": 2, "perplexity": {"wikitext2": 12.0, "ptb": None}}]
    row = results_frame(records).iloc[0]
    assert math.isnan(row["WikiText-2"]) and math.isnan(row["WikiText-2 std"]) and row["Seeds"] == 3
    assert row["PTB"] == pytest.approx(23.0) and row["PTB std"] == pytest.approx(statistics.stdev([20.0, 26.0]))
    line = next(line for line in to_markdown(records).splitlines() if line.startswith("| m "))
    assert "| – |" in line.replace(" ", "").replace("|–|", "| – |") and "23.00 ± 4.24" in line


def test_the_diagnosis_checks_each_option_but_not_the_methods_combinations():
    """zo-diagnose runs every space on one set of options: it checks each option's type, choices and
    range against minillm's declaration, not the combinations the method refuses."""
    from minillm.diagnose import _Fields
    from minillm.method import NAME, OPTIONS, check_options
    from suite.pruning.options import parse

    given = {**OPTIONS, "space": "mask", "activation": "std", "blockwise": True}
    with pytest.raises(UserError, match="activation=std"):
        checked_options(minillm_method, given)  # the method: no FMS group reads activation with mask_groups=all
    assert parse(_Fields, NAME, given) == given
    assert parse(_Fields, NAME, {**given, "estimator": "coordinate"})["estimator"] == "coordinate"
    with pytest.raises(UserError, match=r"^minillm option directions: must be >= 1, got 0$"):
        parse(_Fields, NAME, {"directions": 0})
