"""Exactness of slicing: a sliced model equals the unsliced one with the same groups zeroed.

The reference masks (tests/reference.py) are built from the architecture's raw attributes
(head_dim, column ranges), not from the suite's GroupSet/gates code, so a slicing bug cannot hide behind a shared
helper. For BLOOM this is what proves the ALiBi slopes follow the kept heads.
"""
import random

import pytest
import torch

from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError
from suite.pruning.plan import LayerPlan, Plan, apply_plan, carried_plan, compose, full_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.models import load_model
from tests.reference import logits, masked_logits, rel_err
from tests.tiny import random_plan

CASES = [("tiny-llama", False), ("tiny-llama-gqa", False), ("tiny-llama-gqa", True), ("tiny-opt", False),
         ("tiny-bloom", False)]


@pytest.mark.parametrize("name,kv_mode", CASES)
def test_sliced_equals_masked(name, kv_mode):
    model = load_model(name)
    plan = random_plan(model, random.Random(7), kv_mode=kv_mode)
    ids = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = masked_logits(model, plan, ids)
    apply_plan(model, plan)
    with torch.no_grad():
        sliced = model(ids).logits
    assert rel_err(sliced, reference) <= 1e-5
    # the plan really removed something, and layer 1 is untouched
    adapter = adapter_for(model)
    sizes = [(adapter.num_heads(l), adapter.num_channels(l)) for l in adapter.layers(model)]
    assert sizes[1] == (len(plan.layers[1].heads), len(plan.layers[1].channels))
    assert len(set(sizes)) > 2
    for (h, c), lp in zip(sizes, plan.layers):
        assert (h, c) == (len(lp.heads), len(lp.channels))


def test_bloom_alibi_follows_kept_heads():
    """Control: slicing BLOOM heads WITHOUT selecting their ALiBi slopes breaks exactness."""
    model = load_model("tiny-bloom")
    plan = random_plan(model, random.Random(3))
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(1))
    reference = masked_logits(model, plan, ids)
    apply_plan(model, plan)
    for layer in adapter_for(model).layers(model):  # take the first n slopes instead of the kept ones
        attn = layer.self_attention
        attn.kept_alibi_heads = list(range(attn.num_heads))
    with torch.no_grad():
        wrong = model(ids).logits
    assert rel_err(wrong, reference) > 1e-3


def test_smollm2_sliced_equals_masked(smollm2):
    model, _ = smollm2
    import copy

    model = copy.deepcopy(model)
    plan = random_plan(model, random.Random(11), untouched=5)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(2))
    reference = masked_logits(model, plan, ids)
    apply_plan(model, plan)
    with torch.no_grad():
        sliced = model(ids).logits
    assert rel_err(sliced, reference) <= 1e-5


def test_empty_layer_rejected_unless_allowed():
    model = load_model("tiny-llama")
    plan = full_plan(model)
    plan.layers[2].heads = []
    with pytest.raises(UserError, match="zero heads"):
        apply_plan(model, plan)
    plan.layers[2].channels = []
    plan.allow_empty = True
    ids = torch.randint(3, 259, (1, 16))
    reference = masked_logits(model, plan, ids)
    apply_plan(model, plan)
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference) <= 1e-5


def test_gqa_plan_must_keep_equal_q_heads_per_kv_group():
    model = load_model("tiny-llama-gqa")  # 8 q heads, 2 kv heads: q 0-3 -> kv 0, q 4-7 -> kv 1
    plan = full_plan(model)
    plan.layers[0].heads = [0, 1, 2, 4]
    with pytest.raises(UserError, match="equal numbers"):
        apply_plan(model, plan)
    plan.layers[0].heads, plan.layers[0].kv_heads = [0, 1, 4, 5], [1]
    with pytest.raises(UserError, match="kv head 0 removed"):
        apply_plan(model, plan)


