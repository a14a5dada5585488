"""How good is the forward-only gradient? Compare the SPSA estimate with the true (backprop) gradient.

On one calibration batch, for each requested space and number of directions q:
  - cosine(ĝ_q, g) over the whole estimated vector (the prunable weights, or the gates);
  - per-layer Spearman correlation of the GROUP SCORES built from ĝ_q with those built from g, and
    with Wanda-sp's scores (|W|·‖X‖₂ over the out-projection columns, summed per group), averaged
    over layers, separately for heads and channels;
  - q-independent references: Spearman(scores from g, Wanda-sp), and for the weight space
    Spearman(FMS with ĝ ≡ 1, FMS with g) — what a perfect estimate would add over no gradient.
The q values share one SPSA run: the estimate for q is the prefix of the first q directions of the
largest q (same seeds), so the rows differ only by the number of directions.

Spaces: `weight` (FMS = |W·ĝ·X| per group, the paper), `mask` (|ĝ| of one gate per group; all
layers at once, or block-wise with `blockwise=true`), `layer` (one gate per sub-block; Spearman over
the per-layer sensitivities). The diagnosis keeps one copy of the true gradient and of the weights
(to measure the in-place drift exactly): it is a diagnostic, not the memory-frugal method.
"""
from __future__ import annotations

import math
import time
import warnings

import pydantic
import torch
from scipy import stats

from minillm import zo

from suite.pruning import loss as lm_loss
from suite.pruning.activations import input_stats
from suite.pruning.gates import gated
from minillm.method import NAME, OPTIONS, Options, fms_scores, member_weights
from suite.pruning.options import MethodOptions, parse
from minillm.variants.controls import GradFlags


def _gate_estimator(o, eps, qs, seed):
    """make(loss_fn, named, stream) -> estimate; and the row keys (q values, or "coordinate")."""
    if o["estimator"] == "coordinate":
        return (lambda loss_fn, named, stream=0: zo.coordinate(loss_fn, named, eps)), ["coordinate"]
    return (lambda loss_fn, named, stream=0: zo.spsa(loss_fn, named, eps, max(qs), seed, stream=stream)), \
        sorted(set(qs))


def _n_forwards(est) -> int:
    return est.forwards if isinstance(est, zo.CoordinateEstimate) else 2 * est.q

SPACES = ("weight", "mask", "layer")

# minillm's option fields without its validators: the diagnosis runs every space on one set of options
_Fields = pydantic.create_model("DiagnoseOptions", __base__=MethodOptions,
                                **{name: (field.annotation, field) for name, field in Options.model_fields.items()})


# --------------------------------------------------------------------------- statistics
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation, ties averaged (scipy.stats.spearmanr); NaN when either side is
    constant or has fewer than two values."""
    a, b = a.double().flatten().cpu().numpy(), b.double().flatten().cpu().numpy()
    if len(a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # the NaN says it
        return float(stats.spearmanr(a, b).statistic)


def _mean(values) -> float | None:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else None


def per_layer_spearman(a: dict, b: dict) -> dict:
    """Mean over layers of Spearman(a[(l, kind)], b[(l, kind)]) for heads, channels and both."""
    out = {}
    for kind in ("heads", "channels"):
        keys = [k for k in a if k[1] == kind and k in b]
        out[kind] = _mean([spearman(a[k], b[k]) for k in keys])
    out["all"] = _mean([v for v in (out["heads"], out["channels"]) if v is not None])
    return out


def _round(x, n=6):
    """Floats to n significant digits (NaN -> None) for the JSON record."""
    if isinstance(x, dict):
        return {k: _round(v, n) for k, v in x.items()}
    if isinstance(x, float):
        return float(f"{x:.{n}g}") if x == x else None
    return x


# --------------------------------------------------------------------------- reference scores
def wanda_sp_scores(group_sets, stats) -> dict:
    """Wanda-sp: Σ over the group's out-projection columns of |W|·‖X‖₂ (the structured Wanda)."""
    out = {}
    for gs in group_sets:
        m = gs.output
        w = gs.linear(m).weight.detach().float()
        x = stats[(gs.layer, m.name)].l2.to(w.device, torch.float32)
        s = (w.abs() * x.unsqueeze(0)).t().reshape(gs.count, m.width, w.shape[0])
        out[(gs.layer, gs.kind)] = s.sum(dim=(1, 2)).double().cpu().float()
    return out


def _stack(scores: dict, sets) -> torch.Tensor:
    return torch.cat([scores[(gs.layer, gs.kind)].double().flatten() for gs in sets])


