"""Baselines (magnitude, wanda-sp, flap, llm-pruner): every group score recomputed independently.

The reference values here are written from the papers' formulas with their own forward hooks,
`torch.autograd.grad` and explicit per-architecture module tables (not the methods' helpers nor the
core's GroupSet layout). Scores are compared with a scale-relative error, max|a - b| / max|b|
<= 1e-5 (FLAP's standardised scores cross zero, so an elementwise relative error is meaningless).
"""
from __future__ import annotations

import json

import pytest
import torch

from baselines import flap, llm_pruner, magnitude, wanda_sp
from suite.pruning.architectures import all_group_sets
from suite.pruning.plan import apply_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.pruning.scoring import checked_options
from suite.pruning.select import select
from suite.models import load_model
from suite.pruning.select import parse_layer_range
from tests.tiny import token_ids

TOL = 1e-5

# ------------------------------------------------------------------ independent architecture tables
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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]
    return get


# ------------------------------------------------------------------ magnitude
@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("norm,given", [("l2", {}), ("l1", {"members": "output"}), ("l2", {"members": "all"}),
                                        ("l1", {"members": "all"}), ("l2", {"weights": "output"}),
                                        ("l1", {"weights": "group"})])
def test_magnitude_scores(models, name, mode, norm, given):
    """`members=all` is the p-norm over every weight of the group; `weights=output|group` is the old spelling
    of `members=output|all` (same scores, computed here from the spelling's meaning, not through the alias)."""
    model = models(name)
    p = 1 if norm == "l1" else 2
    whole_group = given.get("members") == "all" or given.get("weights") == "group"
    want = {}
    if whole_group:
        for i, layer in enumerate(arch(model)["layers"](model)):
            for kind in ("heads", "channels"):
                mems, count = members(model, kind, mode)
                total = 0
                for mname, dim, width in mems:
                    w = layer.get_submodule(mname).weight.detach().double()
                    total = total + per_vector(w, dim, width, count).abs().pow(p).sum(dim=(1, 2))
                want[(i, kind)] = total.pow(1 / p)
    else:
        for i, kind, count, width, w in output_weights(model, mode):
            col = w.abs().pow(p).sum(0).pow(1 / p)                   # FLAP mag_sp: torch.norm(W, dim=0)
            want[(i, kind)] = col.view(count, width).sum(1)
    result = run(magnitude, model, None, mode, norm=norm, **given)
    close(result.scores, want)
    assert result.info == {"norm": norm, "members": "all" if whole_group else "output"}  # the canonical spelling


# ------------------------------------------------------------------ wanda-sp
@pytest.mark.parametrize("name,mode", CASES)
def test_wanda_sp_scores(models, name, mode):
    model, ids = models(name), windows()
    xs = output_inputs(model, ids)
    want = {}
    for i, kind, count, width, w in output_weights(model, mode):
        x_norm = xs[(i, kind)].pow(2).sum(0).sqrt()                # ||X_j||_2 over all tokens
        s = (w.abs() * x_norm[None, :]).mean(0)                    # Wanda Eq. 1, mean over rows (FLAP)
        want[(i, kind)] = s.view(count, width).sum(1)
    close(run(wanda_sp, model, ids, mode).scores, want)


# ------------------------------------------------------------------ flap
def flap_reference(model, ids, mode, head_power=2.0):
    xs = output_inputs(model, ids)
    want = {}
    for i, kind, count, width, w in output_weights(model, mode):
        s = torch.var(xs[(i, kind)], dim=0, unbiased=True) * w.pow(2).sum(0)
        if kind == "heads":
            s = s ** head_power
        z = (s - s.mean()) / s.std(unbiased=True)
        want[(i, kind)] = z.view(count, width).mean(1)
    return want, xs


@pytest.mark.parametrize("name,mode", CASES)
def test_flap_scores(models, name, mode):
    model, ids = models(name), windows()
    want, _ = flap_reference(model, ids, mode)
    scoring = run(flap, model, ids, mode)
    close(scoring.scores, want)
    assert flap.SELECTION["scope"] == "global" and scoring.compensate is not None
    assert run(flap, model, ids, mode, compensate=False).compensate is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-llama-gqa", "tiny-bloom"])
def test_flap_bias_compensation_keeps_output_at_mean(name, tmp_path):
    model, ids = load_model(name), windows()
    a = arch(model)
    _, xs = flap_reference(model, ids, "q-head")
    before = {}
    for i, layer in enumerate(a["layers"](model)):
        for kind, mod in (("heads", a["o"]), ("channels", a["down"])):
            lin = layer.get_submodule(mod)
            mean = xs[(i, kind)].mean(0)
            b = lin.bias.detach().double() if lin.bias is not None else 0
            before[(i, kind)] = (lin.weight.detach().double() @ mean + b, mean)
    scoring = run(flap, model, ids)
    # layer scope: every layer loses heads AND channels, so every projection is compensated
    selection = select(model, scoring.scores, 0.3, scope="layer")
    plan = selection.plan
    apply_plan(model, plan)
    scoring.compensate(model, plan)
    _, _, hd = dims(model)
    n_comp = 0
    for i, layer in enumerate(a["layers"](model)):
        lp = plan.layers[i]
        for kind, mod in (("heads", a["o"]), ("channels", a["down"])):
            lin = layer.get_submodule(mod)
            kept = torch.tensor(lp.channels) if kind == "channels" else \
                (torch.tensor(lp.heads)[:, None] * hd + torch.arange(hd)).reshape(-1)
            want, mean = before[(i, kind)]
            assert lin.bias is not None
            got = lin.weight.detach().double() @ mean[kept] + lin.bias.detach().double()
            err = (got - want).abs().max() / want.abs().max()
            assert err <= TOL, (i, kind, err)
            n_comp += 1
    assert scoring.info["compensated_modules"] == n_comp
    # the created biases survive save -> load_pruned
    with torch.no_grad():
        logits = model(ids[:2]).logits
    save_pruned(model, None, plan, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids[:2]).logits, logits, atol=1e-5)