def test_plan_json_roundtrip(tmp_path):
    model = load_model("tiny-llama-gqa")
    plan = random_plan(model, random.Random(5), kv_mode=True)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert set(again.to_json()["layers"][0]) == {"heads", "kv_heads", "channels"}
    assert "kv_heads" not in full_plan(load_model("tiny-opt")).to_json()["layers"][0]


# --------------------------------------------------------------------------- re-pruning a pruned model
def random_plan_now(model, rng, kv_mode=False):
    """A random plan in `model`'s CURRENT numbering (it may be sliced already: uneven layers)."""
    adapter = adapter_for(model)
    plan = full_plan(model)
    for lp, layer in zip(plan.layers, adapter.layers(model)):
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        if nch > 1 and rng.random() < 0.8:
            lp.channels = sorted(rng.sample(range(nch), rng.randint(1, nch - 1)))
        if nq < 2 or rng.random() < 0.2:
            continue
        if nkv == nq:
            lp.heads = sorted(rng.sample(range(nq), rng.randint(1, nq - 1)))
            if lp.kv_heads is not None:
                lp.kv_heads = list(lp.heads)
        elif kv_mode and nkv > 1:
            per = nq // nkv
            lp.kv_heads = sorted(rng.sample(range(nkv), rng.randint(1, nkv - 1)))
            lp.heads = [j * per + k for j in lp.kv_heads for k in range(per)]
        elif nq // nkv > 1:
            per = nq // nkv
            k = rng.randint(1, per - 1)
            lp.heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), k))
    plan.head_mode = "kv-group" if kv_mode else "q-head"
    return plan


CHAIN_CASES = [("tiny-llama", False), ("tiny-llama-gqa", False), ("tiny-llama-gqa", True),
               ("tiny-opt", False), ("tiny-bloom", False), ("tiny-mistral", True), ("tiny-qwen2", False),
               ("tiny-qwen3", False), ("tiny-gemma2", True), ("tiny-gemma3", False), ("tiny-phi3", True),
               ("tiny-phi3", False)]


@pytest.mark.parametrize("name,kv_mode", CHAIN_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_prune_save_load_chains_reload_to_in_memory_logits(tmp_path, name, kv_mode, seed):
    """Property: 2-3 prunes with save/reload between them; each reload equals the in-memory model,
    and the saved (composed) plan applied to the ORIGINAL model, masked, gives the same logits."""
    rng = random.Random(seed * 10 + len(name))
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(seed))
    original = load_model(name)
    model = load_model(name)
    for step in range(rng.randint(2, 3)):
        apply_plan(model, random_plan_now(model, rng, kv_mode))
        out = save_pruned(model, None, carried_plan(model), tmp_path / f"step{step}")
        again = load_pruned(out)
        in_memory = logits(model, ids)
        assert rel_err(logits(again, ids), in_memory) <= 1e-5
        assert rel_err(masked_logits(original, Plan.load(out / "plan.json"), ids), in_memory) <= 1e-5
        model = again  # the next prune starts from the reloaded directory


