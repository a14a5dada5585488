"""Selection (suite/pruning/select.py): the budget counts ALL parameters and the achieved fraction is within
0.01 of the target, the reported count being the pruned model's real one; the layer scope keeps each
layer's highest scores; the global scope with empty layers allowed reaches the plan nearest the target
(an exhaustive search of a tiny budget); a model whose layers were already pruned unevenly."""
import copy

import pytest
import torch

from suite.models import byte_tokenizer, load_model
from suite.pruning.errors import UserError
from suite.pruning.plan import apply_plan, carried_plan, full_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.pruning.select import select
from tests.reference import logits, masked_logits, rel_err
from tests.tiny import numel, random_scores


@pytest.mark.parametrize("name,head_mode,scope,layers", [
    ("tiny-llama", "q-head", "layer", None),
    ("tiny-llama-gqa", "q-head", "layer", None),
    ("tiny-llama-gqa", "kv-group", "global", None),
    ("tiny-opt", "q-head", "global", [1, 2, 3]),
    ("tiny-bloom", "q-head", "layer", [0, 1, 2]),
])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget_counts_all_parameters_and_is_met_within_0_01(name, head_mode, scope, layers, ratio):
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
def test_budget_on_smollm2_is_met_within_0_01_with_equal_heads_per_kv_group(smollm2, ratio, scope):
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


def test_an_unreachable_budget_and_a_ratio_outside_0_1_are_refused():
    model = load_model("tiny-llama")
    with pytest.raises(UserError, match="unreachable"):
        select(model, random_scores(model), 0.9, layers=[0])
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"ratio must be in \(0, 1\)"):
            select(model, random_scores(model), bad)


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


# ------------------------------------------------------------------- global scope with empty layers allowed
def one_layer_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=512, hidden_size=16, n_layer=1, n_head=2, hidden_dropout=0.0,
                         attention_dropout=0.0)
    return BloomForCausalLM(config).eval()


def nearest_by_exhaustive_search(model, target):
    """Smallest |removed - target| over every count of removed heads and channels (all layers alike:
    the counts, not their places, fix the parameter count). Sizes from raw BLOOM dimensions."""
    c = model.config
    hidden, hd, n_layer = c.hidden_size, c.hidden_size // c.n_head, c.n_layer
    per_head = 3 * hd * (hidden + 1) + hd * hidden  # fused qkv rows + bias, dense columns
    per_channel = (hidden + 1) + hidden  # h_to_4h row + bias, 4h_to_h column
    return min(abs(h * per_head + ch * per_channel - target)
               for h in range(n_layer * c.n_head + 1) for ch in range(n_layer * 4 * hidden + 1))


def ranked_scores(model, seed, heads_last=True, head_mode="q-head"):
    """Random scores in [0, 1); heads in [1, 2) if `heads_last` (the channels then run out first)."""
    from suite.pruning.architectures import all_group_sets

    gen = torch.Generator().manual_seed(seed)
    return {(gs.layer, gs.kind): torch.rand(gs.count, generator=gen) + (gs.kind == "heads" and heads_last)
            for gs in all_group_sets(model, head_mode)}


@pytest.mark.parametrize("ratio", [0.19, 0.2, 0.21, 0.22, 0.25])
@pytest.mark.parametrize("seed,heads_last", [(0, True), (1, True), (2, False), (3, False)])
def test_global_allow_empty_reaches_the_nearest_plan(ratio, seed, heads_last):
    """1-layer BLOOM, 2 heads (536 parameters each), 64 channels (33 each): at 0.2 the target 2,307
    is out of the channels' reach when the heads rank last (all 64 channels remove only 2,112); the
    nearest plan removes a head and 54 channels (2,318). The ranking decides which groups go, so
    the plan is within one channel of the best count mix found by exhaustive search."""
    from suite.pruning.select import select

    model = one_layer_bloom()
    total = sum(p.numel() for p in model.parameters())
    sel = select(model, ranked_scores(model, seed, heads_last), ratio, scope="global", allow_empty=True)
    best = nearest_by_exhaustive_search(model, round(ratio * total))
    assert abs(sel.removed - sel.target_removed) <= best + 33
    apply_plan(model, sel.plan)
    assert total - sum(p.numel() for p in model.parameters()) == sel.removed


def test_global_allow_empty_on_tiny_bloom_at_0_7_is_within_a_head_of_the_target():
    from suite.pruning.select import select

    model = load_model("tiny-bloom")
    sel = select(model, ranked_scores(model, 0), 0.7, scope="global", allow_empty=True)
    per_head = 4 * 16 * 192 + 3 * 16  # hd 16, hidden 192
    assert abs(sel.removed - sel.target_removed) <= per_head
    assert abs(sel.removed - sel.target_removed) <= nearest_by_exhaustive_search(model, sel.target_removed) + 385


def test_global_allow_empty_trades_a_head_for_channels_when_heads_rank_last():
    """Heads scored above every channel: the channels run out at 2,112 < 2,307; the trade gives 2,318."""
    from suite.pruning.select import select

    model = one_layer_bloom()
    scores = {(0, "heads"): torch.tensor([2.0, 3.0]), (0, "channels"): torch.rand(64)}
    sel = select(model, scores, 0.2, scope="global", allow_empty=True)
    assert (sel.target_removed, nearest_by_exhaustive_search(model, 2307)) == (2307, 11)
    assert sel.removed == 2307 + 11
    assert sel.plan.layers[0].heads == [1] and len(sel.plan.layers[0].channels) == 64 - 54


# --------------------------------------------------------------------------- a model already pruned unevenly
@pytest.mark.parametrize("head_mode", ["q-head", "kv-group"])
def test_selection_on_a_gqa_model_whose_layer_became_mha(tmp_path, head_mode):
    """Layer 1 keeps one q head per kv head (2 q / 2 kv) while layer 0 stays GQA (8 q / 2 kv): a
    selected plan removing a head of layer 1 must remove its kv head too, and reload exactly."""
    from suite.pruning.select import select

    model = load_model("tiny-llama-gqa")
    first = full_plan(model)
    first.layers[1].heads = [1, 6]
    apply_plan(model, first)
    sel = select(model, ranked_scores(model, 0, False, head_mode), 0.3, head_mode=head_mode)
    layer1 = sel.plan.layers[1]
    assert len(layer1.heads) == 1
    apply_plan(model, sel.plan)
    saved = carried_plan(model).layers[1]
    assert saved.heads == [[1, 6][layer1.heads[0]]] and saved.kv_heads == [saved.heads[0] // 4]
    out = save_pruned(model, None, carried_plan(model), tmp_path / "gqa")
    ids = torch.randint(3, 259, (1, 16))
    assert rel_err(logits(load_pruned(out), ids), logits(model, ids)) <= 1e-5
    assert rel_err(masked_logits(load_model("tiny-llama-gqa"), carried_plan(model), ids), logits(model, ids)) <= 1e-5


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
