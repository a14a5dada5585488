"""Pruned decoder models as plain `transformers` models: the modeling file of a pruned directory.

Families: LLaMA, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, OPT, BLOOM.

`save_pruned` copies THIS FILE into every pruned directory and points the config's ``auto_map`` at
it, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads a pruned model
in any process (lm-eval, PEFT/TRL scripts, serving stacks) without this suite, the mechanism the
hub's heterogeneous models use. It must therefore import nothing but torch and transformers.

The config is the dense model's config plus ``pruned_layers``, one entry per decoder layer:

    {"heads": 6, "kv_heads": 2, "channels": 1200, "biases": ["mlp.down_proj", ...],
     "alibi_heads": [0, 3, ...]}            # BLOOM only: the kept heads' original indices

Each class builds the dense architecture (transformers builds it on the meta device inside
`from_pretrained`, so nothing dense is materialised) and then replaces every prunable Linear by one
of the pruned shape, with a bias exactly where ``biases`` says (FLAP adds some). A layer with zero
heads outputs its out-projection bias (or zeros) from attention, as `suite/pruning/architectures.py`'s
sliced models do, and writes a one-head placeholder into the KV cache (`_keep_cache_length`);
BLOOM layers add their kept heads' own ALiBi slopes. Plan indices (which heads
were kept, in the original numbering) stay in ``plan.json`` beside the config.

A LLaMA-like family (q/k/v/o + gate/up/down, `num_key_value_groups`) is added with one line in
FAMILIES naming its transformers CausalLM class. Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 are
such families: everything that sets them apart lives in modules with nothing to slice and in the
config, which the pruned directory keeps whole (Qwen2's q/k/v biases are listed in ``biases``;
Qwen3's and Gemma 3's q/k norms act per head over head_dim; Gemma 2's attention and final soft
capping, sliding windows and alternating ``layer_types``; Gemma 3's local/global pattern and its
per-layer-type rope bases; Mistral's and Qwen2's sliding windows). Phi-3 adds its fused layout:
``qkv_proj`` rows [q heads; k heads; v heads] and ``gate_up_proj`` rows [gate; up], sized per layer,
and an attention that locates its k section from this layer's own head count
(`_PrunedPhi3Attention`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (BloomForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM,
                          MistralForCausalLM, OPTForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)

CONFIG_KEY = "pruned_layers"


def _replace_linear(layer: nn.Module, name: str, in_features: int, out_features: int, bias: bool) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(parent) if parent else layer
    old = getattr(owner, leaf)
    setattr(owner, leaf, nn.Linear(in_features, out_features, bias=bias,
                                   device=old.weight.device, dtype=old.weight.dtype))


def _zero_heads_output(out_proj: nn.Linear, like: torch.Tensor) -> torch.Tensor:
    """What an attention block with zero heads outputs: its out-projection's bias (or zeros; also
    where the projection's forward adds no bias, `adds_bias = False`, as the suite's BLOOM
    `TensorParallelSum`)."""
    shape = (*like.shape[:-1], out_proj.out_features)
    if out_proj.bias is None or not getattr(out_proj, "adds_bias", True):
        return like.new_zeros(shape)
    return out_proj.bias.expand(shape).to(like.dtype)


CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")  # names across versions/models


def _keep_cache_length(attn, hidden_states: torch.Tensor, kwargs: dict) -> None:
    """Write a one-head all-zero key/value entry [batch, 1, new tokens, head_dim] for a dropped attention.

    transformers reads the cached sequence length (positions, causal mask) from layer 0's entry
    (`Cache.get_seq_length(layer_idx=0)`) and counts an entry with no elements as empty, so a dropped
    attention that wrote nothing (or zero heads) made cached decoding use wrong positions. Nothing
    reads the placeholder; it costs one head of cache per dropped layer.
    """
    cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
    if cache is None or not hasattr(cache, "update"):
        return
    batch, length = hidden_states.shape[:2]
    placeholder = hidden_states.new_zeros(batch, 1, length, attn.head_dim)
    cache.update(placeholder, placeholder, attn.layer_idx)


# --------------------------------------------------------------------------- LLaMA-like
class _NoHeadsLlamaAttention:
    def forward(self, hidden_states, *args, **kwargs):
        _keep_cache_length(self, hidden_states, kwargs)
        return _zero_heads_output(self.o_proj, hidden_states), None


def _prune_llama_layer(layer, spec: dict, config) -> None:
    attn, hidden = layer.self_attn, config.hidden_size
    q, kv, ch = spec["heads"] * attn.head_dim, spec["kv_heads"] * attn.head_dim, spec["channels"]
    _replace_linears(layer, spec, (("self_attn.q_proj", hidden, q), ("self_attn.k_proj", hidden, kv),
                                   ("self_attn.v_proj", hidden, kv), ("self_attn.o_proj", q, hidden),
                                   ("mlp.gate_proj", hidden, ch), ("mlp.up_proj", hidden, ch),
                                   ("mlp.down_proj", ch, hidden)))
    _set_grouped_heads(attn, spec)


def _replace_linears(layer, spec: dict, table) -> None:
    """Every (name, in_features, out_features) of `table` a fresh Linear, biased where ``biases`` says."""
    biases = set(spec.get("biases", ()))
    for name, fin, fout in table:
        _replace_linear(layer, name, fin, fout, name in biases)


def _set_grouped_heads(attn, spec: dict) -> None:
    """GQA attention's per-layer head attributes; zero heads: the attention is dropped."""
    attn.num_key_value_groups = spec["heads"] // spec["kv_heads"] if spec["heads"] else 1
    if not spec["heads"]:
        _swap_class(attn, _NoHeadsLlamaAttention, "NoHeads")


