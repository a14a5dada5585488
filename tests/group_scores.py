"""Independent references for the baselines' group scores (tests/test_magnitude.py, test_wanda_sp.py,
test_flap.py, test_llm_pruner.py).

The reference values are written from the papers' formulas with their own forward hooks,
`torch.autograd.grad` and explicit per-architecture module tables (not the methods' helpers nor the
engine's GroupSet layout). Scores are compared with a scale-relative error, max|a - b| / max|b|
<= 1e-5 (FLAP's standardised scores cross zero, so an elementwise relative error is meaningless).
"""
from __future__ import annotations

import torch

from suite.pruning.architectures import all_group_sets
from suite.pruning.scoring import checked_options
from tests.tiny import token_ids


TOL = 1e-5


ARCH = {
    "llama": {
        "layers": lambda m: m.model.layers,
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "rows": ["mlp.gate_proj", "mlp.up_proj"], "down": "mlp.down_proj",
    },
    "opt": {
        "layers": lambda m: m.model.decoder.layers,
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
        "rows": ["fc1"], "down": "fc2",
    },
    "bloom": {
        "layers": lambda m: m.transformer.h,
        "qkv": "self_attention.query_key_value", "o": "self_attention.dense",
        "rows": ["mlp.dense_h_to_4h"], "down": "mlp.dense_4h_to_h",
    },
}


def arch(model):
    return ARCH[model.config.model_type]


def dims(model):
    c = model.config
    nq = c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head
    hd = getattr(c, "head_dim", None) or c.hidden_size // nq
    nkv = getattr(c, "num_key_value_heads", None) or nq
    return nq, nkv, hd


def head_members(model, mode):
    """[(module name, dim, width per group)] for one layer's head groups, and the group count."""
    a, (nq, nkv, hd) = arch(model), dims(model)
    if "qkv" in a:
        return [(a["qkv"], 0, 3 * hd), (a["o"], 1, hd)], nq
    if nkv == nq:
        return [(a["q"], 0, hd), (a["k"], 0, hd), (a["v"], 0, hd), (a["o"], 1, hd)], nq
    if mode == "q-head":
        return [(a["q"], 0, hd), (a["o"], 1, hd)], nq
    per = nq // nkv
    return [(a["q"], 0, per * hd), (a["k"], 0, hd), (a["v"], 0, hd), (a["o"], 1, per * hd)], nkv


def channel_members(model):
    a = arch(model)
    return [(name, 0, 1) for name in a["rows"]] + [(a["down"], 1, 1)]


def members(model, kind, mode):
    if kind == "heads":
        return head_members(model, mode)
    a = arch(model)
    layer0 = a["layers"](model)[0]
    return channel_members(model), layer0.get_submodule(a["down"]).in_features


def per_vector(t, dim, width, count):
    """[count, width, other] from a weight-shaped tensor: group g's rows (dim 0) or columns (dim 1)."""
    t = t if dim == 0 else t.t()
    return t.reshape(count, width, -1)


def windows(n=6, length=32, seed=0):
    return token_ids(n, length, seed)


def output_inputs(model, ids):
    """{(layer, "heads"|"channels"): [tokens, in_features] float64} inputs of the output projections."""
    a, store, handles = arch(model), {}, []
    for i, layer in enumerate(a["layers"](model)):
        for kind, name in (("heads", a["o"]), ("channels", a["down"])):
            def hook(mod, args, key=(i, kind)):
                store.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def close(got: dict, want: dict):
    assert set(got) == set(want)
    for key in want:
        a, b = got[key].double(), want[key].double()
        assert a.shape == b.shape, key
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err <= TOL, f"{key}: relative error {err:.2e}"


def output_weights(model, mode):
    """(layer, kind, group count, group width, out-projection weight as float64) for every layer and kind."""
    for i, layer in enumerate(arch(model)["layers"](model)):
        for kind in ("heads", "channels"):
            mems, count = members(model, kind, mode)
            o_name, _, width = mems[-1]
            yield i, kind, count, width, layer.get_submodule(o_name).weight.detach().double()


def run(method, model, ids, mode="q-head", **options):
    opts = checked_options(method, options)  # as `suite prune`: a declared Options class parses old spellings too
    return method.score(model, ids, all_group_sets(model, mode), opts, 0)


CASES = [("tiny-llama", "q-head"), ("tiny-opt", "q-head"), ("tiny-llama-gqa", "q-head"),
         ("tiny-llama-gqa", "kv-group"), ("tiny-bloom", "q-head")]


def taylor_reference(model, ids, mode, importance, aggregation):
    a = arch(model)
    layers = a["layers"](model)
    named = []
    for i, layer in enumerate(layers):
        for kind in ("heads", "channels"):
            mems, count = members(model, kind, mode)
            for mname, dim, width in mems:
                named.append((i, kind, mname, dim, width, count, layer.get_submodule(mname).weight))
    weights = list(dict.fromkeys(w for *_, w in named))
    loss = model(ids, labels=ids, use_cache=False).loss
    grads = dict(zip(weights, torch.autograd.grad(loss, weights)))
    fisher = {w: 0 for w in weights}
    if importance == "element2":
        for j in range(len(ids)):
            lj = model(ids[j:j + 1], labels=ids[j:j + 1], use_cache=False).loss
            for w, g in zip(weights, torch.autograd.grad(lj, weights)):
                fisher[w] = fisher[w] + g.double() ** 2 / len(ids)
    per = {}
    for i, kind, mname, dim, width, count, w in named:
        wd, g = w.detach().double(), grads[w].double()
        s = wd * g
        if importance == "element2":
            s = s - 0.5 * wd * fisher[w] * wd
        v = per_vector(s, dim, width, count)
        imp = v.sum(2).abs() if importance == "vector" else v.abs().sum(2)   # [count, width]
        per.setdefault((i, kind), []).append(imp)
    want = {}
    for key, imps in per.items():
        w0 = min(t.shape[1] for t in imps)
        st = torch.stack([t.view(t.shape[0], -1, w0).sum(1) for t in imps])
        red = {"sum": st.sum(0), "mean": st.mean(0), "max": st.max(0).values, "prod": st.prod(0)}[aggregation]
        want[key] = red.sum(1)
    return want
