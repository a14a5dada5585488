"""Sequential pruning (suite/pruning/sequential.py) against an independent loop over WHOLE-MODEL forwards.

The reference re-derives, for every layer in order, the Wanda-sp statistics of that layer's output
projections from one ordinary `model(...)` forward of the UNSLICED model in which the earlier
layers' removed heads / channels are zeroed at their out-projections' input (tests/reference.py's
masking), picks the lowest-scoring groups with plain torch (per kv group in GQA q-head mode), and
moves on. The suite's path instead carries hidden states through `layerwise.LayerPass` and slices
each layer before the next one's statistics. Both must keep the same groups, and the sliced model
must equal the masked reference.
"""
import copy

import pytest
import torch

from baselines import wanda_sp
from suite.pruning.architectures import adapter_for
from suite.pruning.scoring import checked_options
from suite.pruning.select import layer_scope_allocation, select
from suite.pruning.sequential import prune_sequentially
from suite.models import load_model
from tests.reference import LLAMA_LIKE, OUT_PROJ, masked_logits, rel_err

CASES = [("tiny-llama", "q-head"), ("tiny-llama-gqa", "q-head"), ("tiny-llama-gqa", "kv-group"),
         ("tiny-opt", "q-head"), ("tiny-bloom", "q-head")]


def _windows(model, n=6, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


def _reference_loop(model, windows, counts, head_mode):
    """Kept (q heads, channels) per layer by FLAP's sequential recipe, from whole-model forwards."""
    adapter = adapter_for(model)
    attn_out, mlp_out = OUT_PROJ.get(model.config.model_type, LLAMA_LIKE)
    layers = adapter.layers(model)
    kept = []
    for i, layer in enumerate(layers):
        hd = adapter.attn(layer).head_dim
        nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
        handles, sums = [], {}
        for j, (heads, channels) in enumerate(kept):  # earlier layers: removed groups zeroed
            for name, keep, width in ((attn_out, heads, hd), (mlp_out, channels, 1)):
                lin = layers[j].get_submodule(name)
                mask = torch.zeros(lin.in_features)
                for g in keep:
                    mask[g * width:(g + 1) * width] = 1
                handles.append(lin.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
        for name in (attn_out, mlp_out):
            def grab(m, a, name=name):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
            handles.append(layer.get_submodule(name).register_forward_pre_hook(grab))
        with torch.no_grad():
            for b in windows.split(2):
                model(b, use_cache=False)
        for h in handles:
            h.remove()
        column = {name: layer.get_submodule(name).weight.double().abs().mean(0) * sums[name].sqrt()
                  for name in (attn_out, mlp_out)}
        head = column[attn_out].view(nq, hd).sum(1)            # one score per q head
        n_heads, n_channels = counts[(i, "heads")], counts[(i, "channels")]
        if nkv != nq and head_mode == "kv-group":                # a kv group: its q heads together
            per = nq // nkv
            groups = torch.argsort(head.view(nkv, per).sum(1), stable=True)[:n_heads].tolist()
            removed = {g * per + k for g in groups for k in range(per)}
        elif nkv != nq:                                          # the same number from every kv group
            per = nq // nkv
            removed = set()
            for g in range(nkv):
                order = torch.argsort(head[g * per:(g + 1) * per], stable=True)[:n_heads // nkv]
                removed |= {g * per + int(k) for k in order}
        else:
            removed = set(torch.argsort(head, stable=True)[:n_heads].tolist())
        gone = set(torch.argsort(column[mlp_out], stable=True)[:n_channels].tolist())
        kept.append(([h for h in range(nq) if h not in removed],
                     [c for c in range(column[mlp_out].numel()) if c not in gone]))
    return kept


@pytest.mark.parametrize("name,head_mode", CASES)
def test_sequential_wanda_sp_equals_a_whole_model_reference_loop(name, head_mode):
    model = load_model(name)
    reference = copy.deepcopy(model)
    windows = _windows(model)
    budget = layer_scope_allocation(reference, 0.3, head_mode=head_mode)
    kept = _reference_loop(reference, windows, budget.counts, head_mode)
    options = checked_options(wanda_sp, {})
    selection, scoring = prune_sequentially(model, windows, wanda_sp, options, 0.3, None, head_mode=head_mode,
                                            batch_size=2)
    for i, (lp, (heads, channels)) in enumerate(zip(selection.plan.layers, kept)):
        assert lp.heads == heads, f"layer {i} heads"
        assert lp.channels == channels, f"layer {i} channels"
    assert selection.removed == budget.removed
    assert sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in model.parameters()) \
        == selection.removed
    ids = windows[:2]
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, masked_logits(reference, selection.plan, ids)) < 1e-5


@pytest.mark.parametrize("name,head_mode", CASES)
def test_layer_scope_allocation_counts_are_select_counts_for_any_scores(name, head_mode):
    """The counts fixed before scoring are those `select(scope="layer")` gives for random scores."""
    model = load_model(name)
    budget = layer_scope_allocation(model, 0.4, head_mode=head_mode)
    g = torch.Generator().manual_seed(1)
    scores = {(gs.layer, gs.kind): torch.rand(gs.count, generator=g) for gs in budget.sets}
    selection = select(model, scores, 0.4, head_mode=head_mode)
    adapter = adapter_for(model)
    for gs in budget.sets:
        lp = selection.plan.layers[gs.layer]
        layer = adapter.layers(model)[gs.layer]
        if gs.kind == "channels":
            assert gs.count - len(lp.channels) == budget.counts[(gs.layer, "channels")]
        else:
            nq, nkv = adapter.num_heads(layer), adapter.num_kv_heads(layer)
            removed_groups = (nq - len(lp.heads)) // (nq // nkv if gs.count == nkv != nq else 1)
            assert removed_groups == budget.counts[(gs.layer, "heads")]
    assert selection.removed == budget.removed and selection.target_removed == budget.target_removed