def test_bloom_second_prune_keeps_the_right_original_head(tmp_path):
    """3 heads, keep [1, 2], then keep pruned-index [1] = original head 2."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=64, hidden_size=12, n_layer=1, n_head=3, hidden_dropout=0.0,
                         attention_dropout=0.0)
    model = BloomForCausalLM(config).eval()
    reference = BloomForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    channels = list(range(48))
    apply_plan(model, Plan("bloom", [LayerPlan(heads=[1, 2], channels=channels)]))
    apply_plan(model, Plan("bloom", [LayerPlan(heads=[1], channels=channels)]))
    assert carried_plan(model).layers[0].heads == [2]
    out = save_pruned(model, None, carried_plan(model), tmp_path / "twice")
    expected = masked_logits(reference, Plan("bloom", [LayerPlan(heads=[2], channels=channels)]), ids)
    assert rel_err(logits(model, ids), expected) <= 1e-5
    assert rel_err(logits(load_pruned(out), ids), expected) <= 1e-5


def test_gqa_channel_only_second_prune_reloads(tmp_path):
    """LLaMA-GQA: q-head prune, then a prune of channels only: the saved plan reloads."""
    model = load_model("tiny-llama-gqa")  # 8 q heads / 2 kv heads per layer
    first = full_plan(model)
    first.layers[0].heads = [0, 2, 3, 5, 6, 7]
    apply_plan(model, first)
    second = full_plan(model)
    second.layers[0].channels = list(range(0, 688, 2))
    apply_plan(model, second)
    out = save_pruned(model, None, carried_plan(model), tmp_path / "gqa")
    saved = Plan.load(out / "plan.json").layers[0]
    assert saved.heads == [0, 2, 3, 5, 6, 7] and saved.kv_heads == [0, 1]
    assert saved.channels == list(range(0, 688, 2))
    ids = torch.randint(3, 259, (1, 16))
    assert rel_err(logits(load_pruned(out), ids), logits(model, ids)) <= 1e-5


def test_compose_is_indexing_into_the_first_plan():
    base = Plan("llama", [LayerPlan(heads=[0, 1, 4, 5, 6, 7], kv_heads=[0, 1], channels=[1, 3, 5, 7])])
    new = Plan("llama", [LayerPlan(heads=[3, 4, 5], kv_heads=[1], channels=[0, 3])], head_mode="kv-group")
    layer = compose(base, new).layers[0]
    assert (layer.heads, layer.kv_heads, layer.channels) == ([5, 6, 7], [1], [1, 7])
    with pytest.raises(UserError, match="layer 0 heads"):
        compose(base, Plan("llama", [LayerPlan(heads=[6], channels=[0])]))


# -------------------------------------------------------------------- cached decoding after a dropped block
def drop(model, layer, what):
    plan = full_plan(model)
    plan.allow_empty = True
    if what == "attention":
        plan.layers[layer].heads = []
        if plan.layers[layer].kv_heads is not None:
            plan.layers[layer].kv_heads = []
    else:
        plan.layers[layer].channels = []
    return apply_plan(model, plan)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
@pytest.mark.parametrize("layer,what,reload", [(0, "attention", False), (1, "attention", False), (0, "mlp", False),
                                               (0, "attention", True)])
def test_cached_decoding_equals_uncached_after_a_dropped_block(name, layer, what, reload, tmp_path):
    """Each cached step's logits equal a full uncached forward over the whole sequence so far; also for
    the saved standard checkpoint reloaded (its own modeling file's dropped attention)."""
    model = drop(load_model(name), layer, what)
    if reload:
        save_pruned(model, None, carried_plan(model), tmp_path / "pruned")
        model = load_model(str(tmp_path / "pruned"))
        assert not any(isinstance(m, torch.nn.Linear) and m.weight.is_meta for m in model.modules())
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 259, (2, 7), generator=gen)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(4):
            step = torch.randint(3, 259, (2, 1), generator=gen)
            ids = torch.cat([ids, step], dim=1)
            out = model(step, cache=cache, use_cache=True)
            cache = out.past_key_values
            uncached = model(ids, use_cache=False).logits[:, -1]
            assert rel_err(out.logits[:, -1], uncached) <= 1e-5


