"""MINI-LLM: the forward-only estimator (minillm/zo.py), the method (minillm/method.py), the diagnosis.

Tiny models only (no data needed: calibration windows are torch.randint), < 90 s in all.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minillm import zo

from suite.pruning import loss as lm_loss
from suite.pruning.architectures import adapter_for, all_group_sets, decoder_and_head
from suite.pruning.errors import UserError
from suite.pruning.gates import gated
from minillm import method as minillm_method
from minillm.method import OPTIONS, weight_gradient, member_weights, score
from suite.pruning.scoring import checked_options
from suite.pruning.select import select
from suite.models import load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread (with 2 threads on a shared 2-core machine, small ops spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def windows(n=2, seqlen=16, seed=0, vocab=259):
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def micro_llama():
    """A very small LLaMA (GQA) whose forward takes milliseconds: for many-direction convergence."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    state = torch.random.get_rng_state()
    torch.manual_seed(7)
    try:
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features ** -0.5)
    finally:
        torch.random.set_rng_state(state)
    return model


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def opts(**kw):
    return {**OPTIONS, "batch_size": 2, **kw}


# --------------------------------------------------------------------------- seeds
def test_directions_regenerate_bitwise_and_differ_across_tensors_and_seeds():
    a = zo.direction(123, 4, (5, 7))
    assert torch.equal(a, zo.direction(123, 4, (5, 7)))
    assert not torch.equal(a, zo.direction(123, 5, (5, 7)))
    assert not torch.equal(a, zo.direction(124, 4, (5, 7)))
    s1, s2 = zo.direction_seeds(0, 8), zo.direction_seeds(0, 8, stream=1)
    assert s1 == zo.direction_seeds(0, 8) and len(set(s1 + s2)) == 16
    # a tensor's share does not depend on what else is drawn (per-tensor generators)
    torch.manual_seed(0)
    torch.randn(100)
    assert torch.equal(a, zo.direction(123, 4, (5, 7)))


def test_estimate_rebuilds_the_same_gradient_from_seeds():
    x = torch.zeros(6)
    target = torch.arange(6.0)
    est = zo.spsa(lambda: float(((x - target) ** 2).sum()), [("x", x)], 1e-2, 5, seed=3)
    manual = sum(c * zo.direction(s, 0, (6,)) for s, c in zip(est.seeds, est.coeffs)) / 5
    assert torch.allclose(est.gradient(0), manual, atol=1e-6)
    assert torch.equal(est.gradient(0), est.gradient(0))
    prefixes = dict(est.prefix_gradients(0, [2, 5]))
    assert torch.allclose(prefixes[2], est.gradient(0, 2), atol=1e-6)
    assert torch.allclose(prefixes[5], est.gradient(0), atol=1e-6)


# --------------------------------------------------------------------------- the loss without full logits
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-bloom"])
@pytest.mark.parametrize("chunk", [lm_loss.LOSS_CHUNK_ELEMENTS, 3 * 512 + 5])  # default; uneven small chunks
def test_chunked_loss_equals_cross_entropy_of_the_full_logits(name, chunk, monkeypatch):
    model = load_model(name)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", chunk)
    batch = windows(n=3, seqlen=24, seed=5)
    assert decoder_and_head(model)[0] is not None
    with torch.no_grad():
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].double()
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        loss, count = lm_loss._lm_loss_sum(model, batch)
    assert count == 3 * 23
    assert abs(float(loss) - float(expected)) <= 1e-5 * float(expected)


def test_statistics_pass_skips_the_logits_but_sees_the_same_inputs():
    from suite.pruning.activations import input_stats

    model = load_model("tiny-opt")
    sets = all_group_sets(model)
    batch = windows(n=2, seqlen=16, seed=3)
    seen = {}
    handles = [gs.linear(gs.output).register_forward_pre_hook(
        lambda mod, args, key=(gs.layer, gs.kind): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))
        for gs in sets]
    head_calls = []
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1)))
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)  # the full model, for the reference inputs
    assert head_calls == [1]
    stats = input_stats(model, batch, sets, batch_size=2)
    for h in handles:
        h.remove()
    assert head_calls == [1]  # the statistics pass never ran the output embedding
    for gs in sets:
        x = seen[(gs.layer, gs.kind)].double()
        st = stats[(gs.layer, gs.output.name)]
        assert st.n == x.shape[0]
        assert torch.allclose(st.sum_sq, (x * x).sum(0), rtol=1e-6)


