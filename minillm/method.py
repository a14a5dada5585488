"""`minillm`: MINI-LLM (Cheng, Zhang, Shi 2024, arXiv 2407.11681), Algorithm 1 — feature-map-sensitivity
(FMS) pruning of heads and channels with gradients estimated from forward passes only.

  1. ĝ = ∂L/∂W of the causal-LM calibration loss w.r.t. the prunable weights by two-sided SPSA as in
     MeZO (`SPSAGradient`, `minillm.zo`: in place, seed-regenerated, q directions, layer by layer);
  2. per weight, FMS S = |W · ĝ · X|, X the input-activation statistic of the weight's input channel
     over the calibration tokens (Wanda's ‖X_j‖₂ by default; `fms_scores`);
  3. per group (a head's q/k/v rows and o_proj columns, a channel's gate/up rows and down_proj
     column, the OPT/BLOOM equivalents of `architectures.py`) aggregate S (sum); per layer keep the
     top 1 − p groups (the shared `select`). ĝ is rebuilt one Linear at a time from the (seed, c)
     pairs and reduced to group scores at once: no `.grad`, no weight copy.
Scores are per parameter of the group (`normalize=param`), monotone within a layer and kind.

This project's variants (off by default; `minillm/variants/`, each with its options and refusals):
`gradient=none|noise|backprop` (controls.py), `space=mask` (gate_space.py), `space=layer`
(allocation.py), `normalize=standard|unit` (normalization.py); `compensate=true` is FLAP's bias
compensation (`suite/pruning/compensation.py`). An option set where nothing reads it is refused.

The paper's unknowns are options (`Options`, below); calibration: C4, 16 × 128 tokens (the paper
follows LLM-Pruner's few samples; ZO costs 2q forwards of the batch). Selection: scope `layer`
(Algorithm 1 prunes every layer alike; `--scope global` ranks all layers together), layer range
`all` (the paper's skipped layers are unknown: `--layers`). Memory: every loss is computed layer by
layer (`lm_loss.LayerwiseLoss`): one layer resident plus (2q + 1) × nsamples × seqlen × hidden of hidden
states, on the device or the host (`--hidden-on cpu`, or `--opt hidden_on=cpu`, its per-method
spelling); same losses as whole-model SPSA (tests/test_minillm.py; results/notes/minillm-layerwise.md).
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from minillm import zo

from suite.pruning import loss as lm_loss
from suite.pruning.activations import input_stats
from suite.pruning.compensation import bias_compensator, saved_projections
from suite.pruning.errors import UserError
from suite.pruning.layerwise import hidden_device, hidden_on, resident_sets
from suite.pruning.options import Bool, Float, Int, MethodOptions, parse
from suite.pruning.scoring import Scoring, group_tensor
from minillm.variants import allocation, controls, gate_space, normalization

NAME = "minillm"
CALIBRATION = {"corpus": "c4", "nsamples": 16, "seqlen": 128,
               "source": "MINI-LLM follows LLM-Pruner's few-sample calibration; C4 as Wanda/FLAP here"}
SELECTION = {"scope": "layer", "layers": "all"}


class PaperOptions(MethodOptions):
    space: Literal["weight", "mask", "layer"] = "weight"  # weight: the paper; mask, layer: variants/
    eps: Annotated[Float, Field(gt=0)] = 1e-3  # SPSA step for weights (MeZO's; far above fp32 loss noise)
    directions: Annotated[Int, Field(ge=1)] = 16  # q (not in the paper); 2q forwards; cosine ≈ √(q/d) anyway
    perturb: Literal["prunable", "all"] = "prunable"  # the weights FMS scores, or every parameter (whole-model)
    restore: Literal["auto", "checkpoint", "arithmetic"] = "auto"  # zo.py: exact copy | source file | drift
    seed: Int = -1  # the SPSA direction seed; -1: the run's --seed
    activation: Literal["l2", "mean_abs", "std"] = "l2"  # X: Wanda's ‖X_j‖₂ (the paper's), mean |x|, std
    aggregate: Literal["sum", "mean", "max"] = "sum"  # over a group's S (the paper: sum, as LLM-Pruner)
    abs: Literal["element", "group"] = "element"  # |·| per weight before aggregating, or |Σ| of the group
    members: Literal["all", "output"] = "all"  # all of the group's weights (paper) | out-projection columns
    compensate: Bool = False  # FLAP's bias compensation after slicing (suite/pruning/compensation.py)
    batch_size: Annotated[Int, Field(ge=1)] = 4  # windows per layer forward (speed; memory barely)
    hidden_on: Literal["device", "cpu"] = "device"  # cpu: as --hidden-on cpu, for this method's passes

    @model_validator(mode="after")
    def _abs_is_not_read_by_max(self):
        if self.abs == "group" and self.aggregate == "max":
            raise UserError("minillm option abs=group takes |sum| of a group's signed products; with aggregate=max "
                            "a group scores its largest |product| and abs would be ignored")
        return self


class Options(normalization.NormalizationOptions, allocation.AllocationOptions, gate_space.MaskOptions,
              gate_space.GateOptions, controls.ControlOptions, PaperOptions):
    """Every option of `minillm`; each variant's validator refuses what it would ignore (one line)."""


