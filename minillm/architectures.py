"""Per-architecture adapters: where the prunable groups of each decoder layer live.

A *group* is a set of weights that must be removed together (Torch-Pruning's dependency group,
LLM-Pruner's coupled structure): one attention head (its q/k/v rows and its out-projection
columns) or one MLP channel (its up/gate rows and its down-projection column). Every group of a
kind in a layer has the same shape, so a layer's heads (or channels) form one `GroupSet`: a count
and a list of `Member`s, each saying "group g owns rows (dim 0, bias included) or columns (dim 1)
[g*width, (g+1)*width) of this Linear". Methods score groups from these members; the budget
counts their parameters; slicing removes them. The same table drives all three, per architecture:

    LLaMA (MHA/GQA) q/k/v_proj rows, o_proj cols   | gate/up_proj rows, down_proj col
    OPT             q/k/v_proj rows (+bias), out_proj cols | fc1 row (+bias), fc2 col
    BLOOM           query_key_value rows [n_head, 3, head_dim] (+bias), dense cols
                                                   | dense_h_to_4h row (+bias), dense_4h_to_h col

GQA heads come in two modes: ``kv-group`` (a kv head with all the q heads that read it: removing
it keeps `repeat_kv` valid trivially) and ``q-head`` (single q heads; the budget removes the same
number from every kv group so `repeat_kv` stays valid, and k/v are never removed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.errors import UserError
from minillm.modeling_pruned import _AlibiHeadsBloomAttention

HEAD_MODES = ("q-head", "kv-group")


@dataclass(frozen=True)
class Member:
    """One Linear's share of each group in a GroupSet.

    name:  module path inside the decoder layer (e.g. "self_attn.q_proj")
    dim:   0 = the group owns output rows (and bias entries), 1 = it owns input columns
    width: rows/columns per group; group g owns [g*width, (g+1)*width)
    """

    name: str
    dim: int
    width: int


@dataclass
class GroupSet:
    """All groups of one kind ("heads" or "channels") in one decoder layer."""

    layer: int
    kind: str
    count: int
    members: tuple[Member, ...]
    module: nn.Module  # the decoder layer, to resolve member names

    def linear(self, member: Member) -> nn.Linear:
        return self.module.get_submodule(member.name)

    @property
    def output(self) -> Member:
        """The member whose INPUT carries the group's feature map (o_proj / down_proj columns)."""
        return next(m for m in self.members if m.dim == 1)

    def weight_blocks(self, member: Member) -> torch.Tensor:
        """The member's weight as [count, width, other]: block g is group g's share."""
        w = self.linear(member).weight
        w = w if member.dim == 0 else w.t()
        return w.reshape(self.count, member.width, w.shape[1])

    def params_per_group(self) -> int:
        """Parameters removed with one group (weights, and bias entries of row members)."""
        total = 0
        for m in self.members:
            lin = self.linear(m)
            other = lin.in_features if m.dim == 0 else lin.out_features
            total += m.width * other + (m.width if m.dim == 0 and lin.bias is not None else 0)
        return total