# --------------------------------------------------------------------------- unbiased and converging
def test_spsa_is_unbiased_on_a_quadratic():
    """E[ĝ] = g exactly for a quadratic (two-sided differences have no O(ε²) bias there)."""
    d = 12
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=gen)
    a = a @ a.t() / d
    b = torch.randn(d, generator=gen)
    x = torch.randn(d, generator=gen)
    x0 = x.clone()
    loss = lambda: float(0.5 * x.double() @ a.double() @ x.double() + b.double() @ x.double())
    true = a @ x0 + b
    est = zo.spsa(loss, [("x", x)], 1e-3, 4000, seed=1)
    assert cosine(est.gradient(0), true) >= 0.99
    assert (est.gradient(0) - true).norm() / true.norm() < 0.2  # ≈ sqrt(d/q)
    assert torch.allclose(x, x0, atol=max(est.drift_bound) * 1.0001)


def head_gates_with_autograd_gradient():
    """micro_llama, its calibration windows, its head group sets and ∂L/∂gate by autograd (gates at 1)."""
    model = micro_llama()
    w = windows(2, 16, vocab=64)
    sets = [gs for gs in all_group_sets(model) if gs.kind == "heads"]
    gates = [torch.ones(gs.count, requires_grad=True) for gs in sets]
    with gated(sets, gates):
        lm_loss.backprop_loss(model, w)
    model.zero_grad(set_to_none=True)
    return model, w, sets, torch.cat([g.grad for g in gates])


def test_spsa_converges_to_autograd_on_head_gates():
    """Many directions over a small space (8 head gates of a real LLaMA): cosine(ĝ, g) >= 0.9."""
    model, w, sets, true = head_gates_with_autograd_gradient()
    gates = [torch.ones(gs.count) for gs in sets]
    with gated(sets, gates):
        est = zo.spsa(lambda: lm_loss.calibration_loss(model, w), [(str(i), g) for i, g in enumerate(gates)],
                      1e-2, 300, seed=0)
    ghat = torch.cat([est.gradient(i) for i in range(len(gates))])
    assert cosine(ghat, true) >= 0.9
    assert cosine(torch.cat([est.gradient(i, 10) for i in range(len(gates))]), true) < cosine(ghat, true)


def test_coordinate_differences_match_autograd_and_restore_exactly():
    model, w, sets, true = head_gates_with_autograd_gradient()
    gates = [torch.ones(gs.count) for gs in sets]
    with gated(sets, gates):
        est = zo.coordinate(lambda: lm_loss.calibration_loss(model, w), [(str(i), g) for i, g in enumerate(gates)], 1e-2)
    assert est.forwards == 2 * true.numel()
    assert cosine(torch.cat([est.gradient(i) for i in range(len(gates))]), true) >= 0.999
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates)


def test_spsa_converges_to_autograd_on_a_small_weight():
    """Weights perturbed in place (a 32-vector: the final norm) converge to the backprop gradient."""
    model = micro_llama()
    w = windows(2, 16, vocab=64)
    p = model.model.norm.weight
    for q in model.parameters():
        q.requires_grad_(q is p)
    lm_loss.backprop_loss(model, w)
    true = p.grad.clone()
    p.grad = None
    est = zo.spsa(lambda: lm_loss.calibration_loss(model, w), [("norm", p)], 1e-3, 400, seed=0)
    assert cosine(est.gradient(0), true) >= 0.9


# --------------------------------------------------------------------------- restoring the weights
def test_weights_after_scoring_are_within_the_stated_bound():
    model = load_model("tiny-llama-gqa")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = score(model, windows(), all_group_sets(model), opts(directions=3, restore="arithmetic"), seed=0)
    info = result.info["weight"]
    assert info["restore"] == "arithmetic"
    bound = info["drift_bound"]
    assert 0 < bound < 1e-5  # O(q·ulp(W))
    drift = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())
    assert drift <= bound
    assert all(p.grad is None for p in model.parameters())


def test_weights_are_restored_exactly_from_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    load_model("tiny-llama").save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = score(model, windows(), all_group_sets(model), opts(directions=2, restore="checkpoint"), seed=0)
    assert result.info["weight"]["restore"] == "checkpoint"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_checkpoint_that_is_not_the_source_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    load_model("tiny-llama").save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # no longer what the file holds
    named = member_weights(model, all_group_sets(model))
    est = zo.spsa(lambda: lm_loss.calibration_loss(model, windows()), named, 1e-3, 1, seed=0)
    summary = zo.restore_from_checkpoint(model, named, est.drift_bound)
    assert summary["restore"] == "partial" and summary["restored"] == len(named) - 1


