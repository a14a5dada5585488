"""Experiment configs: schema errors name the file and the key path; defaults; grid expansion."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from suite.pruning.errors import UserError
from suite import config as config_module
from suite.config import PAPER_TASKS, expand_cells, load_config
from suite.records import cell_key
from tests.grids import load_grid

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL_METHODS = ["magnitude", "random", "wanda-sp", "flap", "llm-pruner", "minillm"]


@pytest.fixture
def registry(monkeypatch):
    """A fake `suite.methods` whose methods take `eps` (float), `steps` (int) and `mode` (str)."""
    from suite.pruning.options import Bool, Float, Int, MethodOptions

    class Options(MethodOptions):
        eps: Float = 1e-3
        steps: Int = 4
        mode: str = "fo"
        flag: Bool = False

    module = types.ModuleType("fake_method")
    module.NAME, module.Options, module.OPTIONS = "fake", Options, Options.defaults()
    fake = types.ModuleType("suite.methods")
    fake.METHODS = {name: module for name in ALL_METHODS}
    monkeypatch.setitem(sys.modules, "suite.methods", fake)
    return fake


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: t\nmodels: [tiny-llama]\nmethods: [random]\nratios: [0.2]\n"


def test_minimal_config_gets_every_default(tmp_path, registry):
    config = load_config(write(tmp_path, MINIMAL))
    assert config["seeds"] == [0]
    assert config["calibration"] == {"corpus": "c4", "nsamples": None, "seqlen": None}  # None: the method's own
    assert config["evaluation"] == {"perplexity": ["wikitext2", "ptb", "c4"], "seqlen": 128, "max_tokens": None,
                                    "tasks": PAPER_TASKS, "limit": None, "batch_size": 1, "throughput": True}
    assert PAPER_TASKS == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert (config["device"], config["dtype"], config["dense"]) == ("cpu", "float32", True)
    assert config["methods"] == [{"name": "random", "label": "random", "options": {}, "recovery": None}]
    assert config["recovery"] is None  # no LoRA recovery unless asked for


@pytest.mark.parametrize("name,cells", [("smoke", 9), ("demo", 13), ("demo-full", 21), ("paper", 61)])
def test_shipped_configs_load(name, cells):
    """Against the REAL method registry: the shipped configs' method options must exist."""
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config["name"] == name
    assert len(expand_cells(config)) == cells
    if name == "smoke":
        assert config["evaluation"]["max_tokens"] == 2048 and config["evaluation"]["tasks"] == ["piqa"]
    if name == "paper":
        assert (config["device"], config["dtype"]) == ("cuda", "float16")
        assert config["evaluation"]["tasks"] == PAPER_TASKS and config["evaluation"]["limit"] is None


def test_expand_cells_order_and_independence(tmp_path, registry):
    config = load_config(write(tmp_path, """
name: t
models: [a, b]
methods: [random, {name: minillm, label: minillm-fo, options: {eps: 0.01}}]
ratios: [0.2, 0.5]
seeds: [0, 1]
"""))
    cells = expand_cells(config)
    assert len(cells) == 2 * (1 + 2 * 2 * 2)
    assert [(c["model"], c["label"], c["ratio"], c["seed"]) for c in cells[:6]] == [
        ("a", "dense", 0.0, 0), ("a", "random", 0.2, 0), ("a", "random", 0.2, 1),
        ("a", "random", 0.5, 0), ("a", "random", 0.5, 1), ("a", "minillm-fo", 0.2, 0)]
    assert cells[9]["model"] == "b" and cells[9]["method"] == "dense"
    assert set(cells[0]) == {"model", "method", "label", "options", "ratio", "seed", "calibration",
                             "evaluation", "device", "dtype", "grid"}
    assert cells[5]["options"] == {"eps": 0.01}
    assert len({cell_key(c) for c in cells}) == len(cells)
    cells[5]["options"]["eps"] = 9.0
    cells[0]["evaluation"]["tasks"].append("x")
    assert cells[6]["options"] == {"eps": 0.01} and "x" not in cells[1]["evaluation"]["tasks"]