_CLASSES: dict = {}


def _swap_class(module: nn.Module, mixin: type, prefix: str) -> None:
    """Give `module` the (cached) class `mixin` + its own class, named prefix + its class name."""
    key = (mixin, type(module))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{prefix}{type(module).__name__}", (mixin, type(module)), {})
    module.__class__ = _CLASSES[key]


# --------------------------------------------------------------------------- Phi-3 (fused projections)
class _LayerConfig:
    """The model config as one sliced layer sees it: its own num_attention_heads, the rest shared."""

    def __init__(self, config, num_heads: int):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "num_attention_heads", num_heads)

    def __getattr__(self, name):
        return getattr(self._config, name)

    def __setattr__(self, name, value):  # e.g. an attention-implementation switch: the model's config
        setattr(self._config, name, value)


class _PrunedPhi3Attention:
    """Mixin: `self.config` answers this layer's kept head count (Phi3Attention.forward splits
    qkv_proj's output at ``config.num_attention_heads * head_dim``)."""

    @property
    def config(self):
        return _LayerConfig(self.__dict__["config"], self.num_heads)

    @config.setter
    def config(self, value):
        self.__dict__["config"] = value


def _prune_phi3_layer(layer, spec: dict, config) -> None:
    attn, hidden = layer.self_attn, config.hidden_size
    q, kv, ch = spec["heads"] * attn.head_dim, spec["kv_heads"] * attn.head_dim, spec["channels"]
    _replace_linears(layer, spec, (("self_attn.qkv_proj", hidden, q + 2 * kv), ("self_attn.o_proj", q, hidden),
                                   ("mlp.gate_up_proj", hidden, 2 * ch), ("mlp.down_proj", ch, hidden)))
    attn.num_heads, attn.num_key_value_heads = spec["heads"], spec["kv_heads"]
    _swap_class(attn, _PrunedPhi3Attention, "Pruned")
    _set_grouped_heads(attn, spec)


# --------------------------------------------------------------------------- OPT
class _NoHeadsOPTAttention:
    def forward(self, hidden_states, *args, **kwargs):
        _keep_cache_length(self, hidden_states, kwargs)
        return _zero_heads_output(self.out_proj, hidden_states), None


def _prune_opt_layer(layer, spec: dict, config) -> None:
    attn, hidden = layer.self_attn, config.hidden_size
    q, ch = spec["heads"] * attn.head_dim, spec["channels"]
    _replace_linears(layer, spec, (("self_attn.q_proj", hidden, q), ("self_attn.k_proj", hidden, q),
                                   ("self_attn.v_proj", hidden, q), ("self_attn.out_proj", q, hidden),
                                   ("fc1", hidden, ch), ("fc2", ch, hidden)))
    attn.num_heads = spec["heads"]
    if not spec["heads"]:
        _swap_class(attn, _NoHeadsOPTAttention, "NoHeads")


