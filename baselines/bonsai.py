"""`bonsai`: structured pruning from forward passes only, by perturbing sub-models and regressing
their calibration perplexity on their masks (Dery, Kolawole, Kagy, Smith, Neubig, Talwalkar 2024,
"Everybody Prune Now", arXiv 2402.05406; code github ldery/Bonsai, read, never copied).

Units are the groups of every layer of the layer range: attention heads (q heads, or kv groups with
`--head-mode kv-group`) and MLP channels. The model is pruned in ROUNDS (`main.py::main`), each
round on the model the earlier rounds physically left (`suite.pruning.iterative.prune_in_rounds`):

1. Prior (`prior`; `lib/modelling_llama_mod.py` LlamaMLP/LlamaAttention.forward with
   prune_method="wanda", accumulated by `main.py::hook_fn`): for the out-projection input x
   (down_proj's for channels, o_proj's for heads) of one forward batch of `bsz` windows,
       a_c = mean_i |W_out[i, c]| · sqrt(mean_tokens x_c²)
   per input column c; a channel's prior is a_c, a head's the MEAN of a_c over its head_dim
   columns (`.view(1, 1, num_heads, -1).mean(axis=-1)`), a kv group's the mean over its q heads'
   columns (our extension); the prior is the average of the batches' values (hook_fn sums them
   and `run_data_to_sampling_proba` divides by the count). Statistics: `activations.input_stats`
   per batch of `bsz` windows.
2. Sampler (`run_data_to_sampling_proba`, `get_random_mask`, `set_masks`): per module, the top
   int(n·(1 − 2·pf)) units by prior are fixed (kept in every mask); the rest may be dropped with
   probability ∝ max(prior) − prior; a mask drops int(pf·n) + 1 units without replacement (numpy's
   `choice(replace=False, p=...)`: successive draws, renormalised), and each mask is followed by its
   complement (the sampled units flipped, fixed units kept). pf = prune_frac for channels,
   prune_frac · mlp_attn_ratio for heads. GQA q-head mode (beyond the authors' MHA-only code): the
   fixed units are the top ones WITHIN each kv group, since a removal takes one q head from every
   kv group (`select.py`).
3. Targets (`get_random_mask_scores`, `lib/eval.py::eval_ppl_trainonly`): y = −perplexity of the
   masked model on the same calibration windows for every mask (clipped at −1e8). Masks are gates
   on the groups' feature maps (`gates.gated`, exact removal) on the layer pass
   (`loss.LayerwiseLoss`): `mask_batch` masks share each layer's residency as separate streams,
   or (`batched=true`) as one forward whose batch holds a copy of the windows per mask.
4. Regression (`lib/scoring_model.py::ScoreModelHP`, `ScoreModel`, `LinearModel`; `score_model_hp`
   here): y ≈ βᵀm + b over the sampled units' 0/1 masks, Adam, L1 (or L2) penalty, its
   hyper-parameters (lr factor, penalty weight, batch size) chosen by 5-fold cross-validated
   Kendall τ; "global" (the authors' default) fits every module at once, "local" one model per
   module starting from its normalised prior.
5. Removal (`investigate_score_based_mask`): global: the lowest-β units are removed until the
   round's parameters (prune_frac · the original non-embedding count) are reached, each unit
   weighted by its parameter count (`select.select(scope="global")` with fixed units last);
   local: per module the units at or below the prune_frac quantile of its scores.
   The round's plan is sliced (`plan.apply_plan`) and the next round starts with a new prior.
   Rounds repeat until the sparsity is within `tol` of the target or beyond it, the last round's
   fraction clipped to what is left (`main.py::main`, the clip is kept for later rounds as theirs).

Conventions (both recorded in `Scoring.info`): the authors' sparsity is the fraction of
parameters OUTSIDE embeddings and head (`main.py::get_param_count`, names containing 'embed' or
'head' excluded); the suite's ratio is of ALL parameters. The target is the suite's
round(ratio · all parameters) removed, i.e. the authors' sparsity ratio · all / non-embedding,
and prune_frac / tol are in the authors' convention. Calibration: the authors use nsamples 32
windows of the model's context (`get_llm`: max_position_embeddings, 4096 for LLaMA-2) of
WikiText-2 train; here 32 windows of 128 tokens (the suite's calibration length on a 2-core CPU)
of C4, since the suite's WikiText-2 windows are drawn from the test text its perplexity reads
(a grid entry may give `calibration: {corpus: wikitext2, seqlen: ...}`).

Deliberate differences: (a) global removal through the engine's global selection: a head that
would overshoot the round is skipped for finer channels (theirs stops at the first unit that
would overshoot); every layer keeps at least one head and one channel unless `allow_empty`
(theirs may empty a module); GQA q-head mode removes the same number of q heads per kv group;
(b) local removal keeps at least one unit per module unless `allow_empty`; (c) masks are
evaluated layer-wise with gates, the same values as their masked whole-model forward up to float
summation order; (d) all in the model's dtype on any device (theirs: fp16, CUDA, LLaMA MHA);
(e) the prior falls back to a uniform draw over the sampled units where all their
probabilities are zero (theirs stops on NaN).
"""
from __future__ import annotations