def test_exponent_numbers_are_numbers(tmp_path, registry):
    """PyYAML reads `1e-3` (no dot) as a string; a number field takes it as the number it means."""
    config = load_config(write(tmp_path, MINIMAL.replace("[random]", "[{name: minillm, options: {eps: 1e-3}}]")
                               .replace("[0.2]", "[2e-1]")))
    assert config["methods"][0]["options"] == {"eps": 0.001} and config["ratios"] == [0.2]


def test_no_dense_row_when_disabled(tmp_path, registry):
    cells = expand_cells(load_config(write(tmp_path, MINIMAL + "dense: false\n")))
    assert [c["method"] for c in cells] == ["random"]


@pytest.mark.parametrize("text,message", [
    (MINIMAL + "nme: x\n", "config.yaml: nme: unknown key (did you mean 'name'?)"),
    (MINIMAL + "evaluation: {tsks: [piqa]}\n", "config.yaml: evaluation.tsks: unknown key (did you mean 'tasks'?)"),
    (MINIMAL + "calibration: {nsamples: abc}\n", "config.yaml: calibration.nsamples: expected integer, got 'abc'"),
    (MINIMAL + "calibration: {nsamples: 0}\n", "calibration.nsamples: expected a positive integer, got 0"),
    (MINIMAL + "seeds: [true]\n", "config.yaml: seeds[0]: expected integer, got True"),
    (MINIMAL + "evaluation: {throughput: 1}\n", "evaluation.throughput: expected boolean, got 1"),
    (MINIMAL + "evaluation: {limit: 1.5}\n", "evaluation.limit: expected integer, got 1.5"),
    (MINIMAL + "dtype: float64\n", "dtype: expected one of float32, bfloat16, float16, got 'float64'"),
    (MINIMAL + "evaluation: 3\n", "config.yaml: evaluation: expected mapping, got 3"),
    (MINIMAL.replace("[0.2]", "[0.2, 1.5]"), "config.yaml: ratios[1]: expected a pruning ratio in (0, 1), got 1.5"),
    (MINIMAL.replace("[0.2]", "[0]"), "ratios[0]: expected a pruning ratio in (0, 1), got 0.0"),
    (MINIMAL.replace("[0.2]", "[x]"), "ratios[0]: expected number, got 'x'"),
    (MINIMAL.replace("[0.2]", "[0.2, 0.2]"), "ratios[1]: duplicate entry 0.2"),
    (MINIMAL.replace("ratios: [0.2]\n", ""), "config.yaml: ratios: missing required key"),
    (MINIMAL.replace("[tiny-llama]", "[]"), "models: expected a non-empty list"),
    (MINIMAL.replace("name: t", "name: a/b"), "name: expected a name made of letters"),
    (MINIMAL.replace("[random]", "[random, {name: magnitude, lable: m}]"),
     "config.yaml: methods[1].lable: unknown key (did you mean 'label'?)"),
    (MINIMAL.replace("[random]", "[random, random]"),
     "methods[1]: duplicate label (give each entry its own `label`) 'random'"),
    (MINIMAL.replace("[random]", "[random, {name: random, label: r2}]"),
     "methods[1]: same method and options as methods[0]"),
    (MINIMAL.replace("[random]", "[{name: random, label: dense}]"), "methods[0]: the label 'dense' is reserved"),
    # a method's options: its `Options`, worded as `suite prune --opt` words them
    (MINIMAL.replace("[random]", "[random, magnitude, {name: minillm, options: {eps: abc}}]"),
     "config.yaml: methods[2].options: minillm option eps: expected float, got 'abc'"),
    (MINIMAL.replace("[random]", "[{name: minillm, options: {steps: 2.5}}]"),
     "methods[0].options: minillm option steps: expected int, got 2.5"),
    (MINIMAL.replace("[random]", "[{name: minillm, options: {epz: 1}}]"),
     "methods[0].options.epz: unknown option of minillm (did you mean 'eps'? known: eps, steps, mode, flag, head_mode"),
    (MINIMAL.replace("[random]", "[random, sparsegpt]"),
     "config.yaml: methods[1].name: unknown method 'sparsegpt' (known: flap"),
    (MINIMAL.replace("[random]", "[dense]"), "methods[0].name: 'dense' is not a pruning method"),
    ("- a\n- b\n", "config.yaml: expected a mapping at the top level, got list"),
    (MINIMAL + "models: [\n", "config.yaml:6: invalid YAML"),
])
def test_errors_name_the_file_and_the_key(tmp_path, registry, text, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "config.yaml"))
    assert "\n" not in str(err.value)