def test_an_interrupted_direction_is_undone():
    x = torch.ones(5)
    calls = {"n": 0}

    def loss():
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return float(x.sum())

    with pytest.raises(KeyboardInterrupt):
        zo.spsa(loss, [("x", x)], 0.5, 3, seed=0)
    assert torch.allclose(x, torch.ones(5), atol=1e-6)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("space", ["weight", "mask", "layer"])
def test_same_seed_same_kept_groups(space):
    w = windows()
    plans = []
    for _ in range(2):
        model = load_model("tiny-llama-gqa")
        o = opts(space=space, directions=2, blockwise=space == "mask")
        result = score(model, w, all_group_sets(model), o, seed=5)
        sel = select(model, result.scores, 0.3, allocation_weights=result.info.get("layer_weights"))
        plans.append(sel.plan.to_json())
    assert plans[0] == plans[1]


# --------------------------------------------------------------------------- FMS against an independent computation
def _independent_fms(model, w, kind, noise_of=None):
    """FMS = Σ over a group's weights of |W·ĝ·‖X‖₂|, written out per head / channel with explicit slices.

    For kind="noise", `noise_of(parameter name)` gives the drawn ĝ (the arithmetic is still this test's).
    """
    layers = adapter_for(model).layers(model)
    linears = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                linears[(i, name)] = mod
    sq = {k: 0.0 for k in linears}
    hooks = [mod.register_forward_pre_hook(lambda m, a, k=k: sq.__setitem__(k, sq[k] + a[0].double().pow(2).reshape(-1, a[0].shape[-1]).sum(0)))
             for k, mod in linears.items()]
    with torch.no_grad():
        for b in w.split(2):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    xnorm = {k: v.sqrt().float() for k, v in sq.items()}
    grads = {}
    if kind == "backprop":
        params = [mod.weight for mod in linears.values()]
        logits = model(input_ids=w).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        for k, g in zip(linears, torch.autograd.grad(loss, params)):
            grads[k] = g
    if kind == "noise":
        names = {id(p): n for n, p in model.named_parameters()}
        grads = {k: noise_of(names[id(mod.weight)]) for k, mod in linears.items()}
    out = {}
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in range(len(layers)):
        def s(name):
            wt = linears[(i, name)].weight.detach()
            g = grads.get((i, name), torch.ones_like(wt))
            return (wt * g * xnorm[(i, name)][None, :]).abs()

        q, o = s("self_attn.q_proj"), s("self_attn.o_proj")
        out[(i, "heads")] = torch.tensor([float(q[h * hd:(h + 1) * hd].sum() + o[:, h * hd:(h + 1) * hd].sum())
                                          for h in range(cfg.num_attention_heads)])
        gp, up, dn = s("mlp.gate_proj"), s("mlp.up_proj"), s("mlp.down_proj")
        out[(i, "channels")] = gp.sum(1) + up.sum(1) + dn.sum(0)
    return out


@pytest.mark.parametrize("kind", ["none", "noise", "backprop"])
def test_fms_matches_an_independent_computation(kind):
    model = load_model("tiny-llama-gqa")  # q-head mode: k/v are shared, not part of a head group
    w = windows(4, 16)
    noise = weight_gradient(model, None, all_group_sets(model), "noise", opts(gradient="noise"), seed=0)
    expected = _independent_fms(model, w, kind, noise_of=noise.of)
    model.zero_grad(set_to_none=True)
    sets = all_group_sets(model)
    got = score(model, w, sets, opts(gradient=kind), seed=0).scores
    per_group = {(gs.layer, gs.kind): gs.params_per_group() for gs in sets}  # scores are per parameter
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double() * per_group[key], value.double(), rtol=1e-5, atol=1e-8)