import math
import time
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, model_validator

from suite.pruning.activations import input_stats
from suite.pruning.architectures import adapter_for, all_group_sets, output_only
from suite.pruning.errors import UserError
from suite.pruning.gates import gated
from suite.pruning.iterative import prune_in_rounds
from suite.pruning.layerwise import parameter_count, resident_sets
from suite.pruning.loss import LayerwiseLoss
from suite.pruning.options import Bool, Float, Int, MethodOptions, listed
from suite.pruning.plan import plan_from_keep
from suite.pruning.scoring import Scoring
from suite.pruning.select import Allocation, select

NAME = "bonsai"
INF = 1e8  # main.py INF: perplexities clipped here


class Options(MethodOptions):
    """The authors' flags (`main.py::main` argparse), their defaults, and two of this suite's.

    masks_per_iter  sub-model evaluations per round (`--masks_per_iter` 200; mpi//2 masks + complements)
    prune_frac      fraction of the original non-embedding parameters removed per round (`--prune_frac` 0.05)
    tol             stop when the sparsity is within tol of the target (`--tol` 0.02)
    mlp_attn_ratio  heads' sampling/removal fraction = prune_frac · this (`--mlp_attn_ratio` 1.0)
    sm_reg_type     regression penalty l1 | l2 (`--sm_reg_type` l1)
    sm_reg_weight   penalty weights searched (`--sm_reg_weight` [1e2, 1e-4, 0])
    sm_lr_factor    Adam lr = 1 / (units · factor), factors searched (`--sm_lr_factor` [100, 10, 1, 0.1])
    sm_bsz          regression batch sizes searched (`--sm_bsz` [32, 64, 128])
    sm_nepochs      regression epochs (`--sm_nepochs` 50; early stop after `patience` 10, scoring_model.py)
    sm_lin_model_type  global | local (`--sm_lin_model_type` global)
    bsz             windows per forward batch (`--bsz` 4): the prior averages per-batch values
    mask_batch      (ours) masks evaluated per layer residency; memory: that many hidden-state streams
    batched         (ours) those masks in ONE forward per micro-batch (mask_batch·bsz windows, 2-D gates)
    """

    masks_per_iter: Annotated[Int, Field(ge=2)] = 200
    prune_frac: Annotated[Float, Field(gt=0, lt=0.5)] = 0.05
    tol: Annotated[Float, Field(ge=0, lt=1)] = 0.02
    mlp_attn_ratio: Annotated[Float, Field(gt=0)] = 1.0
    sm_reg_type: Literal["l1", "l2"] = "l1"
    sm_reg_weight: listed(Annotated[Float, Field(ge=0)]) = [1e2, 1e-4, 0.0]
    sm_lr_factor: listed(Annotated[Float, Field(gt=0)]) = [100.0, 10.0, 1.0, 0.1]
    sm_bsz: listed(Annotated[Int, Field(ge=1)]) = [32, 64, 128]
    sm_nepochs: Annotated[Int, Field(ge=1)] = 50
    sm_lin_model_type: Literal["global", "local"] = "global"
    bsz: Annotated[Int, Field(ge=1)] = 4
    mask_batch: Annotated[Int, Field(ge=1)] = 16
    batched: Bool = False

    @model_validator(mode="after")
    def _scope(self, info: ValidationInfo):  # its regression chooses the units: a selection scope does nothing
        if (info.context or {}).get("scope") != "layer":
            return self
        raise UserError(f"{NAME} removes units by its own regression (sm_lin_model_type=global ranks all layers "
                        f"together, local each module): scope 'layer' would be ignored")


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 32, "seqlen": 128,
    "source": "ldery/Bonsai main.py: --nsamples 32 windows of model.seqlen = max_position_embeddings (4096 for "
              "LLaMA-2) from --dataset wikitext2 (train); here 128-token windows (the suite's calibration length) "
              "of C4: the suite's WikiText-2 windows come from the test text the perplexity reads",
}
SELECTION = {"scope": "global", "layers": "all"}
PATIENCE = 10  # scoring_model.py get_linearmodel_hpdict: 'patience': [10]
FOLDS = 5  # scoring_model.py ScoreModelHP.search_best_linear_fit: num_folds = 5


