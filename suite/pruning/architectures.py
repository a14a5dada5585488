"""Per-architecture adapters: where the prunable groups of each decoder layer live.

A *group* is a set of weights that must be removed together (Torch-Pruning's dependency group,
LLM-Pruner's coupled structure): one attention head (its q/k/v rows and its out-projection
columns) or one MLP channel (its up/gate rows and its down-projection column). Every group of a
kind in a layer has the same shape, so a layer's heads (or channels) form one `GroupSet`: a count
and a list of `Member`s, each saying "group g owns rows (dim 0, bias included) or columns (dim 1)
[g*width, (g+1)*width) of this Linear". Methods score groups from these members; the budget
counts their parameters; slicing removes them. The same table drives all three, per architecture:

    LLaMA (MHA/GQA) q/k/v_proj rows, o_proj cols   | gate/up_proj rows, down_proj col
      Mistral, Qwen2/2.5 (+q/k/v bias), Qwen3, Gemma 2, Gemma 3: as LLaMA (LlamaAdapter subclasses)
    OPT             q/k/v_proj rows (+bias), out_proj cols | fc1 row (+bias), fc2 col
    BLOOM           query_key_value rows [n_head, 3, head_dim] (+bias), dense cols
                                                   | dense_h_to_4h row (+bias), dense_4h_to_h col
    Phi-3           qkv_proj rows in its q, k and v sections, o_proj cols
                                                   | gate_up_proj rows in its gate and up halves, down_proj col

A Linear named more than once in a member table is *fused*: its rows are consecutive sections,
one per mention, in table order (Phi-3's qkv_proj = [q heads; k heads; v heads], gate_up_proj =
[gate; up]); a member's `offset` is where its section starts, so a head or channel owns rows in
several places of one matrix.

GQA heads come in two modes: ``kv-group`` (a kv head with all the q heads that read it: removing
it keeps `repeat_kv` valid trivially) and ``q-head`` (single q heads; the budget removes the same
number from every kv group so `repeat_kv` stays valid, and k/v are never removed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from suite.pruning.errors import UserError
from suite.pruning.modeling_pruned import (
    _AlibiHeadsBloomAttention,
    _NoHeadsBloomAttention,
    _NoHeadsLlamaAttention,
    _NoHeadsOPTAttention,
    _PrunedPhi3Attention,
)
from suite.pruning.modeling_sliced import LLAMA_LAYOUT, OPT_LAYOUT, PHI3_LAYOUT

HEAD_MODES = ("q-head", "kv-group")


@dataclass(frozen=True)
class Member:
    """One Linear's share of each group in a GroupSet.

    name:  module path inside the decoder layer (e.g. "self_attn.q_proj")
    dim:   0 = the group owns output rows (and bias entries), 1 = it owns input columns
    width: rows/columns per group; group g owns offset + [g*width, (g+1)*width)
    offset: first row/column of this member's section of a fused Linear (0 for a plain Linear)
    """

    name: str
    dim: int
    width: int
    offset: int = 0


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
        return w.narrow(0, member.offset, self.count * member.width).reshape(self.count, member.width, w.shape[1])

    def params_per_group(self) -> int:
        """Parameters removed with one group (weights, and bias entries of row members)."""
        total = 0
        for m in self.members:
            lin = self.linear(m)
            other = lin.in_features if m.dim == 0 else lin.out_features
            total += m.width * other + (m.width if m.dim == 0 and lin.bias is not None else 0)
        return total


def output_only(group_sets) -> list[GroupSet]:
    """The same group sets restricted to their output-projection member (only its input is hooked:
    the statistics Wanda-sp and FLAP read, over the out-projection's input columns)."""
    return [GroupSet(gs.layer, gs.kind, gs.count, (gs.output,), gs.module) for gs in group_sets]


# --------------------------------------------------------------------------- base adapter
class Adapter:
    """Architecture-specific facts. Subclasses fill the class attributes and hooks."""

    model_types: tuple[str, ...] = ()
    attention: str = ""  # attention module path in a decoder layer
    # "learned" (a table of positions: longer windows cannot run), "rotary" or "alibi" (they extrapolate)
    position_encoding: str = "rotary"
    # (name, dim, unit) where unit is "q" (indexed by q heads), "kv" (kv heads) or "qkv" (BLOOM fused)
    head_members: tuple[tuple[str, int, str], ...] = ()
    channel_members: tuple[tuple[str, int], ...] = ()
    # Linear names (suffixes, PEFT's `target_modules`) that LoRA recovery adapts: LLM-Pruner's
    # q/k/v/o/gate/up/down for LLaMA and each family's equivalents
    lora_targets: tuple[str, ...] = ()
    # where the residual stream is read and written (`modeling_sliced.Layout`), for slicing its width
    # (`rotation.py`, SliceGPT); None, with the reason in `residual_refusal`, where rotating the
    # residual stream cannot leave the model's function unchanged
    residual_layout = None
    residual_refusal: str = "no residual layout is known for this family"

    def layer_list(self, model) -> nn.ModuleList:
        """The decoder's ModuleList of layers itself (depth pruning deletes from it)."""
        raise NotImplementedError

    def layers(self, model) -> list[nn.Module]:
        return list(self.layer_list(model))

    def tail(self, model) -> list[nn.Module]:
        """Modules the decoder applies after its last layer, in order (the final norm), so that
        ``head(tail(h))`` are the logits of last-layer outputs h (`layerwise.LayerPass.finish`)."""
        return [model.base_model.norm]

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
        offsets = self._offsets(self.head_members, layer)
        if mode == "kv-group" and nkv != nq:
            per = nq // nkv
            members = tuple(
                Member(name, dim, hd * (per if unit == "q" else 1), offset)
                for (name, dim, unit), offset in zip(self.head_members, offsets)
            )
            return GroupSet(index, "heads", nkv, members, layer)
        # q-head mode (identical to kv-group for MHA); shared k/v are not part of a q head's group
        members = tuple(
            Member(name, dim, hd * (3 if unit == "qkv" else 1), offset)
            for (name, dim, unit), offset in zip(self.head_members, offsets)
            if unit != "kv" or nkv == nq
        )
        return GroupSet(index, "heads", nq, members, layer)

    def channel_groups(self, index: int, layer) -> GroupSet:
        offsets = self._offsets(self.channel_members, layer)
        members = tuple(Member(name, dim, 1, off) for (name, dim), off in zip(self.channel_members, offsets))
        return GroupSet(index, "channels", self.num_channels(layer), members, layer)

    def _section_size(self, layer, unit: str) -> int:
        """Rows/columns of one member's section: all heads ("q", "kv", "qkv") or all channels ("ch")."""
        hd = self.head_dim(layer)
        return {"q": self.num_heads(layer) * hd, "kv": self.num_kv_heads(layer) * hd,
                "qkv": 3 * self.num_heads(layer) * hd, "ch": self.num_channels(layer)}[unit]

    def _offsets(self, table, layer) -> list[int]:
        """Start of each table entry's section in its Linear: the sizes of earlier mentions of that Linear."""
        seen, out = {}, []
        for entry in table:
            name, unit = entry[0], entry[2] if len(entry) > 2 else "ch"
            out.append(seen.get(name, 0))
            seen[name] = out[-1] + self._section_size(layer, unit)
        return out

    def keep_index(self, layer, heads, kv_heads, channels) -> dict:
        """{(Linear name, dim): kept row/column indices} for a plan entry, fused sections in table order.

        `heads`/`kv_heads`/`channels` are kept indices in this (unsliced) layer's numbering; None
        keeps that kind whole (its Linears are then absent from the result).
        """
        hd, parts = self.head_dim(layer), {}
        if heads is not None:
            for (name, dim, unit), offset in zip(self.head_members, self._offsets(self.head_members, layer)):
                groups, width = {"q": (heads, hd), "kv": (kv_heads, hd), "qkv": (heads, 3 * hd)}[unit]
                parts.setdefault((name, dim), []).append(offset + group_columns(groups, width))
        if channels is not None:
            for (name, dim), offset in zip(self.channel_members, self._offsets(self.channel_members, layer)):
                parts.setdefault((name, dim), []).append(offset + group_columns(channels, 1))
        return {key: torch.cat(p) for key, p in parts.items()}

    # ---- slicing hooks
    def set_heads(self, layer, heads: list[int], kv_heads: list[int]) -> None:
        """Update the attributes the attention forward reads after its heads were sliced."""
        raise NotImplementedError

    def set_channels(self, layer, channels: list[int]) -> None:
        """Update what the MLP forward reads after its channels were sliced (nothing, by default)."""

    def drop_attention(self, layer) -> None:
        """Replace the attention forward by its constant output (the out-projection bias, if any)."""
        raise NotImplementedError


def group_columns(groups, width: int) -> torch.Tensor:
    """Group indices -> row/column indices (int64, 1-D, len(groups) * width), group g owning
    [g*width, (g+1)*width): a head's head_dim columns of o_proj, a channel's one column."""
    g = torch.as_tensor(list(groups), dtype=torch.long)
    return (g[:, None] * width + torch.arange(width)).reshape(-1)


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
    residual_layout = LLAMA_LAYOUT

    def layer_list(self, model):
        return model.model.layers

    def num_kv_heads(self, layer) -> int:
        return layer.self_attn.k_proj.out_features // self.head_dim(layer)

    def set_heads(self, layer, heads, kv_heads):
        if heads and len(heads) % len(kv_heads):
            raise UserError(f"{len(heads)} q heads cannot share {len(kv_heads)} kv heads evenly")
        layer.self_attn.num_key_value_groups = len(heads) // len(kv_heads) if heads else 1

    def drop_attention(self, layer):
        layer.self_attn.__class__ = _subclass("dropped", _NoHeadsLlamaAttention, type(layer.self_attn), "Dropped")


# --------------------------------------------------------------------------- LLaMA-like families
# Same Linears and names as LLaMA; their differences live in modules with nothing to slice.
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MistralAdapter(LlamaAdapter):
    """Mistral: LLaMA with GQA and sliding-window attention (a mask: no weights)."""

    model_types = ("mistral",)
    lora_targets = LLAMA_LORA_TARGETS


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5: q/k/v biases (row members: a head's bias entries go with its rows), GQA down
    to 2 kv heads, optional sliding window on the top layers."""

    model_types = ("qwen2",)
    lora_targets = LLAMA_LORA_TARGETS


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: explicit head_dim; q_norm/k_norm are RMSNorms over head_dim whose weight is shared by
    every head, so they stay whole when heads are removed."""

    model_types = ("qwen3",)
    lora_targets = LLAMA_LORA_TARGETS


class Gemma2Adapter(LlamaAdapter):
    """Gemma 2: explicit head_dim (≠ hidden/heads), pre- and post-norms around attention and MLP
    (a dropped attention outputs 0, and post-norm(0) = 0: exact), √hidden embedding scaling inside
    the decoder, attention soft capping inside attention, final-logit soft capping in the head
    (`decoder_and_head` applies it)."""

    model_types = ("gemma2",)
    lora_targets = LLAMA_LORA_TARGETS
    residual_layout = None
    residual_refusal = ("it normalises each block's output (post_attention_layernorm, post_feedforward_layernorm) "
                        "before the residual add, and a per-channel norm does not commute with a rotation of the "
                        "residual stream")


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text): Gemma 2's layout plus per-head
    q/k RMSNorms over head_dim (shared weights, kept whole), local/global layers."""

    model_types = ("gemma3_text",)
    lora_targets = LLAMA_LORA_TARGETS
    residual_layout = None
    residual_refusal = ("it normalises each block's output (post_attention_layernorm, post_feedforward_layernorm) "
                        "before the residual add, and a per-channel norm does not commute with a rotation of the "
                        "residual stream")


class Phi3Adapter(LlamaAdapter):
    """Phi-3: fused qkv_proj rows = [q heads; k heads; v heads] and gate_up_proj rows = [gate; up].

    A q head owns hd rows in the q section (and o_proj columns); a kv head owns hd rows in the k
    section and hd rows in the v section; a channel owns one row in each half of gate_up_proj (and
    a down_proj column). The attention forward locates the k section at
    ``config.num_attention_heads * head_dim``: a sliced layer reads its own head count instead.
    """

    model_types = ("phi3",)
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    residual_layout = PHI3_LAYOUT
    head_members = (
        ("self_attn.qkv_proj", 0, "q"),
        ("self_attn.qkv_proj", 0, "kv"),
        ("self_attn.qkv_proj", 0, "kv"),
        ("self_attn.o_proj", 1, "q"),
    )
    channel_members = (("mlp.gate_up_proj", 0), ("mlp.gate_up_proj", 0), ("mlp.down_proj", 1))

    def num_heads(self, layer) -> int:
        return layer.self_attn.o_proj.in_features // self.head_dim(layer)

    def num_kv_heads(self, layer) -> int:
        attn = layer.self_attn
        return (attn.qkv_proj.out_features - attn.o_proj.in_features) // (2 * self.head_dim(layer))

    def num_channels(self, layer) -> int:
        return layer.mlp.down_proj.in_features

    def set_heads(self, layer, heads, kv_heads):
        super().set_heads(layer, heads, kv_heads)
        attn = layer.self_attn
        attn.num_heads, attn.num_key_value_heads = len(heads), len(kv_heads)
        if not isinstance(attn, _PrunedPhi3Attention):
            attn.__class__ = _subclass("pruned-phi3", _PrunedPhi3Attention, type(attn))


# --------------------------------------------------------------------------- OPT
class OPTAdapter(Adapter):
    model_types = ("opt",)
    attention = "self_attn"
    position_encoding = "learned"
    head_members = (
        ("self_attn.q_proj", 0, "q"),
        ("self_attn.k_proj", 0, "q"),
        ("self_attn.v_proj", 0, "q"),
        ("self_attn.out_proj", 1, "q"),
    )
    channel_members = (("fc1", 0), ("fc2", 1))
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    residual_layout = OPT_LAYOUT

    def layer_list(self, model):
        return model.model.decoder.layers

    def tail(self, model):
        decoder = model.model.decoder
        return [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]

    def set_heads(self, layer, heads, kv_heads):
        layer.self_attn.num_heads = len(heads)

    def drop_attention(self, layer):
        layer.self_attn.__class__ = _subclass("dropped", _NoHeadsOPTAttention, type(layer.self_attn), "Dropped")


# --------------------------------------------------------------------------- BLOOM
class BloomAdapter(Adapter):
    model_types = ("bloom",)
    attention = "self_attention"
    position_encoding = "alibi"
    head_members = (("self_attention.query_key_value", 0, "qkv"), ("self_attention.dense", 1, "q"))
    channel_members = (("mlp.dense_h_to_4h", 0), ("mlp.dense_4h_to_h", 1))
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    residual_refusal = ("its attention adds the residual inside itself (BloomAttention's dropout_add) and its "
                        "embeddings pass a LayerNorm (word_embeddings_layernorm) before the residual stream; "
                        "neither is wired to the shortcut matrices here, so the rotation would not be exact")

    def layer_list(self, model):
        return model.transformer.h

    def tail(self, model):
        return [model.transformer.ln_f]

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
        if (attn.pretraining_tp > 1 and attn.slow_but_exact) or isinstance(attn.dense, TensorParallelSum):
            hd = self.head_dim(layer)
            columns = group_columns(heads, hd)
            _tensor_parallel(attn.dense, attn.pretraining_tp, columns, attn.dense.out_features)
            attn.slow_but_exact = False  # the sum over shards now lives in attn.dense

    def set_channels(self, layer, channels):
        """BLOOM's `slow_but_exact` MLP splits dense_4h_to_h by its width: sliced, it sums its kept
        columns shard by shard itself (`TensorParallelSum`)."""
        mlp = layer.mlp
        if (mlp.pretraining_tp > 1 and mlp.slow_but_exact) or isinstance(mlp.dense_4h_to_h, TensorParallelSum):
            out = mlp.dense_4h_to_h
            _tensor_parallel(out, mlp.pretraining_tp, torch.as_tensor(channels, dtype=torch.long), 4 * out.out_features)
            mlp.slow_but_exact = False

    def drop_attention(self, layer):
        layer.self_attention.__class__ = _subclass("dropped", _NoHeadsBloomAttention, type(layer.self_attention),
                                                   "Dropped")


class TensorParallelSum(nn.Linear):
    """A sliced out-projection of BLOOM with ``pretraining_tp > 1, slow_but_exact=True``.

    transformers' slow path (`BloomAttention.forward`, `BloomMLP.forward`) computes the projection
    as a sum over `pretraining_tp` column shards of the ORIGINAL width, in shard order, without the
    bias; after slicing it would split by the old width and crash. Here each kept column remembers
    its original shard (`tp_shard`, sorted) and the same sum runs over the kept columns, so the
    sliced layer equals the unsliced slow path with the removed columns zeroed.
    """

    tp_shard: torch.Tensor
    tp: int
    adds_bias = False  # a dropped attention then outputs zeros (modeling_pruned._zero_heads_output)

    def forward(self, x):
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        start = 0
        for n in torch.bincount(self.tp_shard, minlength=self.tp).tolist():
            out = out + nn.functional.linear(x[..., start:start + n], self.weight[:, start:start + n])
            start += n
        return out


def _tensor_parallel(linear: nn.Linear, tp: int, kept: torch.Tensor, width: int) -> None:
    """Make `linear` (just sliced to columns `kept` of its previous `width`) a TensorParallelSum."""
    if not isinstance(linear, TensorParallelSum):
        slices = width / tp  # transformers' shard bounds: int(i * slices) .. int((i + 1) * slices)
        shard = torch.empty(width, dtype=torch.long)
        for i in range(tp):
            shard[int(i * slices):int((i + 1) * slices)] = i
        linear.__class__ = TensorParallelSum
        linear.tp = tp
    else:
        shard = linear.tp_shard
    linear.register_buffer("tp_shard", shard[kept.to(shard.device)].to(linear.weight.device), persistent=False)



# the mixin that selects a sliced layer's kept heads' ALiBi slopes: the standard checkpoint's own
# class (suite/pruning/modeling_pruned.py), so sliced and reloaded models run the same code
_PrunedBloomAttention = _AlibiHeadsBloomAttention


_CLASS_CACHE: dict = {}


def _pruned_bloom_class(base):
    return _subclass("bloom", _PrunedBloomAttention, base)


def _subclass(tag, mixin, base, prefix="Pruned"):
    """The (cached) class `mixin` + `base`: a sliced module keeps its type's behaviour and name.

    Dropped attentions use the standard checkpoint's own zero-head mixins (suite/pruning/modeling_pruned.py:
    out-projection bias as output, KV-cache placeholder), so sliced and reloaded models run one code."""
    key = (tag, base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"{prefix}{base.__name__}", (mixin, base), {})
    return _CLASS_CACHE[key]


# --------------------------------------------------------------------------- registry
ADAPTERS = (LlamaAdapter(), OPTAdapter(), BloomAdapter(), MistralAdapter(), Qwen2Adapter(), Qwen3Adapter(),
            Gemma2Adapter(), Gemma3Adapter(), Phi3Adapter())


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
    """Every layer's head and channel GroupSets, in layer order (heads before channels).

    A block already emptied (a pruned model's attention with zero q heads, or MLP with zero
    channels: `apply_plan` with ``allow_empty``) has no group left: its set is not listed, so
    statistics, scoring, selection and the budget skip it (its groups count as removed already)."""
    adapter = adapter_for(model)
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        if layers is not None and i not in layers:
            continue
        if adapter.num_heads(layer):
            out.append(adapter.head_groups(i, layer, head_mode))
        if adapter.num_channels(layer):
            out.append(adapter.channel_groups(i, layer))
    return out


def decoder_and_head(model):
    """(decoder stack, output head) of a causal LM whose logits are ``head(decoder(x)[0])``.

    True of every class this suite prunes: the final norm (and Gemma's √hidden embedding scaling)
    lives in the decoder; where the config sets ``final_logit_softcapping`` (Gemma 2), the head is
    the output embedding followed by that capping, cap·tanh(z/cap), as the model's own forward
    (Gemma2ForCausalLM.forward). (None, None) for anything else, which then computes full logits.
    """
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or head is None:
        return None, None
    cap = getattr(model.config, "final_logit_softcapping", None)
    return base, (head if cap is None else SoftCappedHead(head, cap))


class SoftCappedHead:
    """logits = cap · tanh(head(x) / cap): a callable like the head, with its `out_features`."""

    def __init__(self, head: nn.Module, cap: float):
        self.head, self.cap, self.out_features = head, float(cap), head.out_features

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap
