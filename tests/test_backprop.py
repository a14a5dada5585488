"""Bounded backprop: gradients accumulated over micro-batches, the loss's head checkpointed.

Every reference is a plain one-batch ``model(x, labels=x).loss.backward()`` (transformers' own loss
on the full logits), or the full-logits ``cross_entropy``, computed here; never the suite's loss.
Tiny seeded models, < 30 s in all.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines import llm_pruner
from suite.pruning import loss as lm_loss
from suite.pruning.architectures import all_group_sets
from minillm.method import weight_gradient, member_weights
from suite.pruning.scoring import checked_options
from suite.models import load_model
from tests.group_scores import close, taylor_reference
from tests.tiny import token_ids

MODELS = ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"]
SMALL_CHUNK = 3 * 512 + 5  # a few rows of logits per chunk: many checkpointed chunks, an uneven last one


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n=5):
    return token_ids(n, 24, seed=1)


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max|a − b| / max|b|, the scale floored at `floor` (a gradient that is 0 in exact arithmetic,
    like a key bias's under softmax, is rounding noise: compare it on the model's gradient scale)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def one_batch_gradients(model, ids) -> tuple[float, dict]:
    """(loss, {name: grad}) of transformers' own one-batch loss, plain backward."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_size", [1, 2])  # 5 windows: five passes; 2 + 2 + 1 (an uneven last one)
def test_micro_batched_gradient_equals_one_batch(name, batch_size, monkeypatch):
    model, ids = load_model(name), windows()
    want_loss, want = one_batch_gradients(model, ids)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", SMALL_CHUNK)
    loss = lm_loss.backprop_loss(model, ids, batch_size)
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    scale = 1e-2 * max(float(g.abs().max()) for g in want.values())
    for n in want:
        assert rel(got[n], want[n], scale) <= 1e-5, n
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", MODELS)
def test_llm_pruner_micro_batched_scores_equal_one_batch(name, monkeypatch):
    """The final scores at micro-batch 2 (and the auto size) equal those from one plain backward."""
    model, ids = load_model(name), windows()
    want = taylor_reference(model, ids, "q-head", "element1", "sum")  # torch.autograd.grad of model(x, labels=x).loss
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", SMALL_CHUNK)
    for batch_size in (2, 0):
        opts = checked_options(llm_pruner, {"batch_size": batch_size})
        scoring = llm_pruner.score(model, ids, all_group_sets(model), opts, 0)
        close(scoring.scores, want)
        assert scoring.info["micro_batch"] == (2 if batch_size else min(len(ids), llm_pruner.auto_batch_size(model, ids.shape[1])))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("offload", [False, True])
def test_llm_pruner_records_the_windows_it_batched(offload, tmp_path):
    """info.micro_batch / micro_batches are the windows actually batched and the passes, counted here
    by a hook on the input embedding (every pass embeds its micro-batch), not the auto limit."""
    from suite.offload import dispatch_offloaded

    model, ids = load_model("tiny-llama"), windows(n=5)
    assert llm_pruner.auto_batch_size(model, ids.shape[1]) > len(ids)  # the limit is not what was batched
    if offload:
        model = dispatch_offloaded(model, "cpu", "disk", 6_000_000, tmp_path / "off")
    for batch_size, want in ((0, [5]), (2, [2, 2, 1])):
        seen = []
        hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        opts = checked_options(llm_pruner, {"batch_size": batch_size})
        info = llm_pruner.score(model, ids, all_group_sets(model), opts, 0).info
        hook.remove()
        assert seen == want and info["micro_batch"] == max(seen) and info["micro_batches"] == len(seen)


def test_llm_pruner_fisher_keeps_per_window_passes(monkeypatch):
    model, ids = load_model("tiny-llama-gqa"), windows(n=3)
    want = taylor_reference(model, ids, "q-head", "element2", "sum")
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", SMALL_CHUNK)
    opts = checked_options(llm_pruner, {"importance": "element2", "batch_size": 2})
    close(llm_pruner.score(model, ids, all_group_sets(model), opts, 0).scores, want)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bloom"])
def test_minillm_backprop_reference_is_micro_batched_exactly(name):
    """MINI-LLM's `gradient=backprop` reference at batch_size 2 equals the one-batch gradient of its members."""
    from minillm import method

    model, ids = load_model(name), windows()
    _, want = one_batch_gradients(model, ids)
    scale = 1e-2 * max(float(g.abs().max()) for g in want.values())
    sets = all_group_sets(model)
    o = checked_options(method, {"gradient": "backprop", "batch_size": 2})
    grad = weight_gradient(model, ids, sets, "backprop", o, seed=0)
    names = [n for n, _ in member_weights(model, sets, output_only=o["members"] == "output")]
    assert names
    for n in names:
        assert rel(grad.of(n), want[n], scale) <= 1e-5, n
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_checkpointed_loss_saves_no_logits(name, monkeypatch):
    """Under autograd the loss equals cross_entropy of the full logits, and no [rows, vocab] tensor is
    kept for backward (each chunk's head is recomputed): what backward holds is the decoder's."""
    model, ids = load_model(name), windows(n=2)
    vocab = model.get_output_embeddings().out_features
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
        want = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum")
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", SMALL_CHUNK)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, count = lm_loss._lm_loss_sum(model, ids)
    assert count == ids[:, 1:].numel()
    assert abs(float(loss.detach()) - float(want)) <= 1e-5 * float(want)
    assert saved, "the decoder saves its activations"
    assert not [s for s in saved if s and s[-1] == vocab and len(s) >= 2 and s[0] > 1], saved[:5]
    loss.backward()  # the recomputation works
    assert model.get_output_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_auto_micro_batch_follows_the_estimate():
    """auto = floor((budget − loss chunk) / per-window estimate), at least 1; the estimate recomputed here."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    per_token = 2 * (8 * 4096 + 4 * 11008 + 32 * 128)
    assert llm_pruner.activation_bytes(config, 128, torch.float16) == 32 * 128 * per_token * 2

    class Fake:  # LLaMA-7B's shapes without its weights
        def __init__(self, config, dtype):
            self.config, self.p = config, torch.nn.Parameter(torch.zeros(1, dtype=dtype))

        def parameters(self):
            yield self.p

    assert llm_pruner.auto_batch_size(Fake(config, torch.float16), 128) == 1   # 1.3 GB a window > 1 GiB
    small = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    per_window = 30 * 128 * 2 * (8 * 576 + 4 * 1536 + 9 * 128) * 4            # SmolLM2-135M in fp32
    room = llm_pruner.ACTIVATION_BUDGET - 12 * lm_loss.LOSS_CHUNK_ELEMENTS
    assert llm_pruner.auto_batch_size(Fake(small, torch.float32), 128) == room // per_window == 2