def test_options_checked_against_the_real_registry_names(tmp_path):
    """With the project's own suite.methods (it exists): an unknown method is refused."""
    pytest.importorskip("suite.methods")
    with pytest.raises(UserError, match=r"methods\[0\]\.name: unknown method 'no-such-method'"):
        load_config(write(tmp_path, MINIMAL.replace("[random]", "[no-such-method]")))


def test_method_names_unchecked_without_registry(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "suite.methods", None)  # as if suite/methods.py did not exist
    assert config_module._method_registry() is None
    config = load_config(write(tmp_path, MINIMAL.replace("[random]", "[anything, {name: x, options: {k: 1}}]")))
    assert [m["name"] for m in config["methods"]] == ["anything", "x"]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,message", [  # the pydantic schema's words and key paths
    (MINIMAL + "recovery: {ratios: [0.2, 1.5]}\n", "recovery.ratios[1]: expected a pruning ratio in (0, 1), got 1.5"),
    (MINIMAL + "recovery: {learning_rate: x}\n", "recovery.learning_rate: expected number, got 'x'"),
    (MINIMAL + "recovery: 3\n", "recovery: expected mapping, got 3"),
    (MINIMAL.replace("[random]", "[{name: random, calibration: {nsample: 4}}]"),
     "methods[0].calibration.nsample: unknown key (did you mean 'nsamples'?)"),
    (MINIMAL.replace("[random]", "[{name: random, calibration: {seqlen: 0}}]"),
     "methods[0].calibration.seqlen: expected a positive integer, got 0"),
    (MINIMAL.replace("[random]", "[random, 3]"), "methods[1]: expected mapping, got 3"),
    (MINIMAL.replace("[random]", "[{label: x}]"), "methods[0].name: missing required key"),
    (MINIMAL.replace("[random]", "random"), "methods: expected list, got 'random'"),
    (MINIMAL.replace("[random]", "[{name: random, options: [1]}]"), "methods[0].options: expected mapping, got [1]"),
    (MINIMAL + "7: x\n", "7: unknown key (known keys: name, models, methods, ratios, seeds, calibration, "
     "evaluation, device, dtype, offload, device_memory, hidden_on, ratio_of, dense, recovery)"),
    (MINIMAL + "calibration: {apply_to: some}\n", "calibration.apply_to: expected one of all, got 'some'"),
    (MINIMAL + "evaluation: {batch_size: 0}\n", "evaluation.batch_size: expected a positive integer, got 0"),
    (MINIMAL + "dtype: null\n", "dtype: expected one of float32, bfloat16, float16, got None"),
    (MINIMAL + "seeds: [1.0]\n", "seeds[0]: expected integer, got 1.0"),
])
def test_schema_errors_keep_their_words(tmp_path, registry, text, message):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value) == f"{tmp_path / 'config.yaml'}: {message}"


def test_filled_config_keeps_its_key_order(tmp_path, monkeypatch):
    """The filled dict is hashed (grid_identity): keys in the order the schema always had, and the
    keys added later (apply_to, a method entry's calibration) absent unless given."""
    monkeypatch.setitem(sys.modules, "suite.methods", None)  # no registry: no method's own calibration to check
    config = load_config(write(tmp_path, MINIMAL.replace("[random]", "[random, {name: magnitude, calibration: {seqlen: 8}}]")
                               + "evaluation: null\nrecovery: {lora_r: 4, ratios: [0.2], epochs: 1}\n"))
    assert list(config) == ["name", "models", "methods", "ratios", "seeds", "calibration", "evaluation", "device",
                            "dtype", "offload", "device_memory", "hidden_on", "dense", "recovery"]
    assert list(config["calibration"]) == ["corpus", "nsamples", "seqlen"]
    assert list(config["evaluation"]) == ["perplexity", "seqlen", "max_tokens", "tasks", "limit", "batch_size", "throughput"]
    assert [list(m) for m in config["methods"]] == [["name", "label", "options", "recovery"],
                                                    ["name", "label", "options", "recovery", "calibration"]]
    assert config["methods"][1]["calibration"] == {"corpus": None, "nsamples": None, "seqlen": 8}
    assert list(config["recovery"].items()) == [("lora_r", 4), ("epochs", 1), ("ratios", [0.2])]
    apply_to = load_config(write(tmp_path, MINIMAL + "calibration: {nsamples: 4, apply_to: all}\n"))["calibration"]
    assert list(apply_to.items()) == [("corpus", "c4"), ("nsamples", 4), ("seqlen", None), ("apply_to", "all")]


