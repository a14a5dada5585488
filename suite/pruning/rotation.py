"""Rotating and slicing the residual stream (SliceGPT: Ashkboos et al. 2024, ICLR, arXiv 2401.15024).

Two steps, for every family whose adapter has a `residual_layout` (architectures.py):

1. `fuse(model)`: every residual norm's scale (and bias) folded into the Linears that read its
   output (W ← W·diag(γ), b ← b + W·β), the head untied from the embedding; for LayerNorm families
   (OPT) the mean subtraction is baked into every writer of the residual stream (embedding rows,
   attention and MLP output projections centred), so every norm becomes a plain RMS norm
   (`modeling_sliced.ResidualRMSNorm`). The model's function is unchanged (paper §3.1-3.2,
   microsoft/TransformerCompression `src/slicegpt/layernorm_fusion.py`: `fuse_modules`,
   `fuse_ln_linear`, `bake_mean_into_linear`, `replace_layers`).
2. `rotate_and_slice(model, windows, width)`: layer by layer on the calibration windows (the shared
   `layerwise.LayerPass`, one layer resident), the PCA of the residual stream at each block input
   (H = Σ XᵀX over all tokens in float64 on the compute device, damped by 1 % of its mean diagonal,
   `eigh`, eigenvectors by decreasing eigenvalue: `principal_basis`) gives an orthogonal Q; the
   embeddings and the Linears reading the stream are rotated by Q (W ← W·Q), those writing it by Qᵀ
   (W ← Qᵀ·W, b ← Qᵀ·b), and only the first `width` directions are kept. Each block's residual
   carries a shortcut matrix Q_inᵀ·Q_out, sliced on both sides (paper Eq. 9; the authors'
   `rotate.py` `rotate_and_slice_sequential`, `pca_calc`): two PCAs per layer, at the attention's
   and at the MLP's input, each computed on the signals of the already sliced model before it.
   The last layer's output and the head stay at the dense width unless `slice_head` (their
   `do_slice_head`).

Sliced norms divide by the DENSE width (their `RMSN(mean_dim=hidden_size)`): the sliced model is the
rotated unsliced one with every deleted direction zeroed (tests/test_rotation.py checks both
identities). Differences from the authors' code, deliberate: their `fuse_modules` centres the
embedding rows for every family, which changes an RMSNorm model (SmolLM2-135M: perplexity 52.56 ->
52.62 after their fusion), so here only LayerNorm families are centred unless `centre_embeddings`
(results/notes/slicegpt.md §3: with it the two codes agree); the norms keep the model's own epsilon
(theirs is 1e-5 whatever the model); the shortcut products are formed in float64 and cast once
(theirs multiply in the model dtype); calibration windows are whole windows without padding, so
their `ignore_masks` have nothing to mask. Memory: one layer and the carried hidden states (as every
LayerPass), plus one [hidden, hidden] float64 matrix per PCA on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError
from suite.pruning.layerwise import LayerPass, parameter_count, resident_layer
from suite.pruning.modeling_sliced import (CONFIG_KEY, Layout, ResidualRMSNorm, layer_widths, make_shortcut_layer,
                                           set_embedding, set_linear, set_module)

DAMPING = 0.01  # of the mean diagonal of H (the authors' pca_calc)


def residual_layout(model) -> Layout:
    """The family's `Layout`, or UserError (one line) where the residual stream cannot be sliced:
    a family whose norms break the invariance (Gemma 2/3; BLOOM, see its adapter), OPT with its norm
    after the blocks (350m) or a projection around the decoder, a model already sliced this way, or
    one already pruned otherwise: heads, channels or whole layers (a checkpoint with both is not a
    format this suite writes)."""
    adapter = adapter_for(model)
    config = model.config
    if adapter.residual_layout is None:
        raise UserError(f"cannot slice the residual stream of {config.model_type}: {adapter.residual_refusal}")
    if getattr(config, CONFIG_KEY, None) is not None or any(isinstance(m, ResidualRMSNorm) for m in model.modules()):
        raise UserError("this model's residual stream was already rotated and sliced (SliceGPT); "
                        "prune the dense model instead")
    if getattr(config, "pruned_layers", None) is not None or getattr(model, "pruning_plan", None) is not None:
        raise UserError("this model was pruned already (heads, channels or whole layers); slicing its residual "
                        "stream too would need a checkpoint format for both: slice the dense model")
    if config.model_type == "opt" and (not getattr(config, "do_layer_norm_before", True)
                                       or getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size):
        raise UserError("OPT with the norm after its blocks or an embedding projection (opt-350m) keeps no "
                        "rotation-invariant residual stream")
    return adapter.residual_layout


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return float(getattr(norm, name))
    raise UserError(f"cannot read the epsilon of {type(norm).__name__}")


def _fold(norm: nn.Module, readers) -> None:
    """W ← W·diag(γ), b ← b + W·β for each Linear reading `norm`'s output (float64, cast back)."""
    gamma = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else None
    beta = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else None
    for lin in readers:
        w = lin.weight.detach().double()
        bias = None
        if beta is not None:
            old = lin.bias.detach().double() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64,
                                                                                      device=w.device)
            bias = (old + w @ beta.to(w.device)).to(lin.weight.dtype)
        new = w * gamma.to(w.device) if gamma is not None else w
        set_linear(lin, new.to(lin.weight.dtype), bias)