# --------------------------------------------------------------------------- 1. prior
def prior(model, windows: torch.Tensor, group_sets, bsz: int = 4) -> dict:
    """{(layer, kind): [count] float64} the authors' wanda prior of every group (module docstring, 1).

    windows: [nsamples, seqlen]; the windows are taken `bsz` at a time (the last batch may be
    smaller), each batch's value computed from its own statistics (`input_stats`) and the batches
    averaged, as `main.py::hook_fn` accumulates them. Weights are read resident (offload)."""
    total, batches = {}, 0
    for batch in windows.split(max(1, int(bsz))):
        stats = input_stats(model, batch, output_only(group_sets), batch_size=batch.shape[0])
        for gs in resident_sets(group_sets):
            out = gs.output
            st = stats[(gs.layer, out.name)]
            weight = gs.linear(out).weight.detach().double()
            rms = (st.sum_sq / st.n).sqrt().to(weight.device)
            column = weight.abs().mean(dim=0) * rms  # a_c over the Linear's input columns
            value = column.narrow(0, out.offset, gs.count * out.width).view(gs.count, out.width).mean(1).cpu()
            key = (gs.layer, gs.kind)
            total[key] = total.get(key, 0.0) + value
        batches += 1
    return {k: v / batches for k, v in total.items()}


# --------------------------------------------------------------------------- 2. sampler
def sampling_proba(prior_values: np.ndarray, pfrac: float, blocks: int = 1):
    """(p, fixed, use) of one module (`main.py::run_data_to_sampling_proba`).

    prior_values: [n]; fixed: the int(n·(1 − 2·pfrac)) highest-prior units (within each of
    `blocks` equal consecutive blocks: GQA q-head mode's kv groups; 1 = the authors'), use: the
    others, both in descending prior order (argsort of −prior, as theirs); p: [n], max(prior) −
    prior on `use`, 0 on `fixed`, normalised (uniform over `use` where that sums to 0)."""
    a = np.asarray(prior_values, dtype=np.float64)
    n = a.size
    per = n // blocks
    fixed, use = [], []
    for b in range(blocks):
        block = a[b * per:(b + 1) * per]
        keep = int(per * (1.0 - 2 * pfrac))
        order = b * per + np.argsort(-block, kind="stable")
        fixed.extend(order[:keep].tolist())
        use.extend(order[keep:].tolist())
    fixed, use = np.array(fixed, dtype=np.int64), np.array(use, dtype=np.int64)
    if blocks > 1:  # one descending order over the module, as theirs
        fixed, use = fixed[np.argsort(-a[fixed], kind="stable")], use[np.argsort(-a[use], kind="stable")]
    p = a.max() - a
    p[fixed] = 0.0
    if p.sum() <= 0 or not np.isfinite(p.sum()):
        p = np.zeros(n)
        p[use] = 1.0
    return p / p.sum(), fixed, use


def random_mask(n: int, p: np.ndarray, pfrac: float, rng: np.random.Generator) -> np.ndarray:
    """[n] 0/1 float mask dropping int(pfrac·n) + 1 units drawn without replacement with
    probabilities p (`main.py::get_random_mask`: `np.random.choice(idx, size, p=p, replace=False)`),
    from the Generator `rng` (`Generator.choice`: the same successive-draw distribution)."""
    size = min(int(pfrac * n) + 1, int((p > 0).sum()))
    mask = np.ones(n)
    mask[rng.choice(n, size=size, replace=False, p=p)] = 0.0
    return mask


