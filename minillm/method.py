"""`minillm`: MINI-LLM (Cheng, Zhang, Shi 2024, arXiv 2407.11681) — feature-map-sensitivity (FMS)
pruning of heads and channels with gradients estimated from forward passes only.

The paper (Algorithm 1), `space=weight`, the default and the faithful reproduction:
  1. estimate ĝ = ∂L/∂W of the causal-LM calibration loss w.r.t. the prunable weights by two-sided
     SPSA as in MeZO (`minillm.zo`: in place, seed-regenerated, q directions);
  2. per weight, FMS S = |W · ĝ · X| with X the input-activation statistic of that weight's input
     channel over the calibration tokens (Wanda's ‖X_j‖₂ by default);
  3. per group (a head's q/k/v rows and o_proj columns; a channel's gate/up rows and down_proj
     column; the OPT/BLOOM equivalents from `architectures.py`) aggregate S, and per layer keep
     the top 1 − p groups (shared `select`). ĝ is rebuilt one Linear at a time from the (seed, c)
     pairs and reduced to group scores at once: no `.grad`, no weight copy.

This project's additions (not in the paper), each an option, all off by default (an option set to a
non-default value where no code path reads it is refused by `check_options` / `check_scope`):
  - `space=mask`: the gradient w.r.t. one multiplicative gate per group (head output / channel,
    `minillm.gates`), estimated by the same forward-only SPSA over the gate vector; score =
    |ĝ_gate|, which *is* the feature-map sensitivity (first-order loss change when the group's
    feature map is scaled). `blockwise=true` perturbs one layer's gates at a time, running only
    layers ≥ i from layer i's unperturbed inputs on the layer-by-layer pass
    (`zo.blockwise_layerwise`): d drops from ~46k to one layer's groups. `mask_groups=heads`
    scores heads this way and channels by FMS.
  - `space=layer`: forward-only sensitivities of one gate per sub-block (each layer's attention
    output and MLP output, d = 2·layers) allocate per-layer pruning ratios p_i ∝ w_i
    (`info["layer_weights"]`, rank-linear in [1 − λ, 1 + λ], least sensitive pruned most); FMS ranks
    the groups inside each layer.
  - `estimator=coordinate` (gate spaces only): central differences per gate instead of SPSA —
    forward-only, exact up to O(ε²), 2 forwards per gate; better than SPSA once q ≳ d/2.
  - `gradient=none` (ĝ ≡ 1: FMS without gradient, the ablation of what the estimate adds),
    `gradient=noise` (ĝ ~ N(0, I) per weight, seeded, no forward pass: the control for whether a
    weight-space estimate carries gradient information — for any SPSA coefficients, ĝ has the
    same i.i.d. Gaussian shape per weight, so an estimate that is only noise scores like this) and
    `gradient=backprop` (the true gradient by autograd: the upper-bound reference, with backprop's
    memory). `fms_gradient` chooses the gradient of the FMS part of the mask/layer spaces.
  - `members=output` (FMS over the out-projection columns only, the consumer of the feature map),
    `activation=std` (the feature's standard deviation: what mean-compensation leaves), `normalize`
    (per parameter, per-module z-score, or FLAP's per-unit z-score), `compensate=true` (FLAP's
    baseline bias compensation). Together with `--scope global` these make the variant
    `fmsout` recorded in results/notes/minillm.md.

The paper's unknowns are options; defaults and why:
  eps = 1e-3      MeZO's default for weights; the loss difference at 1e-3 is far above fp32 noise.
  gate_eps = 1e-2 gates are O(1) and few: a larger step keeps (L₊−L₋) well above forward noise.
  directions = 16 the paper gives no q. Cost is 2q forwards; in weight space the estimate's
                  cosine with the true gradient is ≈ √(q/d) ≈ 1e-3 for any affordable q
                  (shared/notes/zo-measurements.md, results/notes/minillm.md), so more
                  directions buy nothing measurable there.
  calibration     C4, 16 × 128 tokens: the paper follows LLM-Pruner's handful of samples (10); ZO
                  costs 2q forwards of the whole batch, so it stays small. CLI --nsamples/--seqlen.
  activation=l2   Wanda's ‖X_j‖₂ (the paper's "activation" term); `mean_abs`, `std` alternatives.
  aggregate=sum   the paper sums element sensitivities of a group (LLM-Pruner's element-wise sum);
                  `mean` and `max` are alternatives. abs=element: |·| per weight before the sum
                  (`group`: |Σ| of the signed products). members=all: every weight of the group.
  scope=layer     (a selection option: SELECTION, `--scope`, or `scope:` in a grid's method options)
                  Algorithm 1 prunes the same fraction of every layer; `global` ranks all groups of
                  all layers together. The normalisation (`normalize=param` by default: score per
                  parameter of the group) is monotone within a layer and kind, so Algorithm 1's
                  per-layer ranking is unchanged, and `--scope global` compares heads and
                  channels of all layers. The record's `selection.scope` says which ran.
  layers          all layers (SELECTION); the paper's skipped layers are unknown: use --layers.
  perturb         `prunable` (the weights FMS scores) or `all` parameters.
  forward passes  every loss is computed layer by layer (`zo.LayerwiseLoss` on `layerwise.LayerPass`):
                  the 2q perturbed copies of the model are 2q hidden-state streams, each decoder
                  layer resident once for all of them (perturbed per stream, restored before the
                  next layer); memory = one layer + (2q + 1) × nsamples × seqlen × hidden of hidden
                  states (`hidden_on=cpu` keeps them in host memory), not the whole model on the
                  device. Same seeded z and the same losses as whole-model SPSA (tests/test_minillm.py).
                  `perturb=all` (embeddings and head too) still runs whole-model forwards.
  batch_size = 4  windows per layer forward. The loss never builds the [batch, seq, vocab] logits
                  (`zo.head_loss_sum` applies the output embedding a few rows at a time) and the
                  statistics pass stops before the output embedding; above the weights the method
                  holds the carried streams (formula above) plus one micro-batch's activations
                  (results/notes/minillm-layerwise.md; before the layer-by-layer pass, whole-model
                  SPSA on SmolLM2 at q = 2 peaked at 993 MB at 4 windows, 1002 MB at 1).
  restore=auto    the resident layer's perturbed weights are copied before its streams and copied
                  back after them: bit-identical for every source and dtype (memory = one layer's
                  perturbed weights, no disk; `perturb=all`: zo.Snapshot's scratch file).
                  `checkpoint`: MeZO's in-place round trips, then read back from the model's own
                  safetensors where verifiable; `arithmetic`: the round trips' bounded drift.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

import torch

from minillm import zo
from minillm.activations import input_stats
from minillm.compensation import bias_compensator, saved_projections
from minillm.errors import UserError
from minillm.gates import gated
from minillm.layerwise import resident_sets
from minillm.scoring import Scoring, group_tensor, standardise

NAME = "minillm"
OPTIONS = {
    "space": "weight",        # weight (paper) | mask | layer
    "gradient": "zo",         # zo (paper) | none | backprop
    "fms_gradient": "same",   # gradient of the FMS part in mask/layer spaces: same | zo | none | backprop
    "eps": 1e-3,              # SPSA step for weights
    "gate_eps": 1e-2,         # SPSA step for gates (mask and layer spaces)
    "directions": 16,         # q
    "perturb": "prunable",    # prunable | all
    "activation": "l2",       # l2 | mean_abs | std
    "aggregate": "sum",       # sum | mean | max
    "abs": "element",         # element | group
    "members": "all",         # all (the group's every weight, paper) | output (only the out-projection columns)
    "estimator": "spsa",      # gate spaces: spsa (paper/MeZO) | coordinate (central differences, 2 forwards/gate)
    "blockwise": False,       # mask space: one layer's gates at a time from its unperturbed inputs
    "mask_groups": "all",     # mask space: all | heads (channels then by FMS)
    "layer_lambda": 0.3,      # layer space: weights rank-linear in [1-λ, 1+λ] (≤ 0.4 at ratio 0.5 on SmolLM2, see notes)
    "normalize": "param",     # param (per parameter) | standard (z-score per layer and kind) | unit (FLAP Eq. 5)
    "compensate": False,      # FLAP's baseline bias compensation after slicing (not in the paper)
    "restore": "auto",        # auto (scratch-file snapshot: exact) | checkpoint (source safetensors) | arithmetic
    "batch_size": 4,          # calibration windows per forward (speed; memory barely depends on it, see below)
    "hidden_on": "device",    # where the forward-only passes carry their hidden-state streams: device | cpu
    "seed": -1,               # ZO direction seed; -1: the run's --seed
}
CALIBRATION = {"corpus": "c4", "nsamples": 16, "seqlen": 128,
               "source": "MINI-LLM follows LLM-Pruner's few-sample calibration; C4 as Wanda/FLAP here"}
SELECTION = {"scope": "layer", "layers": "all"}

CHOICES = {
    "space": ("weight", "mask", "layer"),
    "gradient": ("zo", "none", "noise", "backprop"),
    "fms_gradient": ("same", "zo", "none", "noise", "backprop"),
    "perturb": ("prunable", "all"),
    "activation": ("l2", "mean_abs", "std"),
    "aggregate": ("sum", "mean", "max"),
    "abs": ("element", "group"),
    "members": ("all", "output"),
    "mask_groups": ("all", "heads"),
    "estimator": ("spsa", "coordinate"),
    "restore": ("auto", "checkpoint", "arithmetic"),
    "hidden_on": ("device", "cpu"),
    "normalize": ("param", "standard", "unit"),
}


# options read by some scoring spaces only (the variant that reads each one)
READ_IN = {"fms_gradient": ("mask", "layer"), "gate_eps": ("mask", "layer"), "estimator": ("mask", "layer"),
           "mask_groups": ("mask",), "blockwise": ("mask",), "layer_lambda": ("layer",)}


def check_options(options: dict) -> dict:
    """Choices, ranges, and the combinations that could not do what they say: one-line UserErrors."""
    for key, allowed in CHOICES.items():
        if options[key] not in allowed:
            raise UserError(f"minillm option {key}={options[key]!r}: choose one of {', '.join(allowed)}")
    if options["directions"] < 1:
        raise UserError(f"minillm option directions must be >= 1, got {options['directions']}")
    if options["eps"] <= 0 or options["gate_eps"] <= 0:
        raise UserError("minillm options eps and gate_eps must be > 0")
    if options["batch_size"] < 1:
        raise UserError("minillm option batch_size must be >= 1")
    if not 0.0 <= options["layer_lambda"] < 1.0:
        raise UserError(f"minillm option layer_lambda must be in [0, 1), got {options['layer_lambda']}")
    if options["space"] == "weight" and options["estimator"] == "coordinate":
        raise UserError("estimator=coordinate needs 2 forwards per coordinate: only for the gate spaces "
                        "(space=mask or space=layer), not for ~1e8 weights")
    if options["space"] in ("mask", "layer") and options["gradient"] in ("none", "noise"):
        raise UserError(f"gradient={options['gradient']} is a weight-space control (space=weight); in the "
                        f"{options['space']} space it would score the gates by nothing or by chance")
    # options that would be silently ignored: refused when set to anything but their default
    changed = {key for key in OPTIONS if options[key] != OPTIONS[key]}
    given = lambda key: f"{key}={str(options[key]).lower() if isinstance(options[key], bool) else options[key]}"
    for key in sorted(changed & set(READ_IN)):
        spaces = READ_IN[key]
        if options["space"] not in spaces:
            raise UserError(f"minillm option {given(key)} is read only with space="
                            f"{' or space='.join(spaces)}; with space={options['space']} it would be ignored")
    if options["space"] == "mask" and "fms_gradient" in changed and options["mask_groups"] == "all":
        raise UserError(f"minillm option {given('fms_gradient')} with space=mask needs "
                        "mask_groups=heads (channels scored by FMS); with mask_groups=all no group is scored by "
                        "FMS and it would be ignored")
    if options["blockwise"] and options["gradient"] == "backprop":
        raise UserError("minillm option blockwise=true splits the SPSA estimate layer by layer; with "
                        "gradient=backprop all gates' gradients come from one backward pass and it would be ignored")
    if options["abs"] == "group" and options["aggregate"] == "max":
        raise UserError("minillm option abs=group takes |sum| of a group's signed products; with aggregate=max "
                        "a group scores its largest |product| and abs would be ignored")
    return options


def check_scope(options: dict, scope: str | None) -> None:
    """The selection scope `scope` ("layer" | "global" | None: the default) against the options:
    `space=layer` allocates per-layer ratios (`info["layer_weights"]`), which only a per-layer
    selection reads; with `--scope global` they would be dropped. Raises UserError."""
    if options["space"] == "layer" and (scope or SELECTION["scope"]) == "global":
        raise UserError("minillm option space=layer computes per-layer pruning ratios; with --scope global "
                        "(scope: global) one ranking over all layers ignores them: use --scope layer")


def hidden_device(options: dict):
    """The LayerPass `hidden_device` of option hidden_on (None: the compute device)."""
    return "cpu" if options["hidden_on"] == "cpu" else None


def _progress(total_label: str):
    if not (sys.stderr.isatty() or os.environ.get("MINILLM_PROGRESS")):
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=total_label, mininterval=10.0, file=sys.stderr)


# --------------------------------------------------------------------------- tensors and gradients
def param_names(model) -> dict:
    return {id(p): n for n, p in model.named_parameters()}


def member_weights(model, group_sets, output_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every Linear holding a group member (or only out-projections), once each."""
    names, out, seen = param_names(model), [], set()
    for gs in group_sets:
        for m in ((gs.output,) if output_only else gs.members):
            w = gs.linear(m).weight
            if id(w) not in seen:
                seen.add(id(w))
                out.append((names[id(w)], w))
    return out