# --------------------------------------------------------------------------- BLOOM
class _AlibiHeadsBloomAttention:
    """Select this layer's kept heads from the model-wide ALiBi tensor (built for n_head heads)."""

    def forward(self, hidden_states, residual, alibi, *args, **kwargs):
        batch = hidden_states.shape[0]
        alibi = alibi.view(batch, self.total_heads, *alibi.shape[1:])
        heads = torch.as_tensor(self.kept_alibi_heads, dtype=torch.long, device=alibi.device)
        alibi = alibi.index_select(1, heads).reshape(batch * self.num_heads, *alibi.shape[2:])
        return super().forward(hidden_states, residual, alibi, *args, **kwargs)


class _NoHeadsBloomAttention:
    def forward(self, hidden_states, residual, *args, **kwargs):
        _keep_cache_length(self, hidden_states, kwargs)
        return residual + _zero_heads_output(self.dense, hidden_states), None


def _prune_bloom_layer(layer, spec: dict, config) -> None:
    attn, hidden = layer.self_attention, config.hidden_size
    q, ch = spec["heads"] * attn.head_dim, spec["channels"]
    _replace_linears(layer, spec, (("self_attention.query_key_value", hidden, 3 * q),
                                   ("self_attention.dense", q, hidden), ("mlp.dense_h_to_4h", hidden, ch),
                                   ("mlp.dense_4h_to_h", ch, hidden)))
    heads = spec.get("alibi_heads", list(range(spec["heads"])))
    attn.kept_alibi_heads = [int(h) for h in heads]  # a plain list: meta-device loading leaves it alone
    attn.total_heads = config.n_head
    attn.num_heads = layer.num_heads = spec["heads"]
    mixin = _AlibiHeadsBloomAttention if spec["heads"] else _NoHeadsBloomAttention
    _swap_class(attn, mixin, "Pruned")


# --------------------------------------------------------------------------- model classes
class _Pruned:
    """Mixin of the pruned classes: the dense __init__, then every layer cut to its `pruned_layers` entry."""

    def __init__(self, config):
        super().__init__(config)  # the transformers class after this mixin: the dense architecture
        layers, specs = self._decoder_layers(), getattr(config, CONFIG_KEY)
        if len(specs) != len(layers):
            raise ValueError(f"{CONFIG_KEY} has {len(specs)} entries, the model has {len(layers)} layers")
        for layer, spec in zip(layers, specs):
            self._prune_layer(layer, spec, config)


class _LlamaLike(_Pruned):
    """The LLaMA layout: ``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``."""

    _prune_layer = staticmethod(_prune_llama_layer)

    def _decoder_layers(self):
        return self.model.layers


class PrunedLlamaForCausalLM(_LlamaLike, LlamaForCausalLM):
    pass


class PrunedOPTForCausalLM(_Pruned, OPTForCausalLM):
    _prune_layer = staticmethod(_prune_opt_layer)

    def _decoder_layers(self):
        return self.model.decoder.layers


class PrunedMistralForCausalLM(_LlamaLike, MistralForCausalLM):
    pass


class PrunedQwen2ForCausalLM(_LlamaLike, Qwen2ForCausalLM):
    pass


class PrunedQwen3ForCausalLM(_LlamaLike, Qwen3ForCausalLM):
    pass


class PrunedGemma2ForCausalLM(_LlamaLike, Gemma2ForCausalLM):
    pass


class PrunedGemma3ForCausalLM(_LlamaLike, Gemma3ForCausalLM):
    pass


class PrunedPhi3ForCausalLM(_LlamaLike, Phi3ForCausalLM):
    _prune_layer = staticmethod(_prune_phi3_layer)


class PrunedBloomForCausalLM(_Pruned, BloomForCausalLM):
    _prune_layer = staticmethod(_prune_bloom_layer)

    def _decoder_layers(self):
        return self.transformer.h


# model_type -> pruned class. A LLaMA-like family: `class PrunedXForCausalLM(_LlamaLike, XForCausalLM)`
# and one entry here
FAMILIES = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
    "qwen3": PrunedQwen3ForCausalLM,
    "gemma2": PrunedGemma2ForCausalLM,
    "gemma3_text": PrunedGemma3ForCausalLM,
    "phi3": PrunedPhi3ForCausalLM,
    "opt": PrunedOPTForCausalLM,
    "bloom": PrunedBloomForCausalLM,
}
