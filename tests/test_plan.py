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
from suite.pruning.plan import Plan, apply_plan, full_plan
from suite.models import load_model
from tests.reference import masked_logits, rel_err

def random_plan(model, rng, untouched=1, kv_mode=False):
    """Non-uniform plan: layers keep different counts; layer `untouched` keeps everything."""
    plan = full_plan(model)
    adapter = adapter_for(model)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        if i == untouched:
            continue
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        lp.channels = sorted(rng.sample(range(nch), rng.randint(1, nch - 1)))
        if nkv == nq:
            lp.heads = sorted(rng.sample(range(nq), rng.randint(1, nq - 1)))
        elif kv_mode:  # whole kv groups
            per = nq // nkv
            lp.kv_heads = sorted(rng.sample(range(nkv), rng.randint(1, nkv - 1)))
            lp.heads = [j * per + k for j in lp.kv_heads for k in range(per)]
        else:  # same number of q heads from every kv group
            per = nq // nkv
            k = rng.randint(1, per - 1) if i % 2 else per - 1
            lp.heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), k))
    return plan


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