OPTIONS = Options.defaults()


# --------------------------------------------------------------------------- 1. the SPSA gradient
def member_weights(model, group_sets, output_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every Linear holding a group member (or only out-projections), once each."""
    names, out, seen = {id(p): n for n, p in model.named_parameters()}, [], set()
    for gs in group_sets:
        for m in ((gs.output,) if output_only else gs.members):
            w = gs.linear(m).weight
            if id(w) not in seen:
                seen.add(id(w))
                out.append((names[id(w)], w))
    return out


class SPSAGradient:
    """ĝ of `members` [(name, weight)] by two-sided SPSA (MeZO), layer by layer with the resident
    layer's perturbed weights copied back (`restore=auto`; zo.py's docstring for the others);
    `perturb=all` perturbs every parameter with whole-model forwards. `of(name)` -> ĝ like W."""

    def __init__(self, model, windows, members, options, seed):
        self.info, t0 = {"gradient": "zo"}, time.perf_counter()
        o, bars = options, zo.progress_bar("zo weight")
        if o["perturb"] == "all":
            members = list(model.named_parameters())
            snapshot = zo.Snapshot([t for _, t in members]) if o["restore"] == "auto" else None
            try:
                est = zo.spsa(lambda: lm_loss.calibration_loss(model, windows, o["batch_size"]), members, o["eps"],
                              o["directions"], seed, stream=0, progress=bars)
            finally:
                restored = snapshot.restore([t for _, t in members]) if snapshot is not None else 0
            self.info.update(est.summary(), forwards=2 * est.q, perturbed="all", layerwise=False)
            if snapshot is not None:
                self.info.update(restore="snapshot", restored=restored, tensors=len(members),
                                 drift_bound=max(est.drift_bound), scratch_mb=round(snapshot.bytes / 2**20, 1))
        else:
            runner = lm_loss.LayerwiseLoss(model, windows, o["batch_size"])
            est = zo.spsa_layerwise(runner, members, zo.parameter_layers(runner.lp, [w for _, w in members]),
                                    o["eps"], o["directions"], seed, exact=o["restore"] == "auto", progress=bars)
            self.info.update(est.summary(), forwards=2 * est.q, perturbed="prunable", layerwise=True,
                             full_forward_equivalents=round(runner.layer_forwards / runner.depth, 1))
            if o["restore"] == "auto":
                self.info.update(restore="layer-copy", restored=len(members), tensors=len(members),
                                 drift_bound=0.0, copy_mb=round(est.copy_bytes / 2**20, 1))
            del runner
        if o["restore"] == "checkpoint":
            self.info.update(zo.restore_from_checkpoint(model, members, est.drift_bound))
        elif o["restore"] == "arithmetic":
            self.info.update(restore="arithmetic", drift_bound=max(est.drift_bound))
        self.info["zo_seconds"] = round(time.perf_counter() - t0, 2)
        self.estimate, self._index = est, {n: i for i, n in enumerate(est.names)}

    def of(self, name: str) -> torch.Tensor:
        return self.estimate.gradient(self._index[name])


def weight_gradient(model, windows, group_sets, kind: str, options: dict, seed: int):
    """ĝ of the weights FMS scores: kind "zo" (the paper's SPSA) or a control (variants/controls.py)."""
    members = member_weights(model, group_sets, output_only=options["members"] == "output")
    return (SPSAGradient if kind == "zo" else controls.GRADIENTS[kind])(model, windows, members, options, seed)




# --------------------------------------------------------------------------- 2-3. FMS and aggregation
def activation_statistic(st, activation: str) -> torch.Tensor:
    """‖X_j‖₂ (l2, Wanda), mean |x_j| (mean_abs) or the standard deviation of x_j (std: its fluctuation)."""
    return st.var.clamp(min=0).sqrt() if activation == "std" else getattr(st, activation)


def fms_scores(model, group_sets, stats, gradient_of, activation="l2", aggregate="sum", abs_mode="element",
               members="all", units: dict | None = None):
    """Per group: aggregate over its members' weights of S = |W · ĝ · X| (X: input-channel statistic).

    `gradient_of(param_name)` gives ĝ for that Linear (None: ĝ ≡ 1). Row members (q/k/v, gate/up,
    fc1, …) own rows [g·w, (g+1)·w) of W; column members (o_proj, down_proj, …) own columns; X is
    always indexed by W's input feature. Bias entries are not scored (the paper scores weights).
    `members="output"` keeps only the out-projection columns (the consumer of the group's feature
    map, as Wanda-sp/FLAP score); the paper's FMS sums over all of the group's weights.
    If `units` is a dict it also receives, per (layer, kind), the [count, width] sums per feature-map
    unit (a head's head_dim dimensions: q row u and o column u are unit u; a channel is one unit).
    """
    modules = {id(m): n for n, m in model.named_modules()}  # by module: offloaded weights get new Parameters
    scores = {}
    for gs in resident_sets(group_sets):  # offloaded layers: weights read on the device (layerwise.py)
        total = torch.zeros(gs.count, dtype=torch.float64)
        unit = torch.zeros(gs.count, gs.output.width, dtype=torch.float64)
        elements = 0
        for m in (gs.members if members == "all" else (gs.output,)):
            lin = gs.linear(m)
            w = lin.weight
            x = activation_statistic(stats[(gs.layer, m.name)], activation).to(device=w.device, dtype=torch.float32)
            s = w.detach().float() * x.unsqueeze(0)
            g = gradient_of(f"{modules[id(lin)]}.weight")
            if g is not None:
                s.mul_(g.to(s.device))
                del g
            blocks = group_tensor(s, gs, m)  # [count, width, other]
            if abs_mode == "element":
                blocks = blocks.abs()
            if aggregate == "max":
                total = torch.maximum(total, blocks.abs().amax(dim=(1, 2)).double().cpu())
            else:
                total += blocks.sum(dim=(1, 2)).double().cpu()
            per = blocks.sum(dim=2).double().cpu()  # [count, width of this member]
            unit += per if per.shape[1] == unit.shape[1] else per.sum(1, keepdim=True) / unit.shape[1]
            elements += blocks.shape[1] * blocks.shape[2]
            del s, blocks
        if abs_mode == "group" and aggregate != "max":
            total = total.abs()
        if aggregate == "mean":
            total = total / elements
        scores[(gs.layer, gs.kind)] = total.float()
        if units is not None:
            units[(gs.layer, gs.kind)] = unit.abs() if abs_mode == "group" else unit
    return scores


def fms(model, windows, group_sets, options, seed, kind, stats, units=None):
    """FMS group scores with gradient `kind` (zo | none | noise | backprop) and the gradient's info."""
    grad = weight_gradient(model, windows, group_sets, kind, options, seed)
    scores = fms_scores(model, group_sets, stats, grad.of, options["activation"], options["aggregate"],
                        options["abs"], options["members"], units=units)
    return scores, grad.info


# --------------------------------------------------------------------------- the contract
def score(model, windows, group_sets, options, seed) -> Scoring:
    """Algorithm 1 (or the variant the options name): `Scoring.scores[(layer, kind)]`, float32 [count],
    higher = more important; `windows` [nsamples, seqlen] token ids. UserError: refused options, no windows."""
    o = parse(Options, NAME, options, scope="checked")  # the scope-dependent checks ran with the pipeline's scope
    if windows is None:
        raise UserError("minillm needs calibration windows")
    seed = o["seed"] if o["seed"] >= 0 else int(seed)
    hidden = "cpu" if o["hidden_on"] == "cpu" else hidden_device()  # one knob: layerwise.hidden_on
    kinds = controls.gradient_kinds(o)  # the gradient of the FMS part (None: no FMS) and of the gates
    info = {"space": o["space"], "gradient": o["gradient"], "seed": seed, "hidden_on": str(hidden or "device")}
    t0 = time.perf_counter()
    with hidden_on(hidden):
        # statistics first, on the unperturbed model (one layer-by-layer pass over the calibration windows)
        needs_stats = kinds["fms"] is not None or o["compensate"]
        stats = input_stats(model, windows, group_sets, batch_size=o["batch_size"]) if needs_stats else None
        scores, units = {}, {}  # units: FMS per feature-map unit, for normalize=unit
        if o["space"] == "mask":  # variants/gate_space.py: |ĝ| of one gate per group
            scores, info["mask"] = gate_space.mask_scores(model, windows, group_sets, o, seed)
        elif o["space"] == "layer":  # variants/allocation.py: per-layer ratios, FMS inside each layer
            info.update(allocation.allocate(model, windows, group_sets, o, seed))
        rest = [gs for gs in group_sets if (gs.layer, gs.kind) not in scores]
        if rest:  # the paper's FMS (all groups in the weight space)
            more, part = fms(model, windows, rest, o, seed, kinds["fms"], stats, units)
            scores.update(more)
            info["weight" if o["space"] == "weight" else "fms"] = part
    if o["normalize"] == "param":  # sensitivity per removed parameter (the default)
        size = {(gs.layer, gs.kind): gs.params_per_group() for gs in group_sets}
        scores = {key: value / size[key] for key, value in scores.items()}
    else:
        scores = normalization.normalized(scores, units, group_sets, o["normalize"])
    compensate = bias_compensator(saved_projections(model, group_sets, stats), info, NAME) if o["compensate"] else None
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return Scoring(scores, compensate, info)