class _GradFlags:
    """Within the block only `params` require grad (others' grads would cost memory for nothing)."""

    def __init__(self, model, params):
        self.model, self.params = model, {id(p) for p in params}

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in self.params)
            p.grad = None

    def __exit__(self, *exc):
        for p, flag in self.saved:
            p.grad = None
            p.requires_grad_(flag)


class WeightGradient:
    """ĝ for the weights, one Linear at a time: `of(name)` -> tensor like W, or None for ĝ ≡ 1."""

    def __init__(self, model, windows, group_sets, kind: str, options: dict, seed: int):
        self.kind, self.info = kind, {"gradient": kind}
        self.model = model
        self._grads = {}
        self.estimate = None
        self.seed = seed
        if kind == "none":
            return
        if kind == "noise":
            self.info.update(forwards=0, noise="N(0, I) per weight, stream = (seed, Linear's name)")
            self._shapes = {n: p.shape for n, p in model.named_parameters()}
            return
        members = member_weights(model, group_sets, output_only=options["members"] == "output")
        bs = options["batch_size"]
        if kind == "backprop":
            with _GradFlags(model, [w for _, w in members]):
                loss = zo.backprop_loss(model, windows, bs)
                # keep only the grads (the flags' exit clears .grad); memory: one gradient per weight
                self._grads = {n: w.grad.detach().float() for n, w in members}
            self.info.update(loss=loss, forwards=1, backwards=1)
            return
        t0 = time.perf_counter()
        if options["perturb"] == "all":  # embeddings and head too: whole-model forwards
            est = self._spsa_whole_model(model, windows, list(model.named_parameters()), options, seed)
        else:  # the paper's prunable weights: layer by layer, one layer resident
            runner = zo.LayerwiseLoss(model, windows, bs, hidden_device=hidden_device(options))
            layers = zo.parameter_layers(runner.lp, [w for _, w in members])
            est = zo.spsa_layerwise(runner, members, layers, options["eps"], options["directions"], seed,
                                    exact=options["restore"] == "auto", progress=_progress("zo weight"))
            self.info.update(est.summary(), forwards=2 * est.q, perturbed=options["perturb"], layerwise=True,
                             full_forward_equivalents=round(runner.layer_forwards / runner.depth, 1))
            if options["restore"] == "auto":
                self.info.update(restore="layer-copy", restored=len(members), tensors=len(members),
                                 drift_bound=0.0, copy_mb=round(est.copy_bytes / 2**20, 1))
            elif options["restore"] == "checkpoint":
                self.info.update(zo.restore_from_checkpoint(model, members, est.drift_bound))
            else:
                self.info.update(restore="arithmetic", drift_bound=max(est.drift_bound))
            del runner
        self.info["zo_seconds"] = round(time.perf_counter() - t0, 2)
        self.estimate = est
        self._index = {n: i for i, n in enumerate(est.names)}

    def _spsa_whole_model(self, model, windows, named, options, seed):
        """SPSA over tensors outside the decoder layers too (`perturb=all`): whole-model losses,
        restored from a scratch-file `zo.Snapshot` (restore=auto)."""
        snapshot = zo.Snapshot([t for _, t in named]) if options["restore"] == "auto" else None
        bs = options["batch_size"]
        try:
            est = zo.spsa(lambda: zo.calibration_loss(model, windows, bs), named, options["eps"],
                          options["directions"], seed, stream=0, progress=_progress("zo weight"))
        finally:
            restored = snapshot.restore([t for _, t in named]) if snapshot is not None else 0
        self.info.update(est.summary(), forwards=2 * est.q, perturbed=options["perturb"], layerwise=False)
        if snapshot is not None:
            self.info.update(restore="snapshot", restored=restored, tensors=len(named),
                             drift_bound=max(est.drift_bound), scratch_mb=round(snapshot.bytes / 2**20, 1))
        elif options["restore"] == "checkpoint":
            self.info.update(zo.restore_from_checkpoint(model, named, est.drift_bound))
        else:
            self.info.update(restore="arithmetic", drift_bound=max(est.drift_bound))
        return est

    def of(self, name: str):
        if self.kind == "none":
            return None
        if self.kind == "noise":  # a generator per Linear: the draw does not depend on the visiting order
            # (the CPU generator keeps 32 bits of its seed: the stream hashes seed and name together)
            key = hashlib.blake2b(f"{self.seed}/{name}".encode(), digest_size=4).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
            return torch.randn(self._shapes[name], generator=gen)
        if self.kind == "backprop":
            return self._grads[name]
        return self.estimate.gradient(self._index[name])