def test_generate_with_cache_equals_without_after_a_bloom_attention_is_dropped():
    """2-layer BLOOM, one head per layer, hidden 8, layer 0's head removed."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=32, hidden_size=8, n_layer=2, n_head=1, hidden_dropout=0.0,
                         attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():  # weights of spread 0.5: the default 0.02 hides the drift in rounding noise
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model = drop(model, 0, "attention")
    ids = torch.randint(3, 32, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    plain = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):  # a cache blind to the dropped block drifts 2.1e-4 .. 3.2e-4
        assert rel_err(a, b) <= 1e-5


# ----------------------------------------------------------------------- BLOOM's exact tensor-parallel mode
def tp_bloom(slow_but_exact=True):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=64, hidden_size=24, n_layer=3, n_head=4, pretraining_tp=3,
                         slow_but_exact=slow_but_exact, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = BloomForCausalLM(config).eval()
    with torch.no_grad():  # biases nonzero: the slow path drops them, the fast path does not
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def zeroed_reference(model, plan, ids):
    """The unsliced model with the removed heads' dense columns and removed channels' 4h_to_h columns
    zeroed (equal to masking their inputs, also in transformers' slow path, which reads the weights)."""
    import copy

    ref = copy.deepcopy(model)
    hd = model.config.hidden_size // model.config.n_head
    with torch.no_grad():
        for lp, block in zip(plan.layers, ref.transformer.h):
            keep = torch.zeros(model.config.hidden_size, dtype=torch.bool)
            for h in lp.heads:
                keep[h * hd:(h + 1) * hd] = True
            block.self_attention.dense.weight[:, ~keep] = 0.0
            keep = torch.zeros(4 * model.config.hidden_size, dtype=torch.bool)
            keep[lp.channels] = True
            block.mlp.dense_4h_to_h.weight[:, ~keep] = 0.0
    return logits(ref, ids)


def test_bloom_slow_but_exact_is_pruned_exactly(tmp_path):
    """pretraining_tp=3 over 24 columns (shards of 8 cross the 6-wide heads), heads and channels
    removed, layer 2's attention dropped; then a second prune and a save/reload."""
    model = tp_bloom()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = Plan("bloom", [LayerPlan(heads=[0, 2, 3], channels=list(range(0, 96, 3))),
                          LayerPlan(heads=[1], channels=list(range(40, 90))),
                          LayerPlan(heads=[], channels=list(range(96)))], allow_empty=True)
    expected = zeroed_reference(model, plan, ids)
    fast = tp_bloom(slow_but_exact=False)
    assert rel_err(zeroed_reference(fast, plan, ids), expected) > 1e-2  # control: the paths differ
    apply_plan(model, plan)
    assert rel_err(logits(model, ids), expected) <= 1e-5
    second = Plan("bloom", [LayerPlan(heads=[1, 2], channels=list(range(0, 32, 2))),
                            LayerPlan(heads=[0], channels=list(range(25))),
                            LayerPlan(heads=[], channels=list(range(50, 96)))], allow_empty=True)
    apply_plan(model, second)
    expected = zeroed_reference(tp_bloom(), carried_plan(model), ids)
    assert rel_err(logits(model, ids), expected) <= 1e-5
    out = save_pruned(model, None, carried_plan(model), tmp_path / "tp")
    assert rel_err(logits(load_pruned(out), ids), expected) <= 1e-5


# -------------------------------------------------------------------- re-pruning a model with an emptied block
EMPTIED_FAMILIES = ["tiny-llama", "tiny-phi3", "tiny-gemma2"]
ALL_METHODS = ["random", "magnitude", "wanda-sp", "flap", "llm-pruner", "minillm"]


@pytest.fixture(scope="module")
def emptied_dirs(tmp_path_factory):
    """{(family, "attention"|"mlp"): a saved pruned directory whose layer 1 has that block emptied
    (`--allow-empty`), nothing else removed}."""
    from suite.models import byte_tokenizer

    root, out = tmp_path_factory.mktemp("emptied"), {}
    for name in EMPTIED_FAMILIES:
        for what in ("attention", "mlp"):
            model = drop(load_model(name), 1, what)
            out[(name, what)] = save_pruned(model, byte_tokenizer(), carried_plan(model), root / f"{name}-{what}")
    return out


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("what", ["attention", "mlp"])
@pytest.mark.parametrize("name", EMPTIED_FAMILIES)
def test_repruning_a_model_with_an_emptied_block_equals_the_masked_original(emptied_dirs, name, what, method):
    """Every method re-prunes a directory with an already-empty block (was: ZeroDivisionError,
    AttributeError 'float' has no 'sqrt', a reshape error, or "plan leaves layer 1 with zero heads"
    without allow_empty): the empty block stays empty and is not counted again, the new plan
    removes the budget from the rest, and the sliced model equals the ORIGINAL dense model with
    every removed group (old and new, `tests/reference.masked_logits`) zeroed."""
    from suite.models import byte_tokenizer
    from suite.pipeline import prune

    model = load_model(str(emptied_dirs[(name, what)]))
    before = sum(p.numel() for p in model.parameters())
    options = {"compensate": False} if method == "flap" else None  # compensation adds biases: not a mask
    outcome = prune(model, byte_tokenizer(), method, 0.2, options=options, calib={"nsamples": 2, "seqlen": 32})
    after = sum(p.numel() for p in model.parameters())
    assert outcome.params_dense == before and before - after == outcome.selection.removed
    assert outcome.selection.target_removed == round(0.2 * before)  # of what is left: empty blocks not again
    assert abs(outcome.selection.removed - outcome.selection.target_removed) <= 0.01 * before
    plan = carried_plan(model)
    layer = plan.layers[1]
    assert (layer.heads if what == "attention" else layer.channels) == []
    removed_now = sum(len(a) - len(b) for a, b in zip(
        (l.heads + l.channels for l in Plan.load(emptied_dirs[(name, what)] / "plan.json").layers),
        (l.heads + l.channels for l in plan.layers)))
    assert removed_now > 0
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(5))
    assert rel_err(logits(model, ids), masked_logits(load_model(name), plan, ids)) <= 1e-5