def _centre(lin: nn.Linear) -> None:
    """Bake the mean subtraction into a writer of the stream: every output centred over its rows."""
    w = lin.weight.detach().double()
    bias = None if lin.bias is None else (lin.bias.detach().double() - lin.bias.detach().double().mean()).to(lin.weight.dtype)
    set_linear(lin, (w - w.mean(dim=0, keepdim=True)).to(lin.weight.dtype), bias)


def fuse(model, centre_embeddings: bool = False) -> float:
    """Fold every residual norm into its readers (see the module docstring); returns the norms' epsilon.

    In place. Raises UserError where `residual_layout` refuses. The head is untied from the input
    embedding (``config.tie_word_embeddings = False``); every residual norm becomes
    `ResidualRMSNorm(hidden, hidden, eps)` (no weight). Logits are unchanged up to rounding.

    centre_embeddings: also subtract each embedding row's mean in an RMSNorm family, as the authors'
    `fuse_modules` does for EVERY family ("We add the mean subtraction to the first embeddings").
    Exact for LayerNorm families (done there regardless); for RMSNorm families it CHANGES the model
    (RMSNorm is not invariant to the mean), so it is off by default and exists to reproduce their
    code (results/notes/slicegpt.md §3).
    """
    layout = residual_layout(model)
    full = model.config.hidden_size
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())  # its own tensor from now on
    model.config.tie_word_embeddings = False
    final = model.get_submodule(layout.final_norm)
    eps = _norm_eps(final)
    layernorm = isinstance(final, nn.LayerNorm)
    with torch.no_grad():
        if layernorm or centre_embeddings:
            for path in layout.embeddings:
                emb = model.get_submodule(path)
                w = emb.weight.detach().double()
                set_embedding(emb, (w - w.mean(dim=-1, keepdim=True)).to(emb.weight.dtype))
        for i in range(len(model.get_submodule(layout.layers))):
            with resident_layer(model, i) as layer:
                _fold(layer.get_submodule(layout.norms[0]), [layer.get_submodule(n) for n in layout.attention_inputs])
                _fold(layer.get_submodule(layout.norms[1]), [layer.get_submodule(n) for n in layout.mlp_inputs])
                if layernorm:
                    _centre(layer.get_submodule(layout.attention_output))
                    _centre(layer.get_submodule(layout.mlp_output))
                for name in layout.norms:
                    set_module(layer, name, ResidualRMSNorm(full, full, eps))
        _fold(final, [head])
        set_module(model, layout.final_norm, ResidualRMSNorm(full, full, eps))
    return eps


