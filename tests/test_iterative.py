"""suite/pruning/iterative.py: rounds of plans in the current numbering, one plan in the entry numbering."""
from __future__ import annotations

import copy

import pytest
import torch

from suite.pruning.iterative import prune_in_rounds
from suite.pruning.layerwise import parameter_count
from suite.pruning.plan import apply_plan, plan_from_keep
from suite.models import load_model
from tests.tiny import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def drop_first(model, index):
    """Round 0 and 1: drop the first head (q-head) and the first 10 channels of every layer; then stop."""
    if index == 2:
        return None
    keep = {}
    for i, layer in enumerate(model.model.layers):
        nq = layer.self_attn.o_proj.in_features // layer.self_attn.head_dim
        keep[(i, "heads")] = list(range(1, nq)) if model.config.num_key_value_heads == model.config.num_attention_heads \
            else list(range(nq))
        keep[(i, "channels")] = list(range(10, layer.mlp.down_proj.in_features))
    return plan_from_keep(model, keep)


@pytest.mark.parametrize("sliced_first", [False, True])
def test_rounds_compose_to_one_plan_in_the_entry_numbering(sliced_first):
    model = load_model("tiny-llama")
    if sliced_first:  # an already-sliced model: the selection must be in ITS numbering
        apply_plan(model, drop_first(model, 0))
    entry = copy.deepcopy(model)
    sel = prune_in_rounds(model, drop_first, 0.1)
    assert sel.removed == parameter_count(entry) - parameter_count(model) > 0
    assert sel.total == parameter_count(entry) and sel.target_removed == round(0.1 * sel.total)
    # entry numbering: 8 heads (or 7 after the first slicing), two dropped from the front
    assert sel.plan.layers[0].heads == list(range(2, 7 if sliced_first else 8))
    assert sel.plan.layers[0].channels[0] == 20
    apply_plan(entry, sel.plan)  # the entry model sliced once by the returned plan equals the rounds' result
    ids = token_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(entry(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_no_round_returns_the_identity_plan():
    model = load_model("tiny-llama")
    sel = prune_in_rounds(model, lambda m, i: None, 0.2)
    assert sel.removed == 0 and all(len(lp.heads) == 8 for lp in sel.plan.layers)
