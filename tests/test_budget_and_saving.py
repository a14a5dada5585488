"""Budget: achieved fraction of ALL parameters within 0.01 of the target, and the reported count is
the pruned model's real parameter count. Saving: safetensors round trip with identical logits."""
import copy

import pytest
import torch

from suite.pruning.architectures import all_group_sets
from suite.pruning.errors import UserError
from suite.pruning.plan import apply_plan
from suite.pruning.saving import save_pruned
from suite.pruning.select import select
from suite.models import byte_tokenizer, load_model


def random_scores(model, head_mode="q-head", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(gs.layer, gs.kind): torch.rand(gs.count, generator=g) for gs in all_group_sets(model, head_mode)}


def numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,head_mode,scope,layers", [
    ("tiny-llama", "q-head", "layer", None),
    ("tiny-llama-gqa", "q-head", "layer", None),
    ("tiny-llama-gqa", "kv-group", "global", None),
    ("tiny-opt", "q-head", "global", [1, 2, 3]),
    ("tiny-bloom", "q-head", "layer", [0, 1, 2]),
])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_tiny(name, head_mode, scope, layers, ratio):
    model = load_model(name)
    dense = numel(model)
    sel = select(model, random_scores(model, head_mode), ratio, scope=scope, layers=layers, head_mode=head_mode)
    apply_plan(model, sel.plan)
    assert sel.total == dense
    assert dense - numel(model) == sel.removed
    assert abs(sel.removed / dense - ratio) <= 0.01
    if layers is not None:  # layers outside the prunable set are untouched
        full = load_model(name)
        from suite.pruning.architectures import adapter_for
        a = adapter_for(model)
        for i in set(range(4)) - set(layers):
            assert a.num_channels(a.layers(model)[i]) == a.num_channels(a.layers(full)[i])


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_budget_smollm2(smollm2, ratio, scope):
    model = copy.deepcopy(smollm2[0])
    dense = numel(model)
    layers = list(range(4, 28))  # LLM-Pruner's 4..30 of 32, as proportions of 30 layers
    sel = select(model, random_scores(model), ratio, scope=scope, layers=layers)
    apply_plan(model, sel.plan)
    assert dense - numel(model) == sel.removed
    assert abs(sel.removed / dense - ratio) <= 0.01
    # GQA q-head mode: every layer keeps the same number of q heads in each of its 3 kv groups
    for lp in sel.plan.layers:
        per_group = [sum(1 for h in lp.heads if h // 3 == j) for j in range(3)]
        assert len(set(per_group)) == 1 and per_group[0] >= 1


def test_layer_scope_keeps_highest_scores():
    model = load_model("tiny-llama")
    scores = random_scores(model)
    sel = select(model, scores, 0.3)
    for i, lp in enumerate(sel.plan.layers):
        s = scores[(i, "channels")]
        kept, removed = s[lp.channels], s[[c for c in range(len(s)) if c not in set(lp.channels)]]
        assert kept.min() >= removed.max()


def test_unreachable_and_bad_ratio():
    model = load_model("tiny-llama")
    with pytest.raises(UserError, match="unreachable"):
        select(model, random_scores(model), 0.9, layers=[0])
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"ratio must be in \(0, 1\)"):
            select(model, random_scores(model), bad)


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_save_load_roundtrip(tmp_path, name):
    model = load_model(name)
    sel = select(model, random_scores(model), 0.3, layers=[0, 2, 3])
    apply_plan(model, sel.plan)
    if name == "tiny-llama-gqa":  # a bias created by pruning (FLAP compensation) must survive
        o = model.model.layers[0].self_attn.o_proj
        o.bias = torch.nn.Parameter(torch.randn(o.out_features))
    out = save_pruned(model, byte_tokenizer(), sel.plan, tmp_path / "pruned")
    files = {p.name for p in out.iterdir()}
    assert "plan.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files)
    again = load_model(str(out))
    ids = torch.randint(3, 259, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert numel(again) == numel(model)


def test_save_load_smollm2_tied_embeddings(tmp_path, smollm2):
    model = copy.deepcopy(smollm2[0])
    sel = select(model, random_scores(model), 0.2, layers=list(range(4, 28)))
    apply_plan(model, sel.plan)
    out = save_pruned(model, smollm2[1], sel.plan, tmp_path / "smol")
    again = load_model(str(out))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_ratio_of_layers_removes_that_fraction_of_the_decoder_layers(name):
    """`ratio_of="layers"`: the ratio is of the decoder layers' parameters (counted here from the
    model's own modules, not the suite's adapter), and the record holds both achieved fractions."""
    from suite.pipeline import outcome_record, prune

    model = load_model(name)
    dense = numel(model)
    outer = numel(model.get_input_embeddings()) + (0 if model.config.tie_word_embeddings
                                                   else numel(model.get_output_embeddings()))
    blocks = model.model.decoder.layers if name == "tiny-opt" else model.model.layers
    layers = sum(numel(block) for block in blocks)
    assert layers < dense - outer + 1 and layers > 0
    outcome = prune(model, byte_tokenizer(), "magnitude", 0.3, ratio_of="layers")
    removed = dense - numel(model)
    assert abs(removed / layers - 0.3) <= 0.01
    assert removed / dense < 0.3 - 0.01  # the "all" convention would have removed more
    record = outcome_record(outcome, 0.3)
    assert record["ratio_of"] == "layers" and record["ratio_target"] == 0.3
    assert record["ratio_achieved_layers"] == pytest.approx(removed / layers, abs=1e-6)
    assert record["ratio_achieved"] == pytest.approx(removed / dense, abs=1e-6)


def test_unknown_ratio_convention_is_one_error_line():
    from suite.pipeline import prune

    with pytest.raises(UserError, match="ratio_of must be one of all, layers"):
        prune(load_model("tiny-llama"), byte_tokenizer(), "magnitude", 0.3, ratio_of="embeddings")