# --------------------------------------------------------------------------- spaces
def diagnose_weight(model, windows, group_sets, qs, eps, o, seed, stats):
    members = member_weights(model, group_sets, output_only=o["members"] == "output")
    bs = o["batch_size"]
    t0 = time.perf_counter()
    with GradFlags(model, [w for _, w in members]):
        loss = lm_loss.backprop_loss(model, windows, bs)
        true = {n: w.grad.detach().float().clone() for n, w in members}
    t_bp = time.perf_counter() - t0
    kw = dict(activation=o["activation"], aggregate=o["aggregate"], abs_mode=o["abs"], members=o["members"])
    fms_true = fms_scores(model, group_sets, stats, true.get, **kw)
    fms_none = fms_scores(model, group_sets, stats, lambda n: None, **kw)
    wanda = wanda_sp_scores(group_sets, stats)
    original = [w.detach().clone() for _, w in members]
    t0 = time.perf_counter()
    est = zo.spsa(lambda: lm_loss.calibration_loss(model, windows, bs), members, eps, max(qs), seed)
    t_zo = time.perf_counter() - t0
    drift = max(float((w.detach() - w0).abs().max()) for (_, w), w0 in zip(members, original))
    with torch.no_grad():
        for (_, w), w0 in zip(members, original):
            w.copy_(w0)
    del original
    index = {n: i for i, n in enumerate(est.names)}
    g_norm2 = sum(float(g.double().pow(2).sum()) for g in true.values())
    rows = {}
    for q in sorted(set(qs)):
        acc = {"dot": 0.0, "n2": 0.0}

        def grad_of(name, q=q, acc=acc):
            ghat = est.gradient(index[name], q)
            acc["dot"] += float((ghat.double() * true[name].double()).sum())
            acc["n2"] += float(ghat.double().pow(2).sum())
            return ghat

        fms_zo = fms_scores(model, group_sets, stats, grad_of, **kw)
        rows[q] = {
            "cosine": acc["dot"] / math.sqrt(acc["n2"] * g_norm2) if acc["n2"] * g_norm2 > 0 else float("nan"),
            "spearman_vs_true": per_layer_spearman(fms_zo, fms_true),
            "spearman_vs_wanda_sp": per_layer_spearman(fms_zo, wanda),
            "spearman_vs_no_gradient": per_layer_spearman(fms_zo, fms_none),
        }
    return {
        "eps": eps, "dims": sum(w.numel() for _, w in members), "loss": loss,
        "reference": {
            "true_vs_wanda_sp": per_layer_spearman(fms_true, wanda),
            "no_gradient_vs_true": per_layer_spearman(fms_none, fms_true),
            "no_gradient_vs_wanda_sp": per_layer_spearman(fms_none, wanda),
        },
        "drift": {"measured": drift, "bound": max(est.drift_bound)},
        "seconds": {"backprop": round(t_bp, 2), "zo": round(t_zo, 2)},
        "forwards": 2 * est.q,
        "q": rows,
    }


def _true_gate_grads(model, windows, sets, bs, scalar=False):
    device = next(model.parameters()).device
    if scalar:
        leaves = [torch.ones(1, device=device, requires_grad=True) for _ in sets]
        gates = [s.expand(gs.count) for s, gs in zip(leaves, sets)]
    else:
        leaves = gates = [torch.ones(gs.count, device=device, requires_grad=True) for gs in sets]
    with GradFlags(model, []), gated(sets, gates):
        loss = lm_loss.backprop_loss(model, windows, bs)
    return [g.grad.detach().float().clone() for g in leaves], loss


