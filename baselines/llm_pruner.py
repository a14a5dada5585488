"""`llm-pruner`: LLM-Pruner's Taylor group importance (Ma et al., NeurIPS 2023), from real backprop.

The loss is the causal-LM cross-entropy on the calibration windows, L = model(x, labels=x).loss
(mean over all predicted tokens), and g = dL/dW comes from real backprop with requires_grad switched
on for EVERY parameter, as `hf_prune.py` does (a .grad buffer per parameter). Afterwards every
.grad is set to None and each parameter's requires_grad flag is restored.

Bounded backprop (this project's difference from hf_prune.py, which backpropagates all windows in
one batch through the full [batch, seq, vocab] logits): the gradient is accumulated over
micro-batches by `suite.pruning.loss.backprop_loss`, each micro-batch's summed loss scaled by 1/(all
tokens), so .grad is the one-batch gradient up to floating-point summation order
(tests/test_backprop.py), and the loss's output head runs chunk by chunk under activation
checkpointing, so no full logits are ever saved. Option `batch_size` (windows per micro-batch):
0 = `auto_batch_size`, the largest micro-batch whose estimated activations stay within
`ACTIVATION_BUDGET` (1 GiB; see there); n = n windows per micro-batch. The gradient does not
depend on it; memory and speed do.

Importance of one weight vector W_k of a coupled group (one row of q/k/v/gate/up, one column of
o/down), LLM-Pruner §3.2 (Eqs. 3-5) as implemented in
`LLMPruner/pruner/hf_llama_pruner.py::TaylorImportance`:

  - ``vector`` (vector-wise, Eq. 3: the first-order Taylor term of |L(W) - L(W_k = 0)|;
    `--taylor vectorize`):            I(W_k) = |sum_{w in W_k} w · dL/dw|
  - ``element1`` (element-wise, Eq. 4, first order; `--taylor param_first`), the DEFAULT: the
    setting of the repo's scripts/llama_prune.sh and of the paper's headline LLaMA-7B rows
    (hf_prune.py's argparse default is param_mix = element2):
                                       I(W_k) = sum_{w in W_k} |w · dL/dw|
  - ``element2`` (Eq. 4 with the Hessian diagonal approximated by the Fisher, Eq. 5;
    `--taylor param_mix`):  I(W_k) = sum_{w in W_k} |w · dL/dw - 1/2 · w · F_ww · w|,
    F_ww = (1/N) sum_n (dL_n/dw)^2 accumulated over N single-window backward passes (hf_prune.py's
    `acc_grad`: grad * grad / num_examples per example), dL/dw from the batch pass.

Group importance (the aggregation after Eq. 5, `--grouping_strategy`): the per-vector importances of
the group's coupled Linears are aligned index by index (head_dim positions for heads, LLM-Pruner's
consecutive groups; a member with a wider share, e.g. BLOOM's fused q/k/v or a GQA kv group's q
rows, is folded onto the narrowest as LLM-Pruner aligns them: view(-1, min).sum(0)), reduced ACROSS
the coupled Linears by ``aggregation`` (sum default, mean, max, prod), then summed over the head's
positions (MetaPruner: imp.view(-1, head_dim).sum(1)). Biases are not scored (the reference scores
weights only).

Calibration defaults as in LLM-Pruner's README/scripts: 10 calibration samples (`--num_examples 10`), length
128 (`get_examples`' default and the paper; hf_prune.py itself passes seq_len=64: `--seqlen 64`
reproduces it), block-wise pruning of layers 4..30 of LLaMA-7B's 32 (`--block_*_layer_start 4
--block_*_layer_end 30`), expressed as fractions of depth [0.125, 0.9375), ranked per layer
(global_pruning off). The corpus is C4 instead of BookCorpus (not in the offline mirror; LLM-Pruner's
`get_examples` offers 'c4' too).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from suite.pruning import loss as lm_loss
from suite.pruning.errors import UserError
from suite.pruning.layerwise import layer_gradients, offloaded
from suite.pruning.options import Int, MethodOptions
from suite.pruning.scoring import Scoring, group_tensor

NAME = "llm-pruner"


class Options(MethodOptions):
    """Every option is read by every importance: `aggregation` reduces across the coupled Linears
    (a head or channel always has several), `batch_size` is the batch pass's micro-batch (with
    `element2` too: its Fisher passes are single windows, as hf_prune.py's). No combination is ignored."""

    importance: Literal["element1", "element2", "vector"] = "element1"
    aggregation: Literal["sum", "mean", "max", "prod"] = "sum"
    batch_size: Annotated[Int, Field(ge=0)] = 0  # 0 = auto_batch_size


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 10, "seqlen": 128,
    "source": "LLM-Pruner hf_prune.py get_examples(..., num_examples=10); paper: 10 samples of 128 "
              "tokens from BookCorpus (C4 here: BookCorpus is not mirrored)",
}
SELECTION = {"scope": "layer", "layers": [0.125, 0.9375]}


