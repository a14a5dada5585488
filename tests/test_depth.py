"""Depth pruning in the shared engine: plans that remove whole decoder layers (plan.py
`removed_layers`, `drop_layers`), the layer budget (select.py `depth_budget`, `select_layers`) and
their checkpoints (saving.py: an ordinary transformers directory when no kept layer is narrowed)."""
import json

import pytest
import torch

from suite.models import TINY_MODELS, byte_tokenizer, load_model
from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError
from suite.pruning.plan import Plan, apply_plan, carried_plan, compose, full_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.pruning.select import depth_budget, select_layers
from tests.checkpoints import heterogeneous_plan, plain_transformers_logits
from tests.tiny import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24  # longer than the tiny models' 16-token sliding windows: sliding and full layers differ


def depth_pruned(name, removed):
    model = load_model(name).eval()
    plan = full_plan(model)
    plan.removed_layers = list(removed)
    return apply_plan(model, plan), plan


def turned_off(name, removed):
    """The dense model with layers `removed` skipped (SLEB's `turn_off`: forward = identity), every
    other layer as it was: its own index, attention type, mask and rotary table."""
    model = load_model(name).eval()
    for i in removed:
        adapter_for(model).layers(model)[i].forward = lambda hidden_states, *a, **k: (
            (hidden_states,) if isinstance(model.config.model_type, str) and model.config.model_type == "bloom"
            else hidden_states)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_plan_json_round_trip_and_old_files_remove_nothing(tmp_path):
    model = load_model("tiny-llama-gqa")
    plan = full_plan(model)
    old = plan.to_json()
    assert "removed_layers" not in old  # plans without depth pruning are written as before
    assert Plan.from_json(old).removed_layers == []
    plan.removed_layers = [1, 3]
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.removed_layers == [1, 3] and again.kept_layers == [0, 2]
    assert json.loads((tmp_path / "plan.json").read_text())["removed_layers"] == [1, 3]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_removed_layers_equal_the_dense_model_with_them_skipped(name):
    ids = token_ids(2, SEQ)
    model, _ = depth_pruned(name, [0, 2])
    expected = logits(turned_off(name, [0, 2]), ids)
    assert len(adapter_for(model).layers(model)) == model.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    indices = [m.layer_idx for layer in adapter_for(model).layers(model) for m in layer.modules()
               if isinstance(getattr(m, "layer_idx", None), int)]
    assert indices and sorted(set(indices)) == [0, 1]  # renumbered: what the KV cache is indexed by


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cached_generation_equals_uncached_after_depth_pruning(name):
    model, _ = depth_pruned(name, [1])
    ids = token_ids(1, 6, seed=4)
    kwargs = dict(max_new_tokens=SEQ, min_new_tokens=SEQ, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (1, 6 + SEQ)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-qwen2"])
def test_kept_layers_keep_their_own_attention_types(name):
    dense = load_model(name)
    types = list(dense.config.layer_types)
    model, _ = depth_pruned(name, [0])
    kept = [types[i] for i in (1, 2, 3)]
    assert model.config.layer_types == kept
    if name != "tiny-qwen2":  # alternating patterns: re-deriving from new indices would shift every type
        assert kept != types[:3]
    torch.testing.assert_close(logits(model, token_ids(2, SEQ)), logits(turned_off(name, [0]), token_ids(2, SEQ)),
                               rtol=1e-5, atol=1e-5)


def test_depth_pruned_directories_load_with_plain_transformers_without_remote_code(tmp_path):
    ids = token_ids(2, SEQ, seed=6)
    models, dirs, removed = [], [], {}
    for k, name in enumerate(TINY_MODELS):
        removed[name] = [0] if k % 2 else [1, 2]
        model, plan = depth_pruned(name, removed[name])
        models.append(model)
        dirs.append(save_pruned(model, byte_tokenizer(), carried_plan(model), tmp_path / name))
    plain = plain_transformers_logits(dirs, ids, tmp_path, remote_code=False)
    for name, model, got, d in zip(TINY_MODELS, models, plain, dirs):
        expected = logits(model, ids)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=name)
        config = json.loads((d / "config.json").read_text())
        dense = load_model(name).config
        kept = [i for i in range(dense.num_hidden_layers) if i not in removed[name]]
        assert config.get("num_hidden_layers", config.get("n_layer")) == len(kept)
        assert "pruned_layers" not in config and "auto_map" not in config and not (d / "modeling_pruned.py").exists()
        if getattr(dense, "layer_types", None) is not None:
            assert config["layer_types"] == [dense.layer_types[i] for i in kept], name
        again = load_model(str(d))  # the suite's loader: same logits, the plan carried in original numbering
        assert torch.equal(logits(again, ids), expected), name
        assert carried_plan(again).removed_layers == removed[name]