# --------------------------------------------------------------------------- FMS
def activation_statistic(st, activation: str) -> torch.Tensor:
    """‖X_j‖₂ (l2, Wanda), mean |x_j| (mean_abs) or the standard deviation of x_j (std: its fluctuation)."""
    if activation == "std":
        return st.var.clamp(min=0).sqrt()
    return getattr(st, activation)


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
                part = blocks.abs().amax(dim=(1, 2)).double().cpu()
                total = torch.maximum(total, part)
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


def _stats(model, windows, group_sets, options):
    return input_stats(model, windows, group_sets, batch_size=options["batch_size"])


def fms(model, windows, group_sets, options, seed, kind, stats=None, units=None):
    """FMS group scores with gradient `kind` (zo | none | noise | backprop) and the gradient's info."""
    stats = stats if stats is not None else _stats(model, windows, group_sets, options)
    grad = WeightGradient(model, windows, group_sets, kind, options, seed)
    scores = fms_scores(model, group_sets, stats, grad.of, options["activation"], options["aggregate"],
                        options["abs"], options["members"], units=units)
    return scores, grad.info


# --------------------------------------------------------------------------- gate spaces
def _gate_sensitivity(model, windows, sets, gates, names, options, seed, kind, stream=0):
    """|∂L/∂gate| for `gates` (list of tensors, edited in place) by SPSA or autograd."""
    bs = options["batch_size"]
    if kind == "backprop":
        for g in gates:
            g.requires_grad_(True)
            g.grad = None
        with _GradFlags(model, []), gated(sets, gates):
            loss = zo.backprop_loss(model, windows, bs)
        grads = [g.grad.detach().abs().clone() for g in gates]
        for g in gates:
            g.grad = None
            g.requires_grad_(False)
        return grads, {"loss": loss, "forwards": 1, "backwards": 1}
    runner = zo.LayerwiseLoss(model, windows, bs, hidden_device=hidden_device(options))
    with gated(sets, gates):
        est = gate_estimate(runner, list(zip(names, gates)), [gs.layer for gs in sets], options, seed, stream,
                            progress=_progress("zo gates"))
    for g in gates:  # gates are ours: put them back exactly
        with torch.no_grad():
            g.fill_(1.0)
    return [est.gradient(i).abs() for i in range(len(gates))], est.summary() | {
        "forwards": _forwards(est), "full_forward_equivalents": round(runner.layer_forwards / runner.depth, 1)}