def test_flap_uncompensated_leaves_no_bias(models):
    model, ids = load_model("tiny-llama"), windows()
    scoring = run(flap, model, ids, compensate=False)
    apply_plan(model, select(model, scoring.scores, 0.3, scope="layer").plan)
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
               for layer in model.model.layers)


# ------------------------------------------------------------------ llm-pruner
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


@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("importance", ["element1", "element2", "vector"])
def test_llm_pruner_matches_autograd(models, name, mode, importance):
    model, ids = models(name), windows(n=4, length=24)
    want = taylor_reference(model, ids, mode, importance, "sum")
    close(run(llm_pruner, model, ids, mode, importance=importance).scores, want)


@pytest.mark.parametrize("aggregation", ["mean", "max", "prod"])
def test_llm_pruner_aggregations(models, aggregation):
    for name in ("tiny-llama", "tiny-opt"):
        model, ids = models(name), windows(n=4, length=24)
        want = taylor_reference(model, ids, "q-head", "element1", aggregation)
        close(run(llm_pruner, model, ids, importance="element1", aggregation=aggregation).scores, want)


def test_llm_pruner_batching_and_cleanup(models):
    model, ids = models("tiny-llama"), windows(n=4, length=24)
    model.model.embed_tokens.weight.requires_grad_(False)
    try:
        one = run(llm_pruner, model, ids).scores
        two = run(llm_pruner, model, ids, batch_size=2).scores
        close(two, one)
        assert all(p.grad is None for p in model.parameters())
        assert not model.model.embed_tokens.weight.requires_grad
        assert all(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" not in n)
    finally:
        model.model.embed_tokens.weight.requires_grad_(True)


def test_llm_pruner_default_layers_match_reference():
    # LLM-Pruner prunes blocks 4..29 of LLaMA-7B's 32 (block_*_layer_start 4, end 30)
    assert parse_layer_range(llm_pruner.SELECTION["layers"], 32) == list(range(4, 30))


# ------------------------------------------------------------------ CLI and records
@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "llm-pruner"])
def test_cli_prune_records_scoring_phase(method, tmp_path):
    from suite.cli import main

    out = tmp_path / method
    rc = main(["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.2", "--out", str(out),
               "--nsamples", "4", "--seqlen", "32", "--quiet"])
    assert rc == 0
    record = json.loads((out / "pruning.json").read_text())
    score = record["phases"]["score"]
    assert score["seconds"] >= 0 and score["peak_mb"] > 0
    if method != "magnitude":
        assert record["calibration"] == {"corpus": "c4", "nsamples": 4, "seqlen": 32}
    load_pruned(out)  # reloads (FLAP: with its created biases)


def test_magnitude_old_spelling_prunes_as_members_all_and_records_members():
    """`weights=group` (the old spelling) and `members=all` keep the same heads and channels through
    `suite.pipeline.prune`; the outcome's options (the record's `options`) name `members` only."""
    from suite.pipeline import prune

    outcomes = {}
    for spelling in ({"weights": "group"}, {"members": "all"}, {"weights": "output"}, {}):
        model = load_model("tiny-llama-gqa")
        outcomes[str(spelling)] = prune(model, None, "magnitude", 0.3, options=spelling)
    old, new = outcomes["{'weights': 'group'}"], outcomes["{'members': 'all'}"]
    assert old.selection.plan.to_json() == new.selection.plan.to_json()
    assert old.options == new.options == {"norm": "l2", "members": "all"}
    assert outcomes["{'weights': 'output'}"].options == outcomes["{}"].options == {"norm": "l2", "members": "output"}
    assert outcomes["{}"].selection.plan.to_json() != new.selection.plan.to_json()  # the option does change the plan


def test_a_grid_accepts_magnitude_old_spelling(tmp_path):
    from suite.config import load_config

    path = tmp_path / "grid.yaml"
    path.write_text("name: t\nmodels: [tiny-llama]\nmethods: [{name: magnitude, options: {weights: group}}]\n"
                    "ratios: [0.2]\n")
    assert load_config(path)["methods"][0]["options"] == {"weights": "group"}


def test_prune_cli_takes_magnitude_old_spelling_and_refuses_both(tmp_path, capsys):
    import json

    from suite.cli import main

    out = {}
    for name, opts in (("old", ["--opt", "weights=group"]), ("new", ["--opt", "members=all"])):
        out[name] = tmp_path / name
        assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.3", "--out",
                     str(out[name]), "--quiet", *opts]) == 0
    plans = [json.loads((out[name] / "plan.json").read_text()) for name in ("old", "new")]
    assert plans[0] == plans[1]
    capsys.readouterr()
    assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.3", "--out",
                 str(tmp_path / "both"), "--opt", "weights=group", "--opt", "members=all"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: magnitude options: give members=output|all") and err.count("\n") == 1
    assert not (tmp_path / "both").exists()