def principal_basis(H: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of H + 0.01·mean(diag H)·I as columns, by decreasing eigenvalue ([D, D], H's dtype).

    The authors' `pca_calc` after its accumulation. H is not modified."""
    H = H + DAMPING * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    values, vectors = torch.linalg.eigh(H)
    return vectors[:, torch.argsort(values, descending=True)]


def _gram(H: torch.Tensor | None, x: torch.Tensor, device) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float64)
    g = x.T @ x
    return g if H is None else H + g


def residual_widths(n_layers: int, width: int, full: int, slice_head: bool) -> list[int]:
    """`config.residual_widths` of a constant slicing (the authors' `ConstSlicingScheduler`): d′
    everywhere but the last layer's output (and the head), which stay at `full` unless `slice_head`."""
    return [int(width)] + sum(([int(width), int(width) if (i < n_layers - 1 or slice_head) else full]
                               for i in range(n_layers)), [])


@dataclass
class Sliced:
    """What `rotate_and_slice` did: the widths written to the config, and (keep_bases) the bases used."""

    widths: list[int]
    eps: float
    bases: list[torch.Tensor] = field(default_factory=list)  # [Q_embeddings, Q_mid_0, Q_out_0, ...] (cpu float64)


def rotate_and_slice(model, windows: torch.Tensor | None, width: int, slice_head: bool = False, batch_size: int = 1,
                     bases: list[torch.Tensor] | None = None, keep_bases: bool = False,
                     centre_embeddings: bool = False) -> Sliced:
    """Fuse, then rotate and slice `model`'s residual stream to `width` in place (module docstring).

    windows: [nsamples, seqlen] token ids (the calibration); width: the kept directions d′
    (1 ≤ d′ ≤ hidden_size; hidden_size rotates without slicing); slice_head: the last layer's output
    and the head at d′ too; batch_size: windows per micro-batch of the layer pass; bases: given
    orthogonal [D, D] matrices (2·layers + 1, as `Sliced.bases`) used instead of the PCAs (a test's
    fixed rotation; then `windows` only drive the pass); centre_embeddings: see `fuse`. Sets ``config.residual_widths``,
    ``residual_norm_eps`` and ``head_bias`` (the sliced checkpoint's, `modeling_sliced`).
    Raises UserError for a width out of range or a family `residual_layout` refuses.
    """
    layout = residual_layout(model)
    full = model.config.hidden_size
    if not 1 <= int(width) <= full:
        raise UserError(f"slicegpt: width must be in 1..{full} (the hidden size), got {width}")
    eps = fuse(model, centre_embeddings)
    n = len(model.get_submodule(layout.layers))
    widths = residual_widths(n, width, full, slice_head)
    given = iter(bases) if bases is not None else None
    kept: list[torch.Tensor] = []
    lp = LayerPass(model, windows, batch_size=batch_size)
    dev = lp.device

    def basis(H):
        Q = next(given).to(dev, torch.float64) if given is not None else principal_basis(H)
        if keep_bases:
            kept.append(Q.cpu())
        return Q

    def rotated(w: torch.Tensor, left=None, right=None) -> torch.Tensor:
        out = w.detach().to(dev, torch.float64)
        out = left @ out if left is not None else out
        out = out @ right if right is not None else out
        return out.to(w.device, w.dtype)

    with torch.no_grad():
        H = None
        for h in lp.hidden:
            H = _gram(H, h, dev)
        Q = basis(H)
        for path in layout.embeddings:
            emb = model.get_submodule(path)
            set_embedding(emb, rotated(emb.weight, right=Q[:, :widths[0]]))
        for i in range(n):
            d_in, d_mid, d_out = layer_widths(widths, i)
            with lp.resident(i) as layer:
                dtype = layer.get_submodule(layout.attention_output).weight.dtype
                make_shortcut_layer(layer, layout)
                q_in = Q[:, :d_in]
                for name in layout.attention_inputs:
                    lin = layer.get_submodule(name)
                    set_linear(lin, rotated(lin.weight, right=q_in))
                set_module(layer, layout.norms[0], ResidualRMSNorm(d_in, full, eps))
                layer.attn_shortcut_Q = nn.Parameter(q_in.T.to(dtype), requires_grad=False)
                layer.mlp_shortcut_Q = None
                q_cast = q_in.to(dtype)
                state = {"H": None}

                def enter(module, args, kwargs):  # the carried stream (dense basis) into this layer's basis
                    return (torch.matmul(args[0], q_cast.to(args[0].device)), *args[1:]), kwargs

                def gram(module, args):
                    state["H"] = _gram(state["H"], args[0], dev)

                hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True),
                         layer.get_submodule(layout.norms[1]).register_forward_pre_hook(gram)]
                try:
                    lp.forward(i)  # the attention's output added: the MLP's input signal
                    hooks.pop().remove()
                    q_mid = basis(state["H"])[:, :d_mid]
                    out_lin = layer.get_submodule(layout.attention_output)
                    set_linear(out_lin, rotated(out_lin.weight, left=q_mid.T),
                               None if out_lin.bias is None else rotated(out_lin.bias[:, None], left=q_mid.T)[:, 0])
                    layer.attn_shortcut_Q = nn.Parameter((q_in.T @ q_mid).to(dtype), requires_grad=False)
                    for name in layout.mlp_inputs:
                        lin = layer.get_submodule(name)
                        set_linear(lin, rotated(lin.weight, right=q_mid))
                    set_module(layer, layout.norms[1], ResidualRMSNorm(d_mid, full, eps))
                    layer.mlp_shortcut_Q = nn.Parameter(q_mid.T.to(dtype), requires_grad=False)
                    outputs = lp.forward(i)  # the layer's output in the dense basis: the next block's input
                finally:
                    for hook in hooks:
                        hook.remove()
                H = None
                for h in outputs:
                    H = _gram(H, h, dev)
                Q = basis(H)
                q_out = Q[:, :d_out]
                down = layer.get_submodule(layout.mlp_output)
                set_linear(down, rotated(down.weight, left=q_out.T),
                           None if down.bias is None else rotated(down.bias[:, None], left=q_out.T)[:, 0])
                layer.mlp_shortcut_Q = nn.Parameter((q_mid.T @ q_out).to(dtype), requires_grad=False)
            lp.advance(outputs)
        head = model.get_output_embeddings()
        set_linear(head, rotated(head.weight, right=Q[:, :widths[-1]]))
        set_module(model, layout.final_norm, ResidualRMSNorm(widths[-1], full, eps))
    setattr(model.config, CONFIG_KEY, widths)
    model.config.residual_norm_eps = eps
    model.config.head_bias = head.bias is not None
    return Sliced(widths, eps, kept)