def gate_estimate(runner, named, layers, options, seed, stream=0, progress=None):
    """SPSA over the gates (the paper's estimator), or central differences per gate (`coordinate`),
    on the layer-by-layer pass (`zo.LayerwiseLoss`); layers[i]: the decoder layer gate i scales."""
    if options["estimator"] == "coordinate":
        return zo.coordinate_layerwise(runner, named, layers, options["gate_eps"],
                                       streams=2 * options["directions"], progress=progress)
    return zo.spsa_layerwise(runner, named, layers, options["gate_eps"], options["directions"], seed,
                             stream=stream, progress=progress)


def _forwards(est) -> int:
    return est.forwards if isinstance(est, zo.CoordinateEstimate) else 2 * est.q


def mask_sensitivity(model, windows, sets, options, seed, kind):
    """One gate per group of `sets`; score = |ĝ_gate| (all layers at once, or block-wise)."""
    device = next(model.parameters()).device
    scores, info = {}, {"gradient": kind, "blockwise": bool(options["blockwise"])}
    gates = [torch.ones(gs.count, device=device) for gs in sets]
    names = [f"{gs.layer}.{gs.kind}" for gs in sets]
    if not options["blockwise"] or kind == "backprop":
        grads, part = _gate_sensitivity(model, windows, sets, gates, names, options, seed, kind)
        info.update(part, dims=sum(gs.count for gs in sets))
    else:  # one estimate per layer from its unperturbed inputs (a coordinate is one layer's already)
        runner = zo.LayerwiseLoss(model, windows, options["batch_size"], hidden_device=hidden_device(options))
        named, layers = list(zip(names, gates)), [gs.layer for gs in sets]
        progress = _progress("zo mask (block-wise)")
        grads = [None] * len(sets)
        with gated(sets, gates):
            if options["estimator"] == "coordinate":
                est = zo.coordinate_layerwise(runner, named, layers, options["gate_eps"],
                                              streams=2 * options["directions"], progress=progress)
                grads = [est.gradient(i).abs() for i in range(len(sets))]
            else:
                for idx, est in zo.blockwise_layerwise(runner, named, layers, options["gate_eps"],
                                                       options["directions"], seed, progress=progress):
                    for j, i in enumerate(idx):
                        grads[i] = est.gradient(j).abs()
        per_layer = {}
        for gs in sets:
            per_layer[gs.layer] = per_layer.get(gs.layer, 0) + gs.count
        info.update(q=options["directions"], eps=options["gate_eps"], estimator=options["estimator"],
                    full_forward_equivalents=round(runner.layer_forwards / runner.depth, 1),
                    clean_loss=runner.clean_loss, dims_per_layer=max(per_layer.values()))
        del runner
    for gs, g in zip(sets, grads):
        scores[(gs.layer, gs.kind)] = g.float().cpu()
    return scores, info