def sample_masks(modules: list, count: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """`count` masks (count // 2 pairs, `main.py::get_random_mask_scores`): pairs of (mask, complement)
    over `modules` [(p, fixed, use, pfrac)]; returns [mask][module] -> [n] 0/1 arrays. The complement
    is 1 − mask with the fixed units set back to 1 (`set_masks(use_complement=True)`)."""
    out = []
    for _ in range(count // 2):
        masks, complements = [], []
        for p, fixed, use, pfrac in modules:
            m = random_mask(p.size, p, pfrac, rng)
            c = 1.0 - m
            c[fixed] = 1.0
            masks.append(m)
            complements.append(c)
        out += [masks, complements]
    return out


# --------------------------------------------------------------------------- 3. masked evaluation
class _MaskStreams:
    """The `LayerwiseLoss` perturbation of a batch of masks: stream s is the model with mask s as
    gates on every module of the layers the masks touch (`gates.gated`, hooked per resident layer).
    `batched`: ONE stream whose batch holds a copy of the windows per mask (2-D gates [masks, count])."""

    def __init__(self, group_sets, masks: list[list[np.ndarray]], batched: bool = False):
        self.n = 1 if batched else len(masks)
        self.by_layer = {}
        for k, gs in enumerate(group_sets):
            self.by_layer.setdefault(gs.layer, []).append((k, gs))
        self.layers = set(self.by_layer)
        self.masks, self.batched = masks, batched

    def enter(self, j):
        sets = [gs for _, gs in self.by_layer[j]]
        self.gates = [torch.ones((len(self.masks), gs.count) if self.batched else gs.count) for gs in sets]
        self._ctx = gated(sets, self.gates)
        self._ctx.__enter__()

    def apply(self, j, s):
        for gate, (k, _) in zip(self.gates, self.by_layer[j]):
            values = np.stack([m[k] for m in self.masks]) if self.batched else self.masks[s][k]
            gate.copy_(torch.from_numpy(values))

    def leave(self, j):
        self._ctx.__exit__(None, None, None)


def masked_losses(runner: LayerwiseLoss, group_sets, masks: list, mask_batch: int) -> list[float]:
    """Mean next-token cross-entropy of the calibration windows for every mask (masks[s][k]: the 0/1
    gates of group_sets[k]); `mask_batch` masks per pass over the layers (each layer resident once
    per pass, one hidden-state stream per mask)."""
    out = []
    for start in range(0, len(masks), mask_batch):
        part = masks[start:start + mask_batch]
        out += runner.losses(0, runner.lp.hidden, _MaskStreams(group_sets, part))
    return out


def batched_masked_losses(model, windows: torch.Tensor, group_sets, masks: list, mask_batch: int,
                          bsz: int) -> tuple[list[float], int]:
    """As `masked_losses`, the `mask_batch` masks of a pass in ONE forward per micro-batch: each
    micro-batch of `bsz` windows is repeated once per mask (mask_batch·bsz windows per forward) and
    block r of its rows gated by mask r. Returns (losses, layer forwards)."""
    out, forwards = [], 0
    for start in range(0, len(masks), mask_batch):
        part = masks[start:start + mask_batch]
        copies = torch.cat([block.repeat(len(part), 1) for block in windows.split(bsz)])
        runner = LayerwiseLoss(model, copies, len(part) * bsz)
        got = runner.losses(0, runner.lp.hidden, _MaskStreams(group_sets, part, batched=True), blocks=len(part))[0]
        out += got if len(part) > 1 else [got]
        forwards += runner.layer_forwards
    return out, forwards


# --------------------------------------------------------------------------- 4. regression
def _fit(xs_tr, ys_tr, xs_ts, ys_ts, base, hp, reg_type, nepochs, rng):
    """One `ScoreModel.update_with_info` fit: returns (β [p], b, best test τ)."""
    from scipy.stats import kendalltau

    mean_y = ys_tr.mean()
    ys_tr, ys_ts = ys_tr - mean_y, ys_ts - mean_y
    beta = base.clone().requires_grad_(True)
    bias = torch.zeros(1, requires_grad=True)
    anchor = base.clone() if float(base.sum()) != 0 else xs_tr.mean(0)  # mean_score_tensor
    lr = 1.0 / (int((anchor != 0).sum()) * hp["lr_factor"])
    opt = torch.optim.Adam([beta, bias], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, min_lr=1e-5)
    bs, weight = int(hp["bsz"]), hp["reg_weight"]
    best_tau, best, since = -1e5, None, 0
    for _ in range(nepochs):
        perm = torch.from_numpy(rng.permutation(len(ys_tr)))
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            pred = xs_tr[idx] @ beta + bias
            loss = torch.nn.functional.mse_loss(pred, ys_tr[idx])
            reg = beta.abs().sum() * weight if reg_type == "l1" else ((beta - anchor) ** 2).sum() * weight
            opt.zero_grad()
            (loss + reg).backward()
            opt.step()
        rng.permutation(len(ys_ts))  # their evaluation epoch draws a permutation too
        with torch.no_grad():  # τ of fewer than 2 held-out masks is undefined (NaN, as scipy gives)
            tau = kendalltau((xs_ts @ beta + bias).numpy(), ys_ts.numpy()).statistic if len(ys_ts) > 1 else math.nan
        if tau >= best_tau:
            best_tau, best, since = tau, (beta.detach().clone(), bias.detach().clone()), 0
        sched.step(tau)
        since += 1
        if since > PATIENCE:
            break
    if best is None:
        best = (beta.detach().clone(), bias.detach().clone())
    return best[0], best[1], best_tau


def score_model_hp(masks: np.ndarray, targets: np.ndarray, base: np.ndarray | None = None,
                   reg_type: str = "l1", reg_weight=(1e2, 1e-4, 0.0), lr_factor=(100.0, 10.0, 1.0, 0.1),
                   bsz=(32, 64, 128), nepochs: int = 50, seed: int = 0) -> tuple[np.ndarray, dict]:
    """β [p] of y ≈ βᵀm + b fitted as `lib/scoring_model.py::ScoreModelHP.search_best_linear_fit`.

    masks: [m, p] 0/1; targets: [m]; base: [p] the starting β (None: zeros, the global model; the
    local model passes its prior normalised to sum 1). Inputs are divided by sqrt(Σbase + 1) and the
    penalty weight too; for every (lr_factor, reg_weight, bsz) the 5 folds (consecutive blocks of
    m // 5 as their `split_train_test`, whose permutation is unused) are fitted: Adam at lr 1 /
    (nonzero units of the anchor · lr_factor), targets centred on the training mean, MSE + penalty
    (l1: weight·Σ|β|; l2: weight·Σ(β − anchor)², anchor = base, or the training masks' mean where
    base is 0), ReduceLROnPlateau on the held-out Kendall τ (factor 0.5, patience 3), the epoch
    with the best held-out τ kept, stop after 10 epochs without one. The setting with the best
    mean τ is refitted on all data (train = test). Randomness: numpy Generator(seed) (epoch
    permutations). Returns (β, {"hp", "cv_tau"})."""
    x = torch.as_tensor(np.asarray(masks, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    p = x.shape[1]
    base_t = torch.zeros(p) if base is None else torch.as_tensor(np.asarray(base, dtype=np.float32)).reshape(p)
    norm = math.sqrt(float(base_t.sum()) + 1.0)
    x = x / norm
    rng = np.random.default_rng(seed)
    m, fold = len(y), len(y) // FOLDS
    best_hp, best_tau = None, float("-inf")
    for lr_f in lr_factor:
        for rw in reg_weight:
            for bs in bsz:
                hp = {"lr_factor": float(lr_f), "reg_weight": float(rw) / norm, "bsz": int(bs)}
                taus = []
                for sid in range(FOLDS):
                    test = torch.zeros(m, dtype=torch.bool)
                    test[sid * fold:(sid + 1) * fold] = True
                    taus.append(_fit(x[~test], y[~test], x[test], y[test], base_t, hp, reg_type, nepochs, rng)[2])
                tau = float(np.mean(taus))
                if tau > best_tau or best_hp is None:
                    best_tau, best_hp = (tau if not math.isnan(tau) else best_tau), hp
    beta, _, _ = _fit(x, y, x, y, base_t, best_hp, reg_type, nepochs, rng)
    return beta.numpy().reshape(p).astype(np.float64), {"hp": {**best_hp, "reg_weight": best_hp["reg_weight"] * norm},
                                                        "cv_tau": best_tau}


# --------------------------------------------------------------------------- 5. rounds
def nonembedding_count(model) -> int:
    """Parameters outside embeddings and head (`main.py::get_param_count(exclude=['embed', 'head'])`)."""
    return sum(p.numel() for n, p in model.named_parameters() if not any(x in n for x in ("embed", "head")))


def _kv_groups(model, gs, head_mode) -> int:
    if gs.kind != "heads" or head_mode != "q-head":
        return 1
    layer = adapter_for(model).layers(model)[gs.layer]
    nkv = adapter_for(model).num_kv_heads(layer)
    return nkv if nkv != gs.count else 1


def sub_model_data(model, windows, options: dict, pf: float, layers, head_mode: str, rng: np.random.Generator):
    """A round's data: (sets, modules [(p, fixed, use, pf)], prior, masks [mask][module], y = −perplexity
    per mask [masks], layer forwards). Steps 1-3 of the module docstring."""
    o = options
    sets = all_group_sets(model, head_mode, layers=set(layers))
    pri = prior(model, windows, sets, o["bsz"])
    modules = []
    for gs in sets:
        this = pf * (o["mlp_attn_ratio"] if gs.kind == "heads" else 1.0)
        p, fixed, use = sampling_proba(pri[(gs.layer, gs.kind)].numpy(), this, _kv_groups(model, gs, head_mode))
        modules.append((p, fixed, use, this))
    masks = sample_masks(modules, o["masks_per_iter"], rng)
    if o["batched"]:
        losses, forwards = batched_masked_losses(model, windows, sets, masks, o["mask_batch"], o["bsz"])
    else:
        runner = LayerwiseLoss(model, windows, o["bsz"])
        losses, forwards = masked_losses(runner, sets, masks, o["mask_batch"]), runner.layer_forwards
    y = -np.array([min(math.exp(min(loss, 700.0)), INF) for loss in losses])
    return sets, modules, pri, masks, y, forwards


def global_design(modules, masks) -> np.ndarray:
    """[masks, sampled units of all modules] 0/1: the global model's inputs (modules concatenated)."""
    return np.concatenate([np.stack([mk[k][use] for mk in masks]) for k, (_, _, use, _) in enumerate(modules)], 1)


def bonsai_round(model, windows, options: dict, pf: float, removal: int, layers, head_mode: str,
                 allow_empty: bool, rng: np.random.Generator, seed: int):
    """One round: prior, masks, masked perplexities, regression, removal. Returns (plan, scores, info).

    pf: the round's prune fraction (authors' convention); removal: parameters the round removes."""
    o = options
    t0 = time.perf_counter()
    sets, modules, pri, masks, y, forwards = sub_model_data(model, windows, o, pf, layers, head_mode, rng)
    ppl = -y
    t_eval = time.perf_counter() - t0
    fit = {"reg_type": o["sm_reg_type"], "reg_weight": o["sm_reg_weight"], "lr_factor": o["sm_lr_factor"],
           "bsz": o["sm_bsz"], "nepochs": o["sm_nepochs"]}
    scores, hp = {}, []
    if o["sm_lin_model_type"] == "global":
        beta, fitted = score_model_hp(global_design(modules, masks), y, None, seed=seed, **fit)
        hp.append(fitted)
        start = 0
        for gs, (_, fixed, use, _) in zip(sets, modules):
            s = torch.full((gs.count,), math.inf, dtype=torch.float64)
            s[torch.from_numpy(use)] = torch.from_numpy(beta[start:start + len(use)])
            start += len(use)
            scores[(gs.layer, gs.kind)] = s
        ratio = removal / parameter_count(model)
        plan = select(model, scores, ratio, scope="global", layers=layers, head_mode=head_mode,
                      allow_empty=allow_empty).plan
    else:
        keep = {}
        for k, (gs, (_, fixed, use, this)) in enumerate(zip(sets, modules)):
            a = pri[(gs.layer, gs.kind)].numpy()[use]
            beta, fitted = score_model_hp(np.stack([mk[k][use] for mk in masks]), y, a / a.sum(), seed=seed, **fit)
            hp.append(fitted)
            s = torch.full((gs.count,), INF, dtype=torch.float64)
            s[torch.from_numpy(use)] = torch.from_numpy(beta)
            scores[(gs.layer, gs.kind)] = s
            qt = torch.quantile(s.float(), this)  # update_mask_one_layer: mask = score > quantile
            unit = _kv_groups(model, gs, head_mode)
            n = int((s.float() <= qt).sum()) // unit * unit
            n = min(n, gs.count - (0 if allow_empty else unit))
            keep[(gs.layer, gs.kind)] = Allocation({(gs.layer, gs.kind): n}, {(gs.layer, gs.kind): unit},
                                                   [gs], 0, 0, 0).keep(gs, s)
        plan = plan_from_keep(model, keep, head_mode=head_mode, allow_empty=allow_empty)
    info = {"prune_frac": pf, "evaluations": len(masks), "units_sampled": int(sum(len(m[2]) for m in modules)),
            "forward_tokens": int(len(masks) * windows.numel()), "layer_forwards": forwards,
            "evaluation_seconds": round(t_eval, 3), "seconds": round(time.perf_counter() - t0, 3),
            "ppl_min": float(ppl.min()), "ppl_max": float(ppl.max()), "regression": hp}
    return plan, scores, info


def prune(model, windows, options, ratio, *, layers, head_mode="q-head", allow_empty=False, round_to=None,
          seed=0):
    """Bonsai's rounds on `model` in place (module docstring); returns (Selection, Scoring).

    Scoring.scores: the first round's (entry numbering; fixed units +inf); Scoring.info: per round
    the prune fraction, sub-model evaluations, forward tokens, times and regression settings, and
    the totals; the sparsity in both conventions (`authors_sparsity_*`: of the non-embedding
    parameters; `ratio_*`: of all). `round_to` is not supported (UserError)."""
    if round_to:
        raise UserError("bonsai chooses its units round by round: round_to is not supported")
    o = dict(options)
    rng = np.random.default_rng(seed)
    total, base = parameter_count(model), nonembedding_count(model)
    target_removed = round(ratio * total)
    target = target_removed / base  # the authors' sparsity_ratio of the same removal
    rounds, first = [], {}
    peak0 = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    state = {"pf": float(o["prune_frac"])}

    def next_round(m, index):
        removed = total - parameter_count(m)
        cur = removed / base
        if abs(cur - target) < o["tol"] or cur > target:
            return None
        if index and removed == state.get("removed"):  # the last round removed nothing: it cannot progress
            return None
        state["removed"] = removed
        if cur + state["pf"] > target:  # clip the last round (kept for later rounds, as main.py)
            state["pf"] = abs(target - cur)
        plan, scores, info = bonsai_round(m, windows, o, state["pf"], round(state["pf"] * base), layers, head_mode,
                                          allow_empty, rng, seed + index)
        if index == 0:
            first.update(scores)
        rounds.append(info)
        return plan

    selection = prune_in_rounds(model, next_round, ratio, head_mode=head_mode, allow_empty=allow_empty)
    removed = selection.removed
    info = {
        "rounds": rounds, "sub_model_evaluations": sum(r["evaluations"] for r in rounds),
        "forward_tokens": sum(r["forward_tokens"] for r in rounds),
        "layer_forwards": sum(r["layer_forwards"] for r in rounds),
        "seconds": round(time.perf_counter() - t0, 3),
        "ratio_target": ratio, "ratio_achieved": round(removed / total, 6),
        "authors_sparsity_target": round(target, 6), "authors_sparsity_achieved": round(removed / base, 6),
        "nonembedding_params": base, "all_params": total,
        "seqlen": int(windows.shape[1]), "nsamples": int(windows.shape[0]),
        "authors_seqlen": "max_position_embeddings (4096 for LLaMA-2)",
    }
    if peak0 is not None:
        info["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return selection, Scoring(first, info=info)


def score(model, windows, group_sets, options, seed) -> Scoring:
    """One round's β on the unpruned model (no slicing): the scores `prune`'s first round removes by."""
    layers = sorted({gs.layer for gs in group_sets})
    adapter = adapter_for(model)
    head_mode = "kv-group" if any(gs.kind == "heads" and gs.count != adapter.num_heads(gs.module)
                                  for gs in group_sets) else "q-head"  # the mode the group sets were built in
    pf = float(options["prune_frac"])
    _, scores, info = bonsai_round(model, windows, options, pf, round(pf * nonembedding_count(model)), layers,
                                   head_mode, False, np.random.default_rng(seed), seed)
    return Scoring(scores, info={"rounds": [info]})
