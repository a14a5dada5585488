"""Residual-sliced (SliceGPT) models as plain `transformers` models: the modeling file of a sliced directory.

`save_pruned` copies THIS FILE beside the weights of a model whose residual stream was rotated and
sliced (`suite/pruning/rotation.py`) and points the config's ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it in any process
without this suite. It imports nothing but torch and transformers.

The config is the dense model's config (``tie_word_embeddings: false``: the head and the embedding
are rotated by different bases) plus

    residual_widths     [w_0, ..., w_2L]: w_0 the embeddings' width, w_{2i+1} the residual stream's
                        width after layer i's attention, w_{2i+2} after its MLP (w_2L: the final
                        norm's and the head's input width; the dense hidden_size unless the head was
                        sliced too)
    residual_norm_eps   the epsilon of every residual norm
    head_bias           whether the head has a bias (a LayerNorm's bias folded into it: OPT)

Each class builds the dense architecture (on the meta device inside `from_pretrained`), then cuts
every Linear that reads or writes the residual stream to its width, replaces every residual norm
by a `ResidualRMSNorm` (weights folded into the Linears that read it) and gives each decoder layer
its two shortcut matrices (``attn_shortcut_Q`` [w_2i, w_2i+1], ``mlp_shortcut_Q`` [w_2i+1, w_2i+2]),
which rotate the residual into the next block's basis: as the authors' compressed layers
(microsoft/TransformerCompression `src/slicegpt/adapters/llama_adapter.py`
`CompressedLlamaDecoderLayer`, `opt_adapter.py` `CompressedOPTDecoderLayer`, `modules.py` `RMSN`).
A family is one `Layout` (where its residual readers and writers live) and one class line.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import (LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)

CONFIG_KEY = "residual_widths"


@dataclass(frozen=True)
class Layout:
    """Where a family's residual stream is read and written (module paths; layer-relative inside a layer).

    layers: the decoder layers' ModuleList; embeddings: the modules whose outputs are summed into the
    stream (OPT: tokens and learned positions); final_norm: the norm after the last layer;
    norms: (before attention, before MLP); attention_inputs / mlp_inputs: the Linears reading those
    norms' outputs; attention_output / mlp_output: the Linears writing the stream; mlp: the MLP module
    (None: OPT's fc1 -> activation_fn -> fc2 in the layer itself).
    """

    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    norms: tuple[str, str]
    attention: str
    attention_inputs: tuple[str, ...]
    attention_output: str
    mlp_inputs: tuple[str, ...]
    mlp_output: str
    mlp: str | None = "mlp"


LLAMA_LAYOUT = Layout(
    layers="model.layers", embeddings=("model.embed_tokens",), final_norm="model.norm",
    norms=("input_layernorm", "post_attention_layernorm"), attention="self_attn",
    attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attention_output="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj")
PHI3_LAYOUT = replace(LLAMA_LAYOUT, attention_inputs=("self_attn.qkv_proj",), mlp_inputs=("mlp.gate_up_proj",))
OPT_LAYOUT = Layout(
    layers="model.decoder.layers", embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm", norms=("self_attn_layer_norm", "final_layer_norm"),
    attention="self_attn", attention_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_output="self_attn.out_proj", mlp_inputs=("fc1",), mlp_output="fc2", mlp=None)


class ResidualRMSNorm(nn.Module):
    """x / sqrt(sum(x²) / full_width + eps) over the last dimension (no weight: folded downstream).

    x: [..., width]. Dividing by the DENSE width `full_width` (not `width`) makes a sliced stream
    normalise as the unsliced one with its deleted directions zeroed (the authors' `RMSN`, which
    divides by `mean_dim` = the model's hidden size; their eps is fixed at 1e-5, here the model's own).
    Computed in float32 as transformers' RMSNorms are.
    """

    def __init__(self, width: int, full_width: int, eps: float):
        super().__init__()
        self.width, self.full_width, self.eps = int(width), int(full_width), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        return (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.full_width + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.width}, full_width={self.full_width}, eps={self.eps}"


class ShortcutLayer:
    """Mixin of a decoder layer whose residual connections carry shortcut matrices:

        h = residual @ attn_shortcut_Q + attention(norm_1(residual))
        out = h @ mlp_shortcut_Q + mlp(norm_2(h))

    (a shortcut None is the plain residual add). The attention receives the keyword arguments the
    model passes the layer, as the families' own layers do; dropouts as the family's layer applies
    them (Phi-3's `resid_*_dropout` modules, OPT's `dropout` probability)."""

    layout: Layout
    attn_shortcut_Q: torch.Tensor | None
    mlp_shortcut_Q: torch.Tensor | None

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("a sliced decoder layer takes its arguments by keyword, hidden_states first")
        lay = self.layout
        h = self.get_submodule(lay.norms[0])(hidden_states)
        h = self.get_submodule(lay.attention)(hidden_states=h, **kwargs)[0]
        h = _shortcut(hidden_states, self.attn_shortcut_Q) + self._dropout(h, "resid_attn_dropout")
        residual = h
        h = self.get_submodule(lay.norms[1])(h)
        if lay.mlp is not None:
            h = self.get_submodule(lay.mlp)(h)
        else:
            h = self.fc2(self.activation_fn(self.fc1(h)))
        return _shortcut(residual, self.mlp_shortcut_Q) + self._dropout(h, "resid_mlp_dropout")

    def _dropout(self, h, name):
        module = getattr(self, name, None)
        if module is not None:
            return module(h)
        p = getattr(self, "dropout", None)
        return nn.functional.dropout(h, p=p, training=self.training) if isinstance(p, float) else h


def _shortcut(x: torch.Tensor, q) -> torch.Tensor:
    return x if q is None else torch.matmul(x, q.to(x.dtype))


_CLASSES: dict = {}


def make_shortcut_layer(layer: nn.Module, layout: Layout) -> None:
    """Give `layer` the `ShortcutLayer` forward (its class becomes Sliced<class>) with no shortcuts yet."""
    if not isinstance(layer, ShortcutLayer):
        base = type(layer)
        if base not in _CLASSES:
            _CLASSES[base] = type(f"Sliced{base.__name__}", (ShortcutLayer, base), {"layout": layout})
        layer.__class__ = _CLASSES[base]
    for name in ("attn_shortcut_Q", "mlp_shortcut_Q"):
        if name not in layer._parameters:
            layer.register_parameter(name, None)


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_bias: bool = True) -> None:
    """`linear` with new weight [out, in] (and bias [out]; `keep_bias` False drops an old bias not given)."""
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    elif not keep_bias:
        linear.bias = None


def set_embedding(embedding: nn.Embedding, weight: torch.Tensor) -> None:
    """`embedding` with a new table [num_embeddings, width]."""
    embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
    embedding.embedding_dim = weight.shape[1]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def layer_widths(widths: list[int], i: int) -> tuple[int, int, int]:
    """(input, after attention, after MLP) widths of layer i in `residual_widths`."""
    return widths[2 * i], widths[2 * i + 1], widths[2 * i + 2]


def slice_architecture(model: nn.Module, config, layout: Layout) -> None:
    """Cut a freshly built dense `model` to `config.residual_widths` (empty tensors, to be loaded)."""
    widths, full, eps = list(getattr(config, CONFIG_KEY)), config.hidden_size, config.residual_norm_eps
    layers = model.get_submodule(layout.layers)
    if len(widths) != 2 * len(layers) + 1:
        raise ValueError(f"{CONFIG_KEY} has {len(widths)} entries, a {len(layers)}-layer model needs {2 * len(layers) + 1}")

    def empty(*shape, like):
        return torch.empty(*shape, device=like.device, dtype=like.dtype)

    for path in layout.embeddings:
        emb = model.get_submodule(path)
        set_embedding(emb, empty(emb.num_embeddings, widths[0], like=emb.weight))
    for i, layer in enumerate(layers):
        d_in, d_mid, d_out = layer_widths(widths, i)
        for name, rows, cols in ([(n, None, d_in) for n in layout.attention_inputs]
                                 + [(layout.attention_output, d_mid, None)]
                                 + [(n, None, d_mid) for n in layout.mlp_inputs] + [(layout.mlp_output, d_out, None)]):
            lin = layer.get_submodule(name)
            rows, cols = rows or lin.out_features, cols or lin.in_features
            set_linear(lin, empty(rows, cols, like=lin.weight),
                       None if lin.bias is None else empty(rows, like=lin.weight))
        for name, width in zip(layout.norms, (d_in, d_mid)):
            set_module(layer, name, ResidualRMSNorm(width, full, eps))
        make_shortcut_layer(layer, layout)
        ref = layer.get_submodule(layout.attention_output).weight
        layer.attn_shortcut_Q = nn.Parameter(empty(d_in, d_mid, like=ref))
        layer.mlp_shortcut_Q = nn.Parameter(empty(d_mid, d_out, like=ref))
    set_module(model, layout.final_norm, ResidualRMSNorm(widths[-1], full, eps))
    head = model.get_output_embeddings()
    set_linear(head, empty(head.out_features, widths[-1], like=head.weight),
               empty(head.out_features, like=head.weight) if getattr(config, "head_bias", False) else None,
               keep_bias=False)


class _Sliced:
    """Mixin of the sliced classes: the dense __init__, then the residual stream cut to its widths."""

    layout: Layout

    def __init__(self, config):
        config.tie_word_embeddings = False  # rotated by different bases: never one tensor
        super().__init__(config)  # the transformers class after this mixin: the dense architecture
        slice_architecture(self, config, self.layout)


def _sliced_class(base, layout: Layout) -> type:
    """Sliced<base>: `_Sliced` over a transformers CausalLM class, with the family's layout."""
    return type(f"Sliced{base.__name__}", (_Sliced, base), {"layout": layout, "__module__": __name__})


# model_type -> sliced class (its `layout` is the family's); each is also this module's attribute
# of its name, which the config's `auto_map` names (e.g. modeling_sliced.SlicedLlamaForCausalLM)
FAMILIES = {"llama": _sliced_class(LlamaForCausalLM, LLAMA_LAYOUT),
            "mistral": _sliced_class(MistralForCausalLM, LLAMA_LAYOUT),
            "qwen2": _sliced_class(Qwen2ForCausalLM, LLAMA_LAYOUT),
            "qwen3": _sliced_class(Qwen3ForCausalLM, LLAMA_LAYOUT),
            "phi3": _sliced_class(Phi3ForCausalLM, PHI3_LAYOUT),
            "opt": _sliced_class(OPTForCausalLM, OPT_LAYOUT)}
globals().update({cls.__name__: cls for cls in FAMILIES.values()})