# --------------------------------------------------------------------------- base adapter
class Adapter:
    """Architecture-specific facts. Subclasses fill the class attributes and hooks."""

    model_types: tuple[str, ...] = ()
    attention: str = ""  # attention module path in a decoder layer
    # (name, dim, unit) where unit is "q" (indexed by q heads), "kv" (kv heads) or "qkv" (BLOOM fused)
    head_members: tuple[tuple[str, int, str], ...] = ()
    channel_members: tuple[tuple[str, int], ...] = ()
    # Linear names (suffixes, PEFT's `target_modules`) that LoRA recovery adapts: LLM-Pruner's
    # q/k/v/o/gate/up/down for LLaMA and each family's equivalents
    lora_targets: tuple[str, ...] = ()

    def layers(self, model) -> list[nn.Module]:
        raise NotImplementedError

    # ---- sizes of a (possibly sliced) decoder layer
    def head_dim(self, layer) -> int:
        return self.attn(layer).head_dim

    def num_heads(self, layer) -> int:
        q_rows = layer.get_submodule(self.head_members[0][0]).out_features
        per_head = 3 if self.head_members[0][2] == "qkv" else 1
        return q_rows // (per_head * self.head_dim(layer))

    def num_kv_heads(self, layer) -> int:
        return self.num_heads(layer)

    def num_channels(self, layer) -> int:
        return layer.get_submodule(self.channel_members[0][0]).out_features

    def attn(self, layer) -> nn.Module:
        return layer.get_submodule(self.attention)

    # ---- groups
    def head_groups(self, index: int, layer, mode: str = "q-head") -> GroupSet:
        if mode not in HEAD_MODES:
            raise UserError(f"unknown head mode {mode!r}; choose one of {', '.join(HEAD_MODES)}")
        hd, nq, nkv = self.head_dim(layer), self.num_heads(layer), self.num_kv_heads(layer)
        if mode == "kv-group" and nkv != nq:
            per = nq // nkv
            members = tuple(
                Member(name, dim, hd * (per if unit == "q" else 1)) for name, dim, unit in self.head_members
            )
            return GroupSet(index, "heads", nkv, members, layer)
        # q-head mode (identical to kv-group for MHA); shared k/v are not part of a q head's group
        members = tuple(
            Member(name, dim, hd * (3 if unit == "qkv" else 1))
            for name, dim, unit in self.head_members
            if unit != "kv" or nkv == nq
        )
        return GroupSet(index, "heads", nq, members, layer)

    def channel_groups(self, index: int, layer) -> GroupSet:
        members = tuple(Member(name, dim, 1) for name, dim in self.channel_members)
        return GroupSet(index, "channels", self.num_channels(layer), members, layer)

    # ---- slicing hooks
    def set_heads(self, layer, heads: list[int], kv_heads: list[int]) -> None:
        """Update the attributes the attention forward reads after its heads were sliced."""
        raise NotImplementedError

    def drop_attention(self, layer) -> None:
        """Replace the attention forward by its constant output (the out-projection bias, if any)."""
        raise NotImplementedError


def _constant_output(out_proj: nn.Linear, like: torch.Tensor) -> torch.Tensor:
    """What an attention block with zero heads outputs: its out-projection bias (or zeros)."""
    shape = (*like.shape[:-1], out_proj.out_features)
    if out_proj.bias is None:
        return like.new_zeros(shape)
    return out_proj.bias.expand(shape).to(like.dtype)