def sliced_parameters(model, width: int, slice_head: bool = False) -> int:
    """Parameters of `model` (dense, unfused or fused) after `rotate_and_slice(width, slice_head)`,
    from its shapes alone: every residual reader and writer at its sliced width, the shortcut
    matrices, the norms without weights (folded), the head untied; everything else as it is.

    The budget's count (`width_for_ratio`); tests/test_rotation.py checks it against a sliced model.
    """
    layout = residual_layout(model)
    full = model.config.hidden_size
    layers = model.get_submodule(layout.layers)
    n = len(layers)
    widths = residual_widths(n, width, full, slice_head)
    touched, new = {}, 0

    def touch(module):
        for p in module.parameters():
            touched[id(p)] = p.numel()

    def linear(lin, rows, cols, norm=None):
        nonlocal new
        touch(lin)
        bias = lin.bias is not None or (norm is not None and getattr(norm, "bias", None) is not None)
        new += rows * cols + (rows if bias else 0)

    for path in layout.embeddings:
        emb = model.get_submodule(path)
        touch(emb)
        new += emb.num_embeddings * widths[0]
    for i, layer in enumerate(layers):
        d_in, d_mid, d_out = layer_widths(widths, i)
        norm1, norm2 = (layer.get_submodule(name) for name in layout.norms)
        touch(norm1), touch(norm2)
        for name in layout.attention_inputs:
            linear(layer.get_submodule(name), layer.get_submodule(name).out_features, d_in, norm1)
        out = layer.get_submodule(layout.attention_output)
        linear(out, d_mid, out.in_features)
        for name in layout.mlp_inputs:
            linear(layer.get_submodule(name), layer.get_submodule(name).out_features, d_mid, norm2)
        down = layer.get_submodule(layout.mlp_output)
        linear(down, d_out, down.in_features)
        new += d_in * d_mid + d_mid * d_out
    final = model.get_submodule(layout.final_norm)
    touch(final)
    head = model.get_output_embeddings()
    linear(head, head.out_features, widths[-1], final)
    return parameter_count(model) - sum(touched.values()) + new


def width_for_ratio(model, ratio: float, round_to: int | None = None, slice_head: bool = False) -> tuple[int, int]:
    """(d′, its parameter count): the width, a multiple of `round_to` (1 if None), whose sliced model
    (`sliced_parameters`) is closest to (1 − ratio) × the dense model's parameters (the suite's ratio:
    a fraction of ALL parameters). Raises UserError when no width removes anything or the smallest
    width keeps more than the target (the untied head and the shortcut matrices cost parameters)."""
    full = model.config.hidden_size
    step = int(round_to or 1)
    if step < 1 or step > full:
        raise UserError(f"round_to must be in 1..{full} for slicegpt, got {round_to}")
    dense = parameter_count(model)
    target = (1.0 - float(ratio)) * dense
    counts = {d: sliced_parameters(model, d, slice_head) for d in range(step, full + 1, step)}
    smallest = min(counts)
    if counts[smallest] > target:
        raise UserError(f"slicegpt cannot reach ratio {ratio}: even width {smallest} keeps {counts[smallest]:,} of "
                        f"{dense:,} parameters (the untied head and the shortcut matrices stay)")
    width = min(counts, key=lambda d: (abs(counts[d] - target), d))
    if counts[width] >= dense:
        raise UserError(f"slicegpt at ratio {ratio} would remove nothing: the untied head and the shortcut matrices "
                        f"cost more than slicing to width {width} saves")
    return width, counts[width]
