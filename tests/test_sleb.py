"""SLEB (baselines/sleb.py): its greedy removal order against an independent greedy loop over
whole-model perplexities (SLEB's own `turn_off`: a layer's forward replaced by the identity)."""
import pytest
import torch
from torch.nn import functional as F

from baselines import sleb
from suite.models import byte_tokenizer, load_model
from suite.pipeline import prune
from suite.pruning.errors import UserError
from suite.pruning.select import depth_budget
from tests.tiny import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def whole_model_loss(model, windows):
    """SLEB `get_loss`: per window, mean next-token cross-entropy x seqlen; summed (bs=1)."""
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0].double()
            total += float(F.cross_entropy(logits[:-1], w[1:])) * w.numel()
    return total


def greedy_whole_model(model, windows, count, early=1, latter=1):
    """SLEB `sleb()`: turn each candidate off, keep the one of least loss, repeat; returns (order, losses)."""
    layers = model.model.layers
    off = set()

    def skip(layer):
        layer.forward = lambda hidden_states, *args, **kwargs: hidden_states

    alive, order, losses = list(range(len(layers))), [], []
    for _ in range(count):
        best, best_loss = None, float("inf")
        for j in range(early, len(alive) - latter):
            skip(layers[alive[j]])
            loss = whole_model_loss(model, windows)
            del layers[alive[j]].forward  # turn_on
            if loss < best_loss:
                best, best_loss = j, loss
        skip(layers[alive[best]])
        off.add(alive[best])
        order.append(alive.pop(best))
        losses.append(best_loss)
    for i in off:
        del layers[i].forward
    return order, losses


@pytest.mark.parametrize("name,count,early,latter", [("tiny-llama", 3, 0, 0), ("tiny-gemma2", 2, 1, 1)])
def test_removal_order_equals_greedy_whole_model_perplexity(name, count, early, latter):
    model = load_model(name).eval()
    windows = token_ids(3, 20, seed=3)
    budget = depth_budget(model, 0.2)
    budget.count = count
    opts = {**sleb.OPTIONS, "early_barrier": early, "latter_barrier": latter}
    scoring = sleb.score_layers(model, windows, budget, opts, seed=0)
    order, losses = greedy_whole_model(model, windows, count, early, latter)
    assert scoring.info["removal_order"] == order
    per_token = [v / windows.numel() for v in losses]  # SLEB's mean x seqlen sums = NLL x seqlen/(seqlen-1)
    for got, want in zip(scoring.info["loss_per_token"], per_token):
        assert abs(got - want) <= 1e-6 * want
    lowest = sorted(budget.layers, key=lambda i: float(scoring.scores[(i, "layers")]))[:count]
    assert sorted(lowest) == sorted(order)


def test_barriers_keep_the_first_and_last_layer():
    model = load_model("tiny-llama").eval()
    budget = depth_budget(model, 0.2)
    budget.count = 2
    order = sleb.score_layers(model, token_ids(2, 16), budget, sleb.OPTIONS, 0).info["removal_order"]
    assert sorted(order) == [1, 2]
    budget.count = 3  # only layers 0 and 3 left: the barriers refuse
    with pytest.raises(UserError, match="no layer left to remove"):
        sleb.score_layers(model, token_ids(2, 16), budget, sleb.OPTIONS, 0)


def test_pipeline_removes_the_greedy_layers():
    model = load_model("tiny-opt")
    outcome = prune(model, byte_tokenizer(), "sleb", 0.25, calib={"nsamples": 2, "seqlen": 32})
    assert outcome.selection.plan.removed_layers == sorted(outcome.scoring.info["removal_order"])
    assert len(model.model.decoder.layers) == model.config.num_hidden_layers == 4 - len(outcome.selection.plan.removed_layers)