# --------------------------------------------------------------------------- LLaMA
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    attention = "self_attn"
    head_members = (
        ("self_attn.q_proj", 0, "q"),
        ("self_attn.k_proj", 0, "kv"),
        ("self_attn.v_proj", 0, "kv"),
        ("self_attn.o_proj", 1, "q"),
    )
    channel_members = (("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1))
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def layers(self, model):
        return list(model.model.layers)

    def num_kv_heads(self, layer) -> int:
        return layer.self_attn.k_proj.out_features // self.head_dim(layer)

    def set_heads(self, layer, heads, kv_heads):
        if heads and len(heads) % len(kv_heads):
            raise UserError(f"{len(heads)} q heads cannot share {len(kv_heads)} kv heads evenly")
        layer.self_attn.num_key_value_groups = len(heads) // len(kv_heads) if heads else 1

    def drop_attention(self, layer):
        layer.self_attn.__class__ = _dropped(type(layer.self_attn), _llama_like_dropped_forward)


def _llama_like_dropped_forward(self, hidden_states, *args, **kwargs):
    return _constant_output(self.o_proj, hidden_states), None


# --------------------------------------------------------------------------- OPT
class OPTAdapter(Adapter):
    model_types = ("opt",)
    attention = "self_attn"
    head_members = (
        ("self_attn.q_proj", 0, "q"),
        ("self_attn.k_proj", 0, "q"),
        ("self_attn.v_proj", 0, "q"),
        ("self_attn.out_proj", 1, "q"),
    )
    channel_members = (("fc1", 0), ("fc2", 1))
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

    def layers(self, model):
        return list(model.model.decoder.layers)

    def set_heads(self, layer, heads, kv_heads):
        layer.self_attn.num_heads = len(heads)

    def drop_attention(self, layer):
        layer.self_attn.__class__ = _dropped(type(layer.self_attn), _opt_dropped_forward)


def _opt_dropped_forward(self, hidden_states, *args, **kwargs):
    return _constant_output(self.out_proj, hidden_states), None


# --------------------------------------------------------------------------- BLOOM
class BloomAdapter(Adapter):
    model_types = ("bloom",)
    attention = "self_attention"
    head_members = (("self_attention.query_key_value", 0, "qkv"), ("self_attention.dense", 1, "q"))
    channel_members = (("mlp.dense_h_to_4h", 0), ("mlp.dense_4h_to_h", 1))
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    def layers(self, model):
        return list(model.transformer.h)

    def set_heads(self, layer, heads, kv_heads):
        """BLOOM builds ALiBi once for all n_head heads; a sliced layer must add its KEPT heads' slopes."""
        attn = layer.self_attention
        original = getattr(attn, "kept_alibi_heads", None)
        if original is None:  # first slicing: remember the model-level head count
            original = list(range(attn.num_heads))
            attn.total_heads = attn.num_heads
        attn.kept_alibi_heads = [original[h] for h in heads]
        attn.num_heads = len(heads)
        layer.num_heads = len(heads)
        if not isinstance(attn, _PrunedBloomAttention):
            attn.__class__ = _pruned_bloom_class(type(attn))

    def drop_attention(self, layer):
        layer.self_attention.__class__ = _dropped(type(layer.self_attention), _bloom_dropped_forward)


def _bloom_dropped_forward(self, hidden_states, residual, *args, **kwargs):
    return residual + _constant_output(self.dense, hidden_states), None


# the mixin that selects a sliced layer's kept heads' ALiBi slopes: the standard checkpoint's own
# class (minillm/modeling_pruned.py), so sliced and reloaded models run the same code
_PrunedBloomAttention = _AlibiHeadsBloomAttention


_CLASS_CACHE: dict = {}


def _pruned_bloom_class(base):
    key = ("bloom", base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Pruned{base.__name__}", (_PrunedBloomAttention, base), {})
    return _CLASS_CACHE[key]


def _dropped(base, forward):
    """A subclass of an attention class whose forward returns the constant output of zero heads."""
    key = ("dropped", base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"Dropped{base.__name__}", (base,), {"forward": forward})
    return _CLASS_CACHE[key]


# --------------------------------------------------------------------------- registry
ADAPTERS = (LlamaAdapter(), OPTAdapter(), BloomAdapter())


def adapter_for(model) -> Adapter:
    """The adapter of a model (or of a config: anything with `.model_type` or `.config.model_type`)."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS for t in a.model_types)
    raise UserError(f"unsupported architecture {model_type!r}; supported: {', '.join(supported)}")


def all_group_sets(model, head_mode: str = "q-head", layers=None) -> list[GroupSet]:
    """Every layer's head and channel GroupSets, in layer order (heads before channels)."""
    adapter = adapter_for(model)
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        if layers is not None and i not in layers:
            continue
        out.append(adapter.head_groups(i, layer, head_mode))
        out.append(adapter.channel_groups(i, layer))
    return out


def decoder_and_head(model):
    """(decoder stack, output embedding) of a causal LM whose logits are ``head(decoder(x)[0])``.

    True of the LLaMA, OPT and BLOOM classes this suite prunes (their final norm / projection
    lives in the decoder); (None, None) for anything else, which then computes full logits.
    """
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or head is None:
        return None, None
    return base, head