def layer_sensitivity(model, windows, group_sets, options, seed, kind):
    """One scalar gate per GroupSet (a layer's attention / MLP output); per layer Σ |ĝ|."""
    device = next(model.parameters()).device
    scalars = [torch.ones(1, device=device) for _ in group_sets]
    views = [s.expand(gs.count) for s, gs in zip(scalars, group_sets)]
    names = [f"{gs.layer}.{gs.kind}" for gs in group_sets]
    bs = options["batch_size"]
    if kind == "backprop":
        for s in scalars:
            s.requires_grad_(True)
        with _GradFlags(model, []), gated(group_sets, [s.expand(gs.count) for s, gs in zip(scalars, group_sets)]):
            loss = zo.backprop_loss(model, windows, bs)
        grads = [float(s.grad.abs()) for s in scalars]
        info = {"loss": loss, "forwards": 1, "backwards": 1}
    else:
        runner = zo.LayerwiseLoss(model, windows, bs, hidden_device=hidden_device(options))
        with gated(group_sets, views):
            est = gate_estimate(runner, list(zip(names, scalars)), [gs.layer for gs in group_sets], options, seed,
                                stream=1 << 20, progress=_progress("zo layer"))
        with torch.no_grad():
            for s in scalars:
                s.fill_(1.0)
        grads = [float(est.gradient(i).abs()) for i in range(len(scalars))]
        info = est.summary() | {"forwards": _forwards(est),
                                "full_forward_equivalents": round(runner.layer_forwards / runner.depth, 1)}
        del runner
    per_layer = {}
    for gs, g in zip(group_sets, grads):
        per_layer.setdefault(gs.layer, {})[gs.kind] = g
    return per_layer, info