def test_method_options_are_the_methods_own_declaration(tmp_path):
    """With the real registry: a grid entry's options go through the method's `Options` (strings
    converted, combinations refused with the entry's scope), only the given keys kept."""
    pytest.importorskip("suite.methods")
    config = load_config(write(tmp_path, MINIMAL.replace(
        "[random]", "[{name: wanda-sp, options: {sequential: 'false', scope: global, batch_size: '4'}}]")))
    assert config["methods"][0]["options"] == {"sequential": False, "scope": "global", "batch_size": 4}
    assert config["methods"][0]["label"] == "wanda-sp (one-shot)"
    with pytest.raises(UserError, match=r"methods\[0\]\.options: wanda-sp with sequential=true prunes every layer "
                                        r"to its own budget: scope 'global' needs --opt sequential=false"):
        load_config(write(tmp_path, MINIMAL.replace("[random]", "[{name: wanda-sp, options: {scope: global}}]")))


def test_a_method_variant_gets_its_own_default_label():
    """flap variance=reference and wanda-sp sequential=false are named apart in tables."""
    from suite.config import default_label

    assert default_label("flap", {"variance": "reference"}) == "flap (reference variance)"
    assert default_label("flap", {"variance": "exact"}) == default_label("flap", {}) == "flap"
    assert default_label("wanda-sp", {"sequential": False}) == "wanda-sp (one-shot)"
    assert default_label("wanda-sp", {}) == "wanda-sp" and default_label("magnitude", {"norm": "l1"}) == "magnitude"


# ------------------------------------------------------------ a method entry's selection and method options
@pytest.mark.parametrize("option, says", [
    ("scope: globl", "methods[0].options.scope: expected one of layer, global, got 'globl'"),
    ("layers: foo", "methods[0].options.layers: layers must be 'all', 'start:end' or a list, got 'foo'"),
    ("layers: 3", "methods[0].options.layers: expected 'all', 'start:end' or a list, got 3"),
    ("round_to: -1", "methods[0].options.round_to: expected a positive integer, got -1"),
    ("head_mode: x", "methods[0].options.head_mode: expected one of q-head, kv-group, got 'x'"),
    ("allow_empty: maybe", "methods[0].options.allow_empty: expected boolean, got 'maybe'"),
])
def test_a_grid_s_selection_options_are_checked_when_it_loads(tmp_path, option, says):
    """Refused with one line when the grid loads, not when its cell runs (or --dry-run predicts it)."""
    with pytest.raises(UserError) as err:
        load_grid(tmp_path, "magnitude", option)
    assert str(err.value) == f"{tmp_path / 'g.yaml'}: {says}"


def test_a_grid_s_good_selection_options_are_kept_as_given(tmp_path):
    options = "scope: global, layers: [0.125, 0.875], round_to: 8, head_mode: kv-group, allow_empty: true"
    config = load_grid(tmp_path, "magnitude", options)
    assert config["methods"][0]["options"] == {"scope": "global", "layers": [0.125, 0.875], "round_to": 8,
                                               "head_mode": "kv-group", "allow_empty": True}


@pytest.mark.parametrize("layers", ["'5:2'", "'0.9:0.1'", "[]", "'-1:4'"])
def test_a_grid_s_layer_range_empty_or_negative_on_any_model_is_refused(tmp_path, layers):
    with pytest.raises(UserError, match=r"methods\[0\]\.options\.layers: the layer range .* (empty|negative) on any model"):
        load_grid(tmp_path, "magnitude", f"layers: {layers}")