def diagnose_mask(model, windows, group_sets, qs, eps, o, seed, stats):
    sets = group_sets if o["mask_groups"] == "all" else [gs for gs in group_sets if gs.kind == "heads"]
    bs = o["batch_size"]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    true, loss = _true_gate_grads(model, windows, sets, bs)
    t_bp = time.perf_counter() - t0
    true_abs = {(gs.layer, gs.kind): g.abs().cpu() for gs, g in zip(sets, true)}
    wanda = wanda_sp_scores(sets, stats)
    make, keys = _gate_estimator(o, eps, qs, seed)
    t0 = time.perf_counter()
    estimates = []  # (sets covered, Estimate)
    forwards = 0.0
    if o["blockwise"]:  # one estimate per layer from its inputs on the layer-by-layer pass
        runner = lm_loss.LayerwiseLoss(model, windows, bs)
        gates = [torch.ones(gs.count, device=device) for gs in sets]
        named = [(f"{gs.layer}.{gs.kind}", g) for gs, g in zip(sets, gates)]
        layers = [gs.layer for gs in sets]
        with gated(sets, gates):
            if o["estimator"] == "coordinate":
                est = zo.coordinate_layerwise(runner, named, layers, eps, streams=2 * max(qs))
                parts = [([i for i, gs in enumerate(sets) if gs.layer == layer], est) for layer in sorted(set(layers))]
            else:
                parts = zo.blockwise_layerwise(runner, named, layers, eps, max(qs), seed)
        for idx, est in parts:
            if o["estimator"] == "coordinate":  # per layer: that layer's rows of the one estimate
                est = zo.CoordinateEstimate([est.names[i] for i in idx], [est.grads[i] for i in idx], est.eps, 0)
            estimates.append(([sets[i] for i in idx], est))
        forwards = runner.layer_forwards / runner.depth
        del runner
    else:
        gates = [torch.ones(gs.count, device=device) for gs in sets]
        with gated(sets, gates):
            est = make(lambda: lm_loss.calibration_loss(model, windows, bs),
                       [(f"{gs.layer}.{gs.kind}", g) for gs, g in zip(sets, gates)])
        estimates.append((sets, est))
        forwards = _n_forwards(est)
    t_zo = time.perf_counter() - t0
    g_vec = _stack({(gs.layer, gs.kind): g for gs, g in zip(sets, true)}, sets)
    rows = {}
    for q in keys:
        ghat, layer_cos = {}, []
        for part, est in estimates:
            for j, gs in enumerate(part):
                ghat[(gs.layer, gs.kind)] = est.gradient(j, q).cpu()
            if o["blockwise"]:
                a = _stack(ghat, part)
                b = _stack({(gs.layer, gs.kind): true[sets.index(gs)] for gs in part}, part)
                layer_cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        h_vec = _stack(ghat, sets)
        absd = {k: v.abs() for k, v in ghat.items()}
        rows[q] = {
            "cosine": float(torch.nn.functional.cosine_similarity(h_vec, g_vec.cpu(), dim=0)),
            "spearman_vs_true": per_layer_spearman(absd, true_abs),
            "spearman_vs_wanda_sp": per_layer_spearman(absd, wanda),
        }
        if layer_cos:
            rows[q]["cosine_per_layer_mean"] = _mean(layer_cos)
    return {
        "eps": eps, "dims": sum(gs.count for gs in sets), "loss": loss, "estimator": o["estimator"],
        "blockwise": bool(o["blockwise"]), "mask_groups": o["mask_groups"],
        "reference": {"true_vs_wanda_sp": per_layer_spearman(true_abs, wanda)},
        "seconds": {"backprop": round(t_bp, 2), "zo": round(t_zo, 2)},
        "forwards": round(forwards, 1),
        "q": rows,
    }


def diagnose_layer(model, windows, group_sets, qs, eps, o, seed, stats):
    bs = o["batch_size"]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    true, loss = _true_gate_grads(model, windows, group_sets, bs, scalar=True)
    t_bp = time.perf_counter() - t0
    scalars = [torch.ones(1, device=device) for _ in group_sets]
    make, keys = _gate_estimator(o, eps, qs, seed)
    t0 = time.perf_counter()
    with gated(group_sets, [s.expand(gs.count) for s, gs in zip(scalars, group_sets)]):
        est = make(lambda: lm_loss.calibration_loss(model, windows, bs),
                   [(f"{gs.layer}.{gs.kind}", s) for gs, s in zip(group_sets, scalars)], 1 << 20)
    t_zo = time.perf_counter() - t0
    g_vec = torch.cat([g.double().cpu() for g in true])

    def per_layer(vec):
        out = {}
        for gs, v in zip(group_sets, vec.tolist()):
            out[gs.layer] = out.get(gs.layer, 0.0) + abs(v)
        return torch.tensor([out[i] for i in sorted(out)])

    rows = {}
    for q in keys:
        h_vec = torch.cat([est.gradient(j, q).double().cpu() for j in range(len(group_sets))])
        rows[q] = {
            "cosine": float(torch.nn.functional.cosine_similarity(h_vec, g_vec, dim=0)),
            "spearman_abs": spearman(h_vec.abs(), g_vec.abs()),
            "spearman_layer_sensitivity": spearman(per_layer(h_vec), per_layer(g_vec)),
        }
    return {"eps": eps, "dims": len(group_sets), "loss": loss, "estimator": o["estimator"],
            "true_layer_sensitivity": [round(v, 6) for v in per_layer(g_vec).tolist()],
            "seconds": {"backprop": round(t_bp, 2), "zo": round(t_zo, 2)}, "forwards": _n_forwards(est), "q": rows}


RUNNERS = {"weight": diagnose_weight, "mask": diagnose_mask, "layer": diagnose_layer}


def diagnose(model, windows, group_sets, spaces, qs, eps: dict | None = None, options: dict | None = None,
             seed: int = 0) -> dict:
    """Run the requested spaces; returns {space: record}. `eps` maps space -> ε (defaults: OPTIONS)."""
    o = {**OPTIONS, **(options or {})}
    if o["estimator"] == "coordinate" and "weight" in spaces:
        from suite.pruning.errors import UserError

        raise UserError("estimator=coordinate applies to the mask and layer spaces only; drop 'weight' from --space")
    o = parse(_Fields, NAME, o)  # each option's type, choices and range (the spaces' combination rules do not apply)
    stats = input_stats(model, windows, group_sets, batch_size=o["batch_size"])
    out = {}
    for space in spaces:
        e = (eps or {}).get(space) or (o["eps"] if space == "weight" else o["gate_eps"])
        t0 = time.perf_counter()
        out[space] = _round(RUNNERS[space](model, windows, group_sets, list(qs), float(e), o, seed, stats), 6)
        out[space]["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return out