def layer_weights_from(sensitivity: dict, lam: float) -> dict:
    """Rank-linear weights in [1 − λ, 1 + λ]: the least sensitive layer gets 1 + λ (pruned most)."""
    layers = sorted(sensitivity, key=lambda i: (sensitivity[i], i))
    n = len(layers)
    if n == 1:
        return {layers[0]: 1.0}
    return {i: 1.0 + lam * (1.0 - 2.0 * r / (n - 1)) for r, i in enumerate(layers)}


# --------------------------------------------------------------------------- compensation
def mean_compensator(model, group_sets, stats, info: dict):
    """FLAP's baseline bias compensation (Eq. 6, `minillm.compensation`) — this project's option, not
    MINI-LLM's. Keeps a reference to each pre-slicing out-projection weight until it runs."""
    return bias_compensator(saved_projections(model, group_sets, stats), info, NAME)


# --------------------------------------------------------------------------- the contract
def score(model, windows, group_sets, options, seed) -> Scoring:
    o = check_options(dict(options))
    if windows is None:
        raise UserError("minillm needs calibration windows")
    seed = int(o["seed"]) if o["seed"] >= 0 else int(seed)
    space, kind = o["space"], o["gradient"]
    fms_kind = kind if o["fms_gradient"] == "same" else o["fms_gradient"]
    info = {"space": space, "gradient": kind, "seed": seed}
    t0 = time.perf_counter()
    needs_stats = o["compensate"] or space != "mask" or o["mask_groups"] == "heads"
    # statistics first, on the unperturbed model (one forward pass over the calibration windows)
    stats = _stats(model, windows, group_sets, o) if needs_stats else None
    units = {}  # FMS per feature-map unit, for normalize=unit
    if space == "weight":
        scores, part = fms(model, windows, group_sets, o, seed, kind, stats=stats, units=units)
        info["weight"] = part
    elif space == "mask":
        mask_sets = group_sets if o["mask_groups"] == "all" else [gs for gs in group_sets if gs.kind == "heads"]
        scores, part = mask_sensitivity(model, windows, mask_sets, o, seed, kind)
        info["mask"] = part
        rest = [gs for gs in group_sets if (gs.layer, gs.kind) not in scores]
        if rest:
            more, part = fms(model, windows, rest, o, seed, fms_kind, stats=stats, units=units)
            scores.update(more)
            info["fms"] = part
    else:
        per_layer, part = layer_sensitivity(model, windows, group_sets, o, seed, kind)
        sens = {i: sum(v.values()) for i, v in per_layer.items()}
        weights = layer_weights_from(sens, o["layer_lambda"])
        info["layer"] = part | {"sensitivity": {str(i): per_layer[i] for i in sorted(per_layer)},
                                "weights": {str(i): round(weights[i], 4) for i in sorted(weights)}}
        info["layer_weights"] = weights
        scores, part = fms(model, windows, group_sets, o, seed, fms_kind, stats=stats, units=units)
        info["fms"] = part
    # Normalisation, for `--scope global` (param and standard are monotone per (layer, kind), so
    # Algorithm 1's per-layer ranking is unchanged). param: sensitivity per removed parameter;
    # standard: z-score within each layer's heads / channels; unit: FLAP's Eq. 5 structure — z-scores
    # over a module's feature-map units, a group's score the MEAN of its units' (a head averages
    # head_dim z-scores, which keeps heads out of the global ranking's low end unless all their
    # dimensions are weak). Groups scored by gates have no units: they are standardised per group.
    for gs in group_sets:
        key = (gs.layer, gs.kind)
        if o["normalize"] == "unit" and key in units:
            u = units[key]
            scores[key] = standardise(u.flatten()).view_as(u).mean(dim=1).float()
        elif o["normalize"] in ("standard", "unit"):
            scores[key] = standardise(scores[key])
        else:
            scores[key] = scores[key] / gs.params_per_group()
    compensate = mean_compensator(model, group_sets, stats, info) if o["compensate"] else None
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return Scoring(scores, compensate, info)