def test_noise_gradient_is_a_seeded_standard_gaussian_per_weight():
    model = load_model("tiny-llama-gqa")
    sets = all_group_sets(model)
    o = opts(gradient="noise")
    draw = weight_gradient(model, None, sets, "noise", o, seed=3)
    assert draw.info["forwards"] == 0  # a control: no loss is ever computed
    members = member_weights(model, sets)
    first = members[0][0]
    a = draw.of(first)
    assert a.shape == members[0][1].shape
    assert torch.equal(a, draw.of(first))  # regenerated, not stored
    # the draw depends on (seed, name) only: not on which other Linears are scored, nor their order
    assert torch.equal(a, weight_gradient(model, None, sets[:1], "noise", o, seed=3).of(first))
    assert not torch.equal(a, weight_gradient(model, None, sets, "noise", o, seed=4).of(first))
    every = torch.cat([draw.of(n).flatten() for n, _ in members])
    assert len({float(draw.of(n).flatten()[0]) for n, _ in members}) == len(members)  # one stream per Linear
    n = every.numel()
    assert abs(float(every.mean())) < 5 / n ** 0.5 and abs(float(every.std()) - 1) < 5 / n ** 0.5


def test_backprop_mask_scores_are_the_gate_gradients():
    model = load_model("tiny-opt")
    w = windows()
    sets = all_group_sets(model)
    gates = [torch.ones(gs.count, requires_grad=True) for gs in sets]
    with gated(sets, gates):
        lm_loss.backprop_loss(model, w, 2)
    model.zero_grad(set_to_none=True)
    got = score(model, w, sets, opts(space="mask", gradient="backprop"), seed=0).scores
    for gs, g in zip(sets, gates):
        torch.testing.assert_close(got[(gs.layer, gs.kind)] * gs.params_per_group(), g.grad.abs(),
                                   rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- block-wise runs and spaces
def _perturbed_copy(model, named, seed, index_of, eps):
    """A deep copy of `model` with tensor `name` += eps·z(seed, index_of[name]) (this test's arithmetic)."""
    import copy

    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, _ in named:
            params[name].add_(zo.direction(seed, index_of[name], params[name].shape), alpha=eps)
    return m


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_layerwise_spsa_equals_whole_model_spsa(name):
    """Weight space on the layer-by-layer pass: each of the 2q losses is the whole-model loss of the
    same perturbed model; ĝ and the FMS scores equal today's whole-model SPSA (same seeds); the
    weights come back bit-identical."""
    import copy

    from suite.pruning.activations import input_stats
    from minillm.method import fms_scores

    model = load_model(name)
    reference = copy.deepcopy(model)
    w, q, eps, seed = windows(3, 16), 3, 1e-3, 5
    sets = all_group_sets(model)
    named = member_weights(model, sets)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = lm_loss.LayerwiseLoss(model, w, batch_size=2)
    layers = zo.parameter_layers(runner.lp, [t for _, t in named])
    seeds = zo.direction_seeds(seed, q)
    losses = runner.losses(0, runner.lp.hidden, zo.Directions([t for _, t in named], layers, seeds, eps, True,
                                                                runner.lp.device))
    index_of = {n: i for i, (n, _) in enumerate(named)}
    for k in range(q):
        for sign, got in ((1, losses[2 * k]), (-1, losses[2 * k + 1])):
            want = lm_loss.calibration_loss(_perturbed_copy(reference, named, seeds[k], index_of, sign * eps), w, 2)
            assert abs(got - want) <= 1e-6 * want
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the estimate and the scores against the whole-model estimator on the untouched copy
    result = score(model, w, sets, opts(directions=q, seed=seed), seed=0)
    assert result.info["weight"]["restore"] == "layer-copy" and result.info["weight"]["layerwise"] is True
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    ref_sets = all_group_sets(reference)
    ref_named = member_weights(reference, ref_sets)
    whole = zo.spsa(lambda: lm_loss.calibration_loss(reference, w, 2), ref_named, eps, q, seed)
    est = zo.spsa_layerwise(runner, named, layers, eps, q, seed)
    scale = max(abs(c) for c in whole.coeffs)
    assert all(abs(a - b) <= 1e-3 * scale for a, b in zip(est.coeffs, whole.coeffs))
    ghat = torch.cat([est.gradient(i).flatten() for i in range(len(named))])
    assert cosine(ghat, torch.cat([whole.gradient(i).flatten() for i in range(len(named))])) >= 0.9999
    stats = input_stats(reference, w, ref_sets, batch_size=2)
    index = {n: i for i, n in enumerate(whole.names)}
    expected = fms_scores(reference, ref_sets, stats, lambda n: whole.gradient(index[n]))
    for gs in sets:
        key = (gs.layer, gs.kind)
        torch.testing.assert_close(result.scores[key].double() * gs.params_per_group(), expected[key].double(),
                                   rtol=2e-3, atol=1e-7)


def test_each_layer_is_resident_once_and_hidden_states_may_live_on_the_host(monkeypatch):
    from suite.pruning.layerwise import LayerPass

    model = load_model("tiny-llama-gqa")
    w, sets = windows(3, 16), all_group_sets(model)
    resident = []
    original = LayerPass.resident

    def counting(self, i):
        resident.append(i)
        return original(self, i)

    monkeypatch.setattr(LayerPass, "resident", counting)
    on_device = score(model, w, sets, opts(directions=2), seed=0)
    assert resident == list(range(len(adapter_for(model).layers(model)))) * 2  # statistics pass, then SPSA
    on_host = score(model, w, sets, opts(directions=2, hidden_on="cpu"), seed=0)
    for key, value in on_device.scores.items():
        assert torch.equal(value, on_host.scores[key])


def test_a_residency_that_replaces_the_parameters_is_followed(monkeypatch):
    """Offloaded layers get new Parameter objects while resident (accelerate's
    set_module_tensor_to_device): the perturbation must act on those, by name, and the scores
    must equal those of a model whose layers never move."""
    from contextlib import contextmanager

    from suite.pruning.layerwise import LayerPass

    w, sets_of = windows(3, 16), all_group_sets
    plain = load_model("tiny-opt")
    expected = score(plain, w, sets_of(plain), opts(directions=2), seed=0).scores
    model = load_model("tiny-opt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    @contextmanager
    def swapping(self, i):
        layer = self.layers[i]
        home = {n: p for n, p in layer.named_parameters()}
        for n, p in home.items():  # fresh Parameters while resident, written back on leaving
            module, _, attr = n.rpartition(".")
            layer.get_submodule(module)._parameters[attr] = nn.Parameter(p.detach().clone(), requires_grad=False)
        try:
            yield layer
        finally:
            for n, p in home.items():
                module, _, attr = n.rpartition(".")
                with torch.no_grad():
                    p.copy_(layer.get_submodule(module)._parameters[attr])
                layer.get_submodule(module)._parameters[attr] = p

    monkeypatch.setattr(LayerPass, "resident", swapping)
    got = score(model, w, sets_of(model), opts(directions=2), seed=0)
    for key, value in expected.items():
        torch.testing.assert_close(got.scores[key], value, rtol=1e-6, atol=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_gate_losses_from_a_layer_equal_the_whole_model_loss(name):
    """Gates on the layer-by-layer pass: perturbing layer i's gates and running from layer i's
    unperturbed inputs (block-wise), or all layers' gates from layer 0, gives the whole-model loss
    of the same gates."""
    model = load_model(name)
    w, eps, seed = windows(3, 12), 1e-2, 3
    sets = all_group_sets(model)
    gates = [torch.ones(gs.count) for gs in sets]
    layers = [gs.layer for gs in sets]
    seeds = zo.direction_seeds(seed, 1)

    def whole_model_loss(part, sign):
        with torch.no_grad():
            for i in part:
                gates[i].add_(zo.direction(seeds[0], part.index(i), gates[i].shape), alpha=sign * eps)
            loss = lm_loss.calibration_loss(model, w, 2)
            for g in gates:
                g.fill_(1.0)
        return loss

    with gated(sets, gates):
        runner = lm_loss.LayerwiseLoss(model, w, batch_size=2)
        every = list(range(len(sets)))
        got = runner.losses(0, runner.lp.hidden, zo.Directions(gates, layers, seeds, eps, True, None))
        assert all(torch.equal(g, torch.ones_like(g)) for g in gates)
        for s, sign in enumerate((1, -1)):
            want = whole_model_loss(every, sign)
            assert abs(got[s] - want) <= 1e-6 * want
        for layer, inputs in runner.clean_inputs(layers):
            part = [i for i in every if layers[i] == layer]
            got = runner.losses(layer, inputs, zo.Directions([gates[i] for i in part], [layer] * len(part), seeds,
                                                             eps, True, None))
            for s, sign in enumerate((1, -1)):
                want = whole_model_loss(part, sign)
                assert abs(got[s] - want) <= 1e-6 * want
        assert abs(runner.clean_loss - lm_loss.calibration_loss(model, w, 2)) <= 1e-6 * runner.clean_loss


def test_layerwise_coordinate_differences_equal_the_whole_model_ones():
    model, w, sets, true = head_gates_with_autograd_gradient()
    gates = [torch.ones(gs.count) for gs in sets]
    named = [(str(i), g) for i, g in enumerate(gates)]
    with gated(sets, gates):
        whole = zo.coordinate(lambda: lm_loss.calibration_loss(model, w), named, 1e-2)
        runner = lm_loss.LayerwiseLoss(model, w, batch_size=4)
        layered = zo.coordinate_layerwise(runner, named, [gs.layer for gs in sets], 1e-2, streams=3)
    assert layered.forwards == whole.forwards
    for i in range(len(gates)):
        torch.testing.assert_close(layered.gradient(i), whole.gradient(i), rtol=1e-3, atol=1e-4)
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates)


def test_layer_space_returns_layer_weights_and_heads_mask_uses_fms_for_channels():
    model = load_model("tiny-llama")
    w = windows()
    res = score(model, w, all_group_sets(model), opts(space="layer", directions=2, fms_gradient="none"), seed=0)
    weights = res.info["layer_weights"]
    assert sorted(weights) == [0, 1, 2, 3]
    assert math.isclose(min(weights.values()), 1 - OPTIONS["layer_lambda"])
    assert math.isclose(max(weights.values()), 1 + OPTIONS["layer_lambda"])
    res = score(model, w, all_group_sets(model), opts(space="mask", mask_groups="heads", fms_gradient="none",
                                                      directions=2), seed=0)
    assert "mask" in res.info and res.info["fms"]["gradient"] == "none"
    assert all(v.shape == (gs.count,) for gs in all_group_sets(model) for k, v in res.scores.items()
               if k == (gs.layer, gs.kind))


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="space"):
        checked_options(minillm_method, opts(space="weights"))
    with pytest.raises(UserError, match="weight-space control"):
        checked_options(minillm_method, opts(space="mask", gradient="none"))
    with pytest.raises(UserError, match="weight-space control"):
        checked_options(minillm_method, opts(space="layer", gradient="noise"))
    with pytest.raises(UserError, match="coordinate"):
        checked_options(minillm_method, opts(space="weight", estimator="coordinate"))
    # the ranking scope is the pipeline's (--scope / `scope:`), not a scoring option
    with pytest.raises(UserError, match="no option 'rank'"):
        checked_options(minillm_method, {"rank": "global"})


# --------------------------------------------------------------------------- CLI
def test_zo_diagnose_cli_writes_a_record(tmp_path, capsys):
    data = Path(os.environ.get("MINILLM_DATA", ""))  # tests/conftest.py points it at the mirror
    if not (data / "hf" / "ptb_text_only").is_dir():
        pytest.skip("no dataset mirror")
    from suite.cli import main

    out = tmp_path / "zo.json"
    rc = main(["zo-diagnose", "--model", "tiny-llama-gqa", "--space", "mask,layer", "--directions", "2,4",
               "--calib", "ptb", "--nsamples", "2", "--seqlen", "16", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert set(record["spaces"]) == {"mask", "layer"}
    assert set(record["spaces"]["mask"]["q"]) == {"2", "4"}
    assert "cosine" in capsys.readouterr().out


def test_prune_cli_runs_minillm_and_records_the_score_phase(tmp_path):
    data = Path(os.environ.get("MINILLM_DATA", ""))
    if not (data / "hf" / "allenai" / "c4").is_dir():
        pytest.skip("no dataset mirror")
    from suite.cli import main

    out = tmp_path / "pruned"
    rc = main(["prune", "--model", "tiny-llama-gqa", "--method", "minillm", "--ratio", "0.2", "--out", str(out),
               "--nsamples", "2", "--seqlen", "16", "--opt", "space=mask", "--opt", "directions=2",
               "--opt", "mask_groups=heads", "--opt", "blockwise=true", "--scope", "global", "--quiet"])
    assert rc == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["options"]["space"] == "mask" and record["options"]["directions"] == 2
    assert record["phases"]["score"]["seconds"] > 0 and record["phases"]["score"]["peak_mb"] > 0
    assert record["method_info"]["mask"]["blockwise"] is True
    assert record["selection"]["scope"] == "global" and "scope" not in record["method_info"]  # one source


def test_mean_compensation_adds_the_removed_columns_mean_contribution():
    from suite.pruning.activations import input_stats
    from suite.pruning.plan import apply_plan

    model = load_model("tiny-llama")
    w = windows(4, 16)
    sets = all_group_sets(model)
    down = model.model.layers[1].mlp.down_proj
    full = down.weight.detach().clone()
    mean = input_stats(model, w, sets, batch_size=2)[(1, "mlp.down_proj")].mean
    result = score(model, w, sets, opts(gradient="none", compensate=True), seed=0)
    sel = select(model, result.scores, 0.3)
    n_before = sum(p.numel() for p in model.parameters())
    apply_plan(model, sel.plan)
    result.compensate(model, sel.plan)
    kept = torch.tensor(sel.plan.layers[1].channels)
    removed = torch.ones(full.shape[1], dtype=torch.bool)
    removed[kept] = False
    expected = full[:, removed].double() @ mean[removed]
    torch.testing.assert_close(down.bias.double(), expected, rtol=1e-5, atol=1e-6)
    # the new biases count as parameters (as FLAP's, and as a reload counts them)
    added = result.info["bias_entries_added"]
    assert added == sum(m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert n_before - sum(p.numel() for p in model.parameters()) == sel.removed - added
    assert result.info["compensated_modules"] == 8


# -------------------------------- compensation, the diagnosis' rank correlation, restoring from safetensors
def test_compensation_refuses_an_unsliced_projection_naming_the_method():
    from minillm.method import OPTIONS, score
    from suite.pruning.select import select

    model = load_model("tiny-llama")
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = score(model, windows, all_group_sets(model), {**OPTIONS, "gradient": "none", "compensate": True},
                   seed=0)
    plan = select(model, result.scores, 0.3).plan
    with pytest.raises(UserError, match=r"^minillm compensation: layer \d+ \w+ output projection was not sliced"):
        result.compensate(model, plan)  # never sliced: refused, the model is left as it was
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_spearman_averages_ties_and_is_nan_for_a_constant_side():
    from minillm.diagnose import spearman

    a = torch.tensor([10.0, 20.0, 20.0, 30.0, 5.0])
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    ra, rb = np.array([1, 2.5, 2.5, 4, 0]), np.array([0, 2, 1, 4, 3])  # ranks by hand, ties averaged
    expected = ((ra - ra.mean()) @ (rb - rb.mean())) / np.sqrt(((ra - ra.mean()) ** 2).sum() * ((rb - rb.mean()) ** 2).sum())
    assert spearman(a, b) == pytest.approx(expected, abs=1e-15)
    assert spearman(torch.arange(6.0), -torch.arange(6.0) ** 3) == pytest.approx(-1.0)
    assert np.isnan(spearman(torch.ones(4), torch.arange(4.0))) and np.isnan(spearman(torch.ones(1), torch.ones(1)))


def test_safetensors_index_and_read_give_back_the_saved_tensors(tmp_path):
    from safetensors.torch import save_file

    from minillm.zo import _read_tensor, _safetensors_index

    gen = torch.Generator().manual_seed(1)
    saved = {"w": torch.randn(3, 4, generator=gen), "h": torch.randn(5, generator=gen).half(),
             "b": torch.randn(2, 2, generator=gen).bfloat16(), "d": torch.randn(2, generator=gen).double(),
             "empty": torch.zeros(0, 3), "ids": torch.arange(4)}
    path = tmp_path / "model.safetensors"
    save_file(saved, str(path))
    index = _safetensors_index(path)
    assert sorted(index) == ["b", "d", "empty", "h", "w"]  # float tensors only: SPSA perturbs nothing else
    for name, (where, key, shape) in index.items():
        assert (where, key, shape) == (path, name, tuple(saved[name].shape))
        got = _read_tensor(index[name])
        assert got.dtype == saved[name].dtype and torch.equal(got, saved[name])  # bit for bit


def test_checkpoint_restore_skips_an_unreadable_safetensors_file(tmp_path):
    from transformers import AutoModelForCausalLM

    from minillm import zo

    from suite.pruning import loss as lm_loss
    from minillm.method import member_weights

    load_model("tiny-llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "broken.safetensors").write_bytes(b"\xff" * 64)  # a header length far past the end
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = member_weights(model, all_group_sets(model))
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    est = zo.spsa(lambda: lm_loss.calibration_loss(model, windows), named, 1e-3, 1, seed=0)
    summary = zo.restore_from_checkpoint(model, named, est.drift_bound)
    assert summary["restore"] == "checkpoint" and summary["restored"] == len(named)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