def test_a_grid_s_infinite_float_option_is_refused(tmp_path):
    with pytest.raises(UserError, match="minillm option eps: expected a finite number, got inf"):
        load_grid(tmp_path, "minillm", "eps: .inf")


def test_grid_method_options_are_checked_when_the_config_loads(tmp_path):
    from suite.pruning.errors import UserError
    from suite.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodels: [tiny-llama]\nratios: [0.2]\n"
                    "methods: [{name: magnitude, options: {norm: l3}}]\n")
    with pytest.raises(UserError, match=r"bad.yaml: methods\[0\]\.options: magnitude option norm='l3': choose one of l2, l1"):
        load_config(path)


def test_a_method_entry_runs_only_on_its_models_and_names_only_grid_models(tmp_path, registry):
    text = ("name: t\nmodels: [tiny-llama, tiny-opt]\nmethods: [random, {name: magnitude, models: [tiny-opt]}]\n"
            "ratios: [0.2]\n")
    cells = expand_cells(load_config(write(tmp_path, text)))
    assert sorted((c["model"], c["method"]) for c in cells if c["method"] != "dense") == [
        ("tiny-llama", "random"), ("tiny-opt", "magnitude"), ("tiny-opt", "random")]
    plain = load_config(write(tmp_path, MINIMAL))
    assert "models" not in plain["methods"][0]  # left out when not given: the grid's hash is unchanged
    with pytest.raises(UserError, match=r"methods\[1\]\.models: 'tiny-bloom' is not one of the grid's models"):
        load_config(write(tmp_path, text.replace("models: [tiny-opt]", "models: [tiny-bloom]")))


def test_ratio_of_layers_reaches_every_pruned_cell_and_its_key(tmp_path):
    """`ratio_of: layers` is in every cell (and so in its key); the default leaves cells, keys and the
    grid's hash as they were without the key."""
    from suite.config import expand_cells, grid_identity, validate
    from suite.records import cell_key

    base = {"name": "g", "models": ["tiny-llama"], "methods": ["magnitude"], "ratios": [0.2]}
    plain, default = validate(dict(base)), validate({**base, "ratio_of": "all"})
    layers = validate({**base, "ratio_of": "layers"})
    assert grid_identity(plain) == grid_identity(default) != grid_identity(layers)
    assert [cell_key(c) for c in expand_cells(plain)] == [cell_key(c) for c in expand_cells(default)]
    cells = expand_cells(layers)
    assert all(c["ratio_of"] == "layers" for c in cells)
    assert cell_key(cells[1]) != cell_key(expand_cells(plain)[1])


@pytest.mark.parametrize("method, option, says", [
    ("slicegpt", "scope: layer", "slicegpt transforms the whole model (no groups to select): --scope does not apply"),
    ("slicegpt", "layers: '1:3'", "slicegpt transforms the whole model (no groups to select): --layers does not apply"),
    ("slicegpt", "head_mode: kv-group", "slicegpt transforms the whole model (no groups to select): --head-mode kv-group"),
    ("shortgpt", "scope: layer", "shortgpt removes whole layers: --scope layer would do nothing"),
    ("shortgpt", "round_to: 64", "shortgpt removes whole layers: --round-to would do nothing"),
    ("sleb", "head_mode: kv-group", "sleb removes whole layers: --head-mode kv-group would do nothing"),
    ("wanda-sp", "depth_rule: nearest", "depth_rule applies to methods that remove whole layers; wanda-sp"),
])
def test_a_grid_refuses_the_selection_options_a_method_kind_never_reads_when_it_loads(tmp_path, method, option, says):
    """The grid's check is the CLI's (`suite.pruning.scoring.check_selection`): refused when the grid
    loads (and so by --dry-run), not inside each cell's process."""
    with pytest.raises(UserError) as err:
        load_grid(tmp_path, method, option)
    assert f"methods[0].options: {says}" in str(err.value) and "\n" not in str(err.value)