def test_statistics_skip_an_emptied_blocks_groups():
    """`input_stats` on a layer whose attention is dropped (its out-projection never runs) measures
    the MLP's members alone, equal to the same statistics asked without the empty head set; the
    engine's group sets list no empty set at all."""
    from suite.pruning.activations import input_stats
    from suite.pruning.architectures import all_group_sets

    model = drop(load_model("tiny-llama"), 1, "attention")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[1]
    heads, channels = adapter.head_groups(1, layer), adapter.channel_groups(1, layer)
    assert heads.count == 0 and (1, "heads") not in {(gs.layer, gs.kind) for gs in all_group_sets(model)}
    windows = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(2))
    both, alone = input_stats(model, windows, [heads, channels]), input_stats(model, windows, [channels])
    assert both.keys() == alone.keys() == {(1, m.name) for m in channels.members}
    assert all(torch.equal(both[k].l2, alone[k].l2) for k in alone)


def test_repruning_the_issue_case_on_the_command_line(tmp_path, capsys):
    """The issue's commands: magnitude 0.75 global with --allow-empty empties MLPs; `random 0.1` on
    the result then prunes (exit 0, was a ZeroDivisionError) without --allow-empty, since it empties
    no block itself; a plan that does empty a block names the block it would empty."""
    from suite.cli import main

    first, second = tmp_path / "A", tmp_path / "B"
    assert main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--ratio", "0.75", "--scope", "global",
                 "--allow-empty", "--out", str(first), "--quiet"]) == 0
    emptied = [i for i, l in enumerate(Plan.load(first / "plan.json").layers) if not l.channels]
    assert emptied, "the first prune was expected to empty an MLP"
    assert main(["prune", "--model", str(first), "--method", "random", "--ratio", "0.1", "--out", str(second),
                 "--quiet"]) == 0
    assert all(not Plan.load(second / "plan.json").layers[i].channels for i in emptied)
    model = load_model(str(first))
    plan = full_plan(model)
    kept = next(i for i, l in enumerate(plan.layers) if l.heads)
    plan.layers[kept].heads = []
    with pytest.raises(UserError, match=rf"removes the last heads of layer {kept} \(zero heads left\)"):
        apply_plan(model, plan)