@pytest.mark.parametrize("order", ["depth-then-width", "width-then-depth"])
def test_depth_and_width_compose_like_one_plan_and_save_as_pruned_checkpoint(order, tmp_path):
    name = "tiny-llama-gqa"
    ids = token_ids(2, SEQ, seed=7)
    model = load_model(name).eval()
    width = heterogeneous_plan(model, empty_attention_layer=None)
    if order == "depth-then-width":
        first = full_plan(model)
        first.removed_layers = [1]
        apply_plan(model, first)
        second = Plan(arch=width.arch, layers=[width.layers[i] for i in (0, 2, 3)])  # in the 3-layer numbering
    else:
        first = width
        apply_plan(model, first)
        second = full_plan(model)
        second.removed_layers = [1]
    apply_plan(model, second)
    carried = carried_plan(model)
    assert carried.removed_layers == [1]
    assert carried.to_json() == compose(first, second).to_json() if order == "width-then-depth" else True
    one = apply_plan(load_model(name).eval(), Plan.from_json(carried.to_json()))  # the composed plan at once
    expected = logits(model, ids)
    torch.testing.assert_close(logits(one, ids), expected, rtol=1e-6, atol=1e-6)
    d = save_pruned(model, byte_tokenizer(), carried, tmp_path / order)
    config = json.loads((d / "config.json").read_text())
    assert config["num_hidden_layers"] == len(config["pruned_layers"]) == 3 and "auto_map" in config
    (plain,) = plain_transformers_logits([d], ids, tmp_path)
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(load_pruned(d), ids), expected, rtol=0, atol=0)


def test_depth_budget_counts_layers_by_rule_and_refuses_too_small_or_too_large():
    model = load_model("tiny-llama")
    per = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert depth_budget(model, 2.5 * per / total, rule="nearest").count == 3  # halves round up
    assert depth_budget(model, 2.49 * per / total, rule="nearest").count == 2
    assert depth_budget(model, 2.99 * per / total, rule="not_above").count == 2
    with pytest.raises(UserError, match="less than half a decoder layer"):
        depth_budget(model, 0.4 * per / total)
    with pytest.raises(UserError, match="at least one layer must stay"):
        depth_budget(model, 0.99)
    with pytest.raises(UserError, match="unknown depth rule"):
        depth_budget(model, 0.3, rule="floor")
    budget = depth_budget(model, 1.2 * per / total, layers=[1, 2])
    sel = select_layers(model, {(1, "layers"): torch.tensor([0.5]), (2, "layers"): torch.tensor([0.2])}, budget)
    assert sel.plan.removed_layers == [2] and sel.removed == per


def test_a_plan_removing_every_layer_is_refused():
    model = load_model("tiny-opt")
    plan = full_plan(model)
    plan.removed_layers = [0, 1, 2, 3]
    with pytest.raises(UserError, match="keep at least one"):
        apply_plan(model, plan)


@pytest.mark.parametrize("setting,words", [({"scope": "layer"}, "--scope layer"), ({"round_to": 8}, "--round-to"),
                                           ({"allow_empty": True}, "--allow-empty")])
def test_width_selection_settings_are_refused_for_whole_layer_methods(setting, words):
    from suite.pipeline import prune

    with pytest.raises(UserError, match=f"shortgpt removes whole layers: {words} would do nothing"):
        prune(load_model("tiny-llama"), byte_tokenizer(), "shortgpt", 0.3, calib={"nsamples": 2, "seqlen": 16},
              **setting)


def test_depth_rule_is_refused_for_width_methods():
    from suite.pipeline import prune

    with pytest.raises(UserError, match="depth_rule applies to methods that remove whole layers"):
        prune(load_model("tiny-llama"), byte_tokenizer(), "magnitude", 0.3, depth_rule="nearest")


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-bloom"])
def test_width_then_depth_directory_reloads_with_the_kept_layers_types_and_logits(name, tmp_path):
    ids = token_ids(2, SEQ, seed=8)
    model = load_model(name).eval()
    apply_plan(model, heterogeneous_plan(model, empty_attention_layer=None))
    depth = full_plan(model)
    depth.removed_layers = [0]
    apply_plan(model, depth)
    d = save_pruned(model, byte_tokenizer(), carried_plan(model), tmp_path / name)
    again = load_model(str(d))
    assert again.config.num_hidden_layers == 3
    assert getattr(again.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert carried_plan(again).to_json() == carried_plan(model).to_json()
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