# Activation bytes per token per decoder layer, in elements of the model's dtype, saved for backward:
# attention 5·h (normed input, q, k, v, the heads' output) + a·s (softmax probabilities, eager
# attention), the two norms' inputs 2·h, the MLP's input h and 4·I (gate, up, act(gate), their
# product; a GeLU MLP saves 2·I of its 4h = I), i.e. 8·h + 4·I + a·s; times 2 for the norms' fp32
# upcasts, rotary/ALiBi and the attention kernels' temporaries. The same count as Korthikanti et al.
# 2022 ("Reducing Activation Recomputation in Large Transformer Models", Eq. 1: sbh(34 + 5as/h)
# bytes in 16-bit) without dropout masks, generalised to the MLP's own width I.
ACTIVATION_FACTOR = 2
# The micro-batch's activation budget: the .grad buffers (one per parameter, the weights' own bytes:
# 13 GB for a 7B model in fp16) and the weights dominate backprop anyway; a larger micro-batch only
# buys speed. 1 GiB keeps LLaMA-7B at 1 window of 128 tokens (~1.3 GB by the estimate: the minimum
# is one window) and SmolLM2-135M in fp32 at 2 windows.
ACTIVATION_BUDGET = 1 << 30


def _config_sizes(config) -> tuple[int, int, int, int]:
    """(layers, hidden, MLP width, attention heads) of a LLaMA / OPT / BLOOM-like config."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embed")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    width = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    return int(layers), int(hidden), int(width), int(heads)


def activation_bytes(config, seqlen: int, dtype: torch.dtype) -> int:
    """Estimated activation bytes one window of `seqlen` tokens saves for backward (all layers).

    layers × seqlen × ACTIVATION_FACTOR·(8·hidden + 4·MLP width + heads·seqlen) × dtype bytes
    (see ACTIVATION_FACTOR). An estimate for choosing the micro-batch, not a measured peak.
    """
    layers, hidden, width, heads = _config_sizes(config)
    per_token = ACTIVATION_FACTOR * (8 * hidden + 4 * width + heads * seqlen)
    return layers * seqlen * per_token * torch.finfo(dtype).bits // 8


def auto_batch_size(model, seqlen: int, budget: int = ACTIVATION_BUDGET) -> int:
    """The largest micro-batch (≥ 1 window) whose `activation_bytes` plus the loss chunk stay within `budget`.

    The loss chunk: `suite.pruning.loss.LOSS_CHUNK_ELEMENTS` fp32 logits, their log-softmax and gradient
    (3 × 4 bytes each), recomputed under checkpointing one chunk at a time.
    """
    dtype = next(model.parameters()).dtype
    per_window = activation_bytes(model.config, seqlen, dtype)
    room = budget - 3 * 4 * lm_loss.LOSS_CHUNK_ELEMENTS
    return max(1, room // per_window)


def backprop(model, windows: torch.Tensor, batch_size: int = 0, fisher: bool = False) -> dict:
    """Fill every parameter's .grad with dL/dW of the mean LM loss over `windows` (real backprop).

    windows: [n, seqlen] token ids. The gradient is accumulated over micro-batches of `batch_size`
    windows (0 = `auto_batch_size`) by `suite.pruning.loss.backprop_loss`: equal to the one-batch gradient
    up to floating-point error. With `fisher`, first accumulate F = (1/N) sum_n (dL_n/dW)^2 over
    single-window passes (hf_prune.py's per-example passes); returns {id(parameter): F} (else {}).
    The caller owns clearing .grad and restoring requires_grad.
    """
    n = len(windows)
    params = [p for p in model.parameters() if p.requires_grad]
    fisher_acc = {}
    if fisher:
        for j in range(n):
            lm_loss.backprop_loss(model, windows[j:j + 1], 1)
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        continue
                    sq = p.grad.pow(2).div_(n)
                    if id(p) in fisher_acc:
                        fisher_acc[id(p)] += sq
                    else:
                        fisher_acc[id(p)] = sq
                    p.grad = None
    step = batch_size if batch_size > 0 else auto_batch_size(model, windows.shape[1])
    lm_loss.backprop_loss(model, windows, step)
    return fisher_acc


def _member_importance(weight, grad, fisher, gs, member, importance) -> torch.Tensor:
    """[count, width]: importance of each coupled weight vector (row or column) of one member."""
    w = weight.detach().double()
    salience = w * grad.double()
    if importance == "element2":
        salience = salience - 0.5 * w * fisher.double() * w
    blocks = group_tensor(salience, gs, member)            # [count, width, other]
    if importance == "vector":
        return blocks.sum(dim=2).abs()
    return blocks.abs().sum(dim=2)


def _aggregate(per_member: list, how: str) -> torch.Tensor:
    """Align members index by index (fold wider shares onto the narrowest), reduce, sum positions."""
    count = per_member[0].shape[0]
    w0 = min(v.shape[1] for v in per_member)
    aligned = []
    for v in per_member:
        if v.shape[1] % w0:
            raise UserError(f"llm-pruner cannot align member widths {v.shape[1]} and {w0}")
        aligned.append(v.view(count, v.shape[1] // w0, w0).sum(dim=1))
    stacked = torch.stack(aligned)                           # [members, count, w0]
    if how == "sum":
        reduced = stacked.sum(0)
    elif how == "mean":
        reduced = stacked.mean(0)
    elif how == "max":
        reduced = stacked.max(0).values
    else:
        reduced = stacked.prod(0)
    return reduced.sum(dim=1)


def score(model, windows, group_sets, options, seed) -> Scoring:
    """`options`: checked ones (`suite.pruning.scoring.checked_options`; the pipeline checks before scoring)."""
    if offloaded(model):  # `--offload`: one layer resident, backprop layer by layer
        return _score_layerwise(model, windows, group_sets, options)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)                               # hf_prune.py: every parameter
    importance = options["importance"]
    batch_size = int(options["batch_size"])
    batch_size = batch_size if batch_size > 0 else auto_batch_size(model, windows.shape[1])
    try:
        with torch.enable_grad():
            fisher = backprop(model, windows, batch_size, fisher=importance == "element2")
        scores = {}
        with torch.no_grad():
            for gs in group_sets:
                per_member = []
                for member in gs.members:
                    weight = gs.linear(member).weight
                    if weight.grad is None:
                        raise UserError(f"llm-pruner: no gradient reached layer {gs.layer} {member.name}")
                    per_member.append(_member_importance(weight, weight.grad, fisher.get(id(weight)), gs, member,
                                                         importance))
                scores[(gs.layer, gs.kind)] = _aggregate(per_member, options["aggregation"]).cpu()
        fisher.clear()
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    return Scoring(scores, info={"importance": importance, "aggregation": options["aggregation"],
                                 "tokens": int(windows.numel()),
                                 "micro_batch": min(batch_size, len(windows)),  # windows batched, not the limit
                                 "micro_batches": -(-len(windows) // batch_size)})


def _score_layerwise(model, windows, group_sets, options) -> Scoring:
    """`score` for a model with offloaded weights: the same gradients from
    `layerwise.layer_gradients` (one decoder layer resident, its dL/dW scored as soon as it is
    complete, then dropped). `importance=element2` would keep a Fisher buffer per weight of every
    layer across the per-window passes: refused here."""
    importance = options["importance"]
    if importance == "element2":
        raise UserError("llm-pruner importance=element2 does not run with --offload yet (its Fisher "
                        "buffers span every layer); use element1 or vector, or no --offload")
    by_layer = {}
    for gs in group_sets:
        by_layer.setdefault(gs.layer, []).append(gs)
    scores = {}

    def score_layer(i, layer):
        with torch.no_grad():
            for gs in by_layer[i]:
                per_member = []
                for member in gs.members:
                    weight = gs.linear(member).weight
                    if weight.grad is None:
                        raise UserError(f"llm-pruner: no gradient reached layer {gs.layer} {member.name}")
                    per_member.append(_member_importance(weight, weight.grad, None, gs, member, importance))
                scores[(gs.layer, gs.kind)] = _aggregate(per_member, options["aggregation"]).cpu()

    batch = int(options["batch_size"])
    batch = batch if batch > 0 else auto_batch_size(model, windows.shape[1])
    layer_gradients(model, windows, score_layer, batch_size=batch, layers=sorted(by_layer))
    return Scoring(scores, info={"importance": importance, "aggregation": options["aggregation"],
                                 "tokens": int(windows.numel()), "backprop": "layer by layer",
                                 "micro_batch": min(batch, len(windows)), "micro_batches": -(-len(windows) // batch)})
