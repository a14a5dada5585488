"""Predicted peak memory of every grid cell, phase by phase, from shapes alone (`suite run --dry-run`).

Nothing is loaded: the model's architecture is built on the meta device from its config
(`suite.models.skeleton`: no weight file is opened), and every formula below is a function of
its shapes, the cell's dtype and device, the method's calibration (nsamples N, seqlen S) and
options, and the evaluation settings. A model whose config cannot be had here (a hub id that is
neither local nor in the hub cache) gets one row "shapes unknown: <why>".

What a peak is, as `suite/measure.py` records it:
  - cuda: `max_memory_allocated` of the phase — the tensors alone, no interpreter.
  - cpu:  the process's VmHWM — the tensors plus the interpreter and its libraries
    (`CONSTANTS["cpu_baseline_mb"]`, measured: see results/notes/memory-model.md), plus, for a
    model read from safetensors in its stored dtype, the weights' file pages: transformers maps
    the file, its pages become resident when a phase first reads them (the score or evaluation
    forward, not the load), and they stay resident after slicing, which writes the kept rows to
    new memory (`Setting.mapped`, `unread`); and the heap's high-water where a LayerPass's
    micro-batch tensors are too small for their own mappings (`heap_residue`).

Notation (bytes unless said): W the weights (every parameter once, tied embeddings once) in the
cell's dtype, B that dtype's bytes per element, L decoder layers, H hidden size, I the MLP width,
A attention heads, V the vocabulary, N × S the calibration windows, b a micro-batch (windows).
Every per-method constant sits in CONSTANTS, one table, to be re-fitted when a method's memory
behaviour changes (`suite run CONFIG --dry-run --compare RESULTS.jsonl` prints predicted vs
measured per phase).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from suite.pruning.errors import UserError
from suite.offload import parse_size  # accelerate's units, as --offload's --device-memory

MiB = 2 ** 20
GiB = 2 ** 30

# One table of constants. "elements per token" terms are multiplied by the dtype's bytes.
CONSTANTS = {
    # CPU: VmRSS of a grid cell after its imports (interpreter, torch, transformers, the suite),
    # before any weight: what every CPU phase's peak includes.
    "cpu_baseline_mb": 430.0,
    # CPU: streams of N·S·H·B a LayerPass holds on the heap when its micro-batch tensors are below
    # glibc's 1 MiB mmap threshold (freed ones are not returned): fitted to wanda-sp on SmolLM2 at b = 1.
    "cpu_heap_streams": 5,
    # CPU: what importing lm-eval and building its tasks adds to a zero-shot evaluation.
    "cpu_lm_eval_mb": 300.0,
    # One decoder layer's live forward activations (no grad), elements per token: a few
    # hidden-sized tensors (norm output, q/k/v, attention output, residual), the MLP's I-wide
    # intermediates (gate, up, their product) and the attention scores (A × S per token).
    "layer_fwd": {"h": 6, "i": 3, "s": 1},
    # Backprop: elements per token and layer saved for backward (Korthikanti et al. 2022, Eq. 1,
    # sbh(34 + 5as/h) bytes in 16-bit: 17 hidden-sized tensors and 2.5 A·S, with the MLP's
    # I-wide tensors counted by I), scaled to fit the measured peaks.
    "backprop_saved": {"h": 8, "i": 4, "s": 1},
    # Full [b, S, V] logits in a loss, in fp32 copies (+ the model-dtype logits when not fp32):
    # evaluation the logits and their log-softmax; backprop also the logits' gradient.
    "logit_copies_eval": 2,
    "logit_copies_backprop": 3,
    # A chunked loss (minillm.zo): fp32 logits of this many entries at once, with log-softmax and grad.
    "loss_chunk_elements": 1 << 22,
    # Statistics hooks (suite/pruning/activations.py): a float64 copy of one member's input and its square.
    "stats_fp64_copies": 2,
    # Windows per perplexity forward (suite/evaluate.py perplexity batch_size) and throughput probe
    # (suite/speed.py) and the token length lm-eval's loglikelihood requests are padded to.
    "perplexity_batch": 4,
    "speed_batch": 4,
    "lm_eval_tokens": 512,
    # MINI-LLM weight space: True = SPSA layer by layer on the LayerPass with (2q + 1) hidden-state
    # streams (suite.pruning.loss.LayerwiseLoss, merged in i11d); False = the earlier whole-model SPSA.
    "minillm_layerwise": True,
}


@dataclass
class Shapes:
    """What the formulas read from a model's config (meta device)."""
    params: int
    layer_params: int          # the largest decoder layer's parameters
    largest_matrix: int        # the largest Linear weight of a decoder layer (elements)
    embed_params: int          # input embedding (+ an untied output head) parameters
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    stored_dtype: str | None   # the checkpoint's dtype (config), None when built in code
    kind: str                  # suite.models.resolve's kind: tiny | dir | hub | pruned


def _gguf_skeleton(path):
    """A .gguf model on the meta device from the file's metadata (transformers' GGUF reader): no tensor read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shapes(spec: str) -> Shapes:
    """The model's Shapes from its config alone. No weight is read: a .gguf file (and the embedded
    model before its first conversion, which `resolve` would run) gives its config from the file's
    metadata. Raises UserError where no config can be had (a hub id not in the hub cache with the
    hub off, an unknown path) or the architecture has no pruning adapter."""
    from pathlib import Path

    from suite.pruning.architectures import adapter_for
    from suite.models import EMBEDDED, cache_root, embedded_gguf_path, resolve, skeleton

    # the embedded model's cache directory, as suite.models.embedded_model_dir names it
    if spec == EMBEDDED and not (cache_root() / "smollm2-135m-instruct-f32" / "config.json").is_file():
        kind = "dir"  # converted to fp32 safetensors at its first load
        model = _gguf_skeleton(embedded_gguf_path())
        model.config.dtype = "float32"
    else:
        kind, where = resolve(spec)
        model = _gguf_skeleton(Path(where)) if kind == "gguf" else skeleton(spec)
    adapter = adapter_for(model)
    layers = list(adapter.layers(model))
    linears = [m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    embed_params = embed.numel() + (head.weight.numel() if head is not None and head.weight is not embed else 0)
    config = model.config
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return Shapes(
        params=sum(p.numel() for p in model.parameters()),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        largest_matrix=max(linears),
        embed_params=embed_params,
        layers=len(layers),
        hidden=int(config.hidden_size),
        intermediate=max(adapter.num_channels(layer) for layer in layers),
        heads=max(adapter.num_heads(layer) for layer in layers),
        kv_heads=max(adapter.num_kv_heads(layer) for layer in layers),
        head_dim=adapter.head_dim(layers[0]),
        vocab=int(embed.shape[0]),
        stored_dtype=None if kind == "tiny" or stored is None else str(stored).replace("torch.", ""),
        kind=kind,
    )


# --------------------------------------------------------------------------- building blocks
def dtype_bytes(dtype: str) -> int:
    return torch.finfo(getattr(torch, dtype)).bits // 8


def per_token(s: Shapes, terms: dict, seqlen: int) -> int:
    """Elements per token of a {"h", "i", "s"} term: h·H + i·I + s·A·S."""
    return terms["h"] * s.hidden + terms["i"] * s.intermediate + terms["s"] * s.heads * seqlen


def layer_forward(s: Shapes, tokens: int, seqlen: int, nbytes: int) -> int:
    """One decoder layer's live activations during a no-grad forward of `tokens` tokens."""
    return tokens * per_token(s, CONSTANTS["layer_fwd"], seqlen) * nbytes


def hidden_states(s: Shapes, tokens: int, nbytes: int) -> int:
    """Hidden states of `tokens` tokens: tokens × H × B (one LayerPass stream)."""
    return tokens * s.hidden * nbytes


def stats_hooks(s: Shapes, tokens: int) -> int:
    """suite/pruning/activations.py's hooks: float64 copies of the widest member input (I) of one micro-batch."""
    return CONSTANTS["stats_fp64_copies"] * tokens * s.intermediate * 8


def logits(s: Shapes, tokens: int, copies: int, nbytes: int = 4) -> int:
    """Full logits of `tokens` tokens in a loss: `copies` fp32 copies (tokens × V × 4 each), plus the
    model's own logits when its dtype is not fp32 (tokens × V × B, then cast)."""
    return tokens * s.vocab * (copies * 4 + (nbytes if nbytes != 4 else 0))


def chunked_loss(s: Shapes, tokens: int) -> int:
    """A chunked loss (minillm.zo): at most loss_chunk_elements fp32 logits, log-softmax, grad at once."""
    return 3 * 4 * min(CONSTANTS["loss_chunk_elements"], tokens * s.vocab)


def backprop(s: Shapes, windows: int, seqlen: int, nbytes: int, chunked: bool) -> int:
    """Backprop of one micro-batch of `windows` windows through the whole model (the gradients' own
    buffers not included): the activations every layer saves for backward,
    L × b·S × (h·H + i·I + s·A·S) × B (CONSTANTS["backprop_saved"]), plus the loss: full logits
    (`logit_copies_backprop` fp32 copies) or one chunk of a chunked, checkpointed loss."""
    tokens = windows * seqlen
    saved = s.layers * tokens * per_token(s, CONSTANTS["backprop_saved"], seqlen) * nbytes
    loss = chunked_loss(s, tokens) if chunked else logits(s, tokens, CONSTANTS["logit_copies_backprop"], nbytes)
    return saved + loss


def with_gradients(s: Shapes, activations: int, micro_batches: int, nbytes: int) -> int:
    """A .grad per parameter (P·B) next to one micro-batch's backprop `activations`. Backward frees
    the activations as it writes the gradients, the output head's first: with one micro-batch the
    peak is the larger of (activations + the head's gradient V·H·B) and (all gradients); from the
    second micro-batch on, every gradient exists while its activations are alive: their sum."""
    grads = s.params * nbytes
    if micro_batches > 1:
        return grads + activations
    return max(activations + s.vocab * s.hidden * nbytes, grads)


# --------------------------------------------------------------------------- the cell's setting
@dataclass
class Setting:
    """A cell as the formulas see it."""
    shapes: Shapes
    device: str                # cpu | cuda
    dtype: str
    method: str
    options: dict              # the method's defaults merged with the cell's
    calibration: dict | None   # {"nsamples", "seqlen", ...} the method runs with; None: none
    ratio: float
    evaluation: dict
    recovery: dict | None
    spec: str = ""             # the model spec (for a method that reads a meta-device model)
    offload: str | None = None  # the grid's `offload` (cpu | disk), where the config has it
    device_memory: int | None = None  # its cap on the device's weights (bytes)
    ratio_of: str = "all"      # what `ratio` is a fraction of (suite.pipeline.RATIO_OF)

    @property
    def B(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def W(self) -> int:
        return self.shapes.params * self.B

    @property
    def Wd(self) -> int:
        """The dense weights on the device: W; with `offload`, the cap (accelerate places whole layers
        up to it; default: all of W) plus one offloaded layer materialised at a time."""
        if self.offload is None:
            return self.W
        cap = self.W if self.device_memory is None else min(self.W, self.device_memory)
        return cap + (self.shapes.layer_params * self.B if cap < self.W else 0)

    @property
    def mapped(self) -> bool:
        """CPU, read from safetensors in their stored dtype: the weights are the file's pages."""
        return (self.device == "cpu" and self.offload is None and self.shapes.kind in ("dir", "hub")
                and self.shapes.stored_dtype == self.dtype)

    @property
    def W_pruned(self) -> int:
        """The pruned model's weights: the ratio is of ALL parameters (suite/pruning/select.py's budget),
        or with `ratio_of: layers` of the parameters outside the embeddings and head (final norm included: tiny)."""
        counted = self.shapes.params if self.ratio_of == "all" else self.shapes.params - self.shapes.embed_params
        return round(self.shapes.params - counted * self.ratio) * self.B

    @property
    def W_sliced(self) -> int:
        """Bytes slicing writes anew: the decoder layers' kept weights (embeddings are not sliced);
        none for a method removing whole layers."""
        if removes_layers(self):
            return 0
        return max(0, (self.shapes.params - self.shapes.embed_params) * self.B - (self.W - self.W_pruned))


def setting(cell: dict, s: Shapes) -> Setting:
    """The cell's method options (defaults merged) and calibration, as suite/pipeline.py resolves them."""
    from suite.pruning.scoring import checked_options
    from suite.config import SELECTION_OPTIONS
    from suite.pipeline import calibration_settings

    method_name = cell["method"]
    options, calib = {}, None
    if method_name != "dense":
        from suite.methods import get_method

        method = get_method(method_name)
        given = {k: v for k, v in (cell.get("options") or {}).items() if k not in SELECTION_OPTIONS}
        options = checked_options(method, given, (cell.get("options") or {}).get("scope"))
        calib = calibration_settings(method, cell.get("calibration") or {})
    cap = cell.get("device_memory")
    return Setting(s, str(cell.get("device", "cpu")).split(":")[0], cell.get("dtype", "float32"), method_name,
                   options, calib, float(cell.get("ratio", 0.0)), cell.get("evaluation") or {}, cell.get("recovery"),
                   cell["model"], cell.get("offload"), None if cap is None else parse_size(cap),
                   cell.get("ratio_of", "all"))


# --------------------------------------------------------------------------- one formula per phase
def load(c: Setting) -> int:
    """load: the weights (with `offload`: those on the device, `Setting.Wd`). CPU and mapped: none
    resident yet (the file is mapped, its pages are read at the first forward). On CPU a model built
    in code (tiny-*) is built in fp32 and then cast: W_fp32 + W. Otherwise (CUDA: read on the host,
    copied to the device; CPU in another dtype): W."""
    if c.mapped:
        return 0
    if c.device == "cpu" and c.shapes.kind == "tiny" and c.dtype != "float32":
        return c.shapes.params * 4 + c.W
    return c.Wd


def resident(c: Setting) -> int:
    """The dense weights resident before the first forward: 0 when mapped, else W."""
    return 0 if c.mapped else c.Wd


def calibrate(c: Setting) -> int:
    """calibrate: the resident weights and the token ids (N × S × 8, int64)."""
    n, seq = c.calibration["nsamples"], c.calibration["seqlen"]
    return resident(c) + n * seq * 8


def _sub_mib(c: Setting, batch: int) -> bool:
    """CPU, and a micro-batch's hidden states (b·S·H·B) below glibc's mmap threshold (1 MiB,
    suite/measure.py steady_allocator): such tensors come from the heap, which keeps its high-water."""
    return c.device == "cpu" and batch * c.calibration["seqlen"] * c.shapes.hidden * c.B < MiB


def _layer_pass(c: Setting, batch: int, streams: int = 1) -> int:
    """A LayerPass (suite/pruning/layerwise.py) of N windows in micro-batches of b: `streams` carried
    hidden-state streams plus the layer's outputs (N·S·H·B each) — on the CPU heap (`_sub_mib`)
    at least `cpu_heap_streams` of them — one micro-batch's layer activations and statistics hooks."""
    n, seq = c.calibration["nsamples"], c.calibration["seqlen"]
    tokens = batch * seq
    count = max(streams + 1, CONSTANTS["cpu_heap_streams"]) if _sub_mib(c, batch) else streams + 1
    return (count * hidden_states(c.shapes, n * seq, c.B) + layer_forward(c.shapes, tokens, seq, c.B)
            + stats_hooks(c.shapes, tokens))


def sequential(c: Setting) -> bool:
    """Whether the method slices the model inside its score phase: layer by layer (suite/pipeline.py
    is_sequential) or in rounds of its own (`prunes_itself`: bonsai)."""
    from suite.methods import get_method
    from suite.pipeline import is_sequential, prunes_itself

    if c.method == "dense":
        return False
    method = get_method(c.method)
    return is_sequential(method, c.options) or prunes_itself(method)


def heap_residue(c: Setting) -> int:
    """CPU: what a wanda-sp / flap LayerPass leaves in the RSS after it: its heap's high-water of
    `cpu_heap_streams` streams when the micro-batch tensors are sub-MiB (`_sub_mib`), else nothing."""
    if c.method not in LAYER_PASS_METHODS or c.calibration is None:
        return 0
    batch = max(1, int(c.options.get("batch_size", 1)))
    if not _sub_mib(c, batch):
        return 0
    tokens = c.calibration["nsamples"] * c.calibration["seqlen"]
    return CONSTANTS["cpu_heap_streams"] * hidden_states(c.shapes, tokens, c.B)


def unread(c: Setting) -> int:
    """Mapped on CPU, the weight pages a LayerPass method never reads before evaluation: the
    embeddings (the input embedding only at the calibration tokens' rows, an output head not at all)."""
    return c.shapes.embed_params * c.B if c.mapped and c.method in LAYER_PASS_METHODS else 0


LAYER_PASS_METHODS = ("wanda-sp", "flap", "shortgpt", "sleb")  # one-shot LayerPass statistics or losses


def _llm_pruner_batch(c: Setting) -> tuple[int, bool]:
    """(micro-batch, chunked loss) LLM-Pruner runs with: its `batch_size` option; 0 means all N windows
    with full logits (hf_prune.py) — or, where the method has `auto_batch_size` (bounded backprop),
    its own choice for this model and seqlen, with the chunked loss."""
    from suite.methods import get_method

    n, seq = c.calibration["nsamples"], c.calibration["seqlen"]
    module = get_method("llm-pruner")
    auto = getattr(module, "auto_batch_size", None)
    size = int(c.options.get("batch_size", 0))
    if auto is None:
        return (size if size > 0 else n), False
    if size <= 0:
        from suite.models import skeleton  # a meta-device model in the cell's dtype: shapes only

        size = auto(skeleton(c.spec).to(dtype=getattr(torch, c.dtype)), seq)
    return min(size, n), True


def score(c: Setting) -> int:
    """score: the dense weights (all read now) plus the method's own, by the formula its registry
    entry names (`suite.methods.Method.memory`), else `generic_score`:
    - magnitude / random (`score_data_free`): a float64 copy of the largest matrix (norms);
    - wanda-sp, flap (`score_layer_pass`): hidden states N·S·H·B carried + the layer's outputs + one
      micro-batch's layer activations and float64 statistics (`_layer_pass`); sequential
      (wanda-sp's default) also slices inside this phase (`slicing`) and recomputes a pruned
      layer's outputs while the first ones are alive: one stream more;
    - llm-pruner (`score_llm_pruner`): .grad per parameter next to the backprop of one micro-batch
      (`with_gradients`, `backprop`), a float64 importance product of the largest matrix (×2);
      `importance=element2` adds W of Fisher sums;
    - minillm (`score_minillm`) gradient=backprop: the same with its own `batch_size` and the
      chunked loss; forward-only (zo, none, noise; every space): the statistics LayerPass, a no-grad
      forward of one micro-batch (layer activations + a loss chunk), one tensor of the weight
      snapshot and ĝ of one Linear (fp32) — and, layer by layer (`minillm_layerwise`), (2q + 1)
      hidden-state streams."""
    import importlib

    from suite.methods import registered

    where = registered(c.method).memory
    if where is None:
        return generic_score(c)
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)(c)


def _base(c: Setting) -> int:
    """The dense weights resident while scoring (those a LayerPass method never reads excepted)."""
    return c.Wd - unread(c)


def score_data_free(c: Setting) -> int:
    """A data-free criterion: weights + a float64 copy of the largest matrix and its square."""
    return _base(c) + 2 * c.shapes.largest_matrix * 8


def score_layer_pass(c: Setting) -> int:
    """A LayerPass statistics method (wanda-sp, flap); sequential: slicing inside the phase, one stream more."""
    batch = max(1, int(c.options.get("batch_size", 1)))
    if sequential(c):
        return _base(c) + slicing(c) + _layer_pass(c, batch, streams=2)
    return _base(c) + _layer_pass(c, batch)


def score_llm_pruner(c: Setting) -> int:
    """LLM-Pruner: gradients of every weight next to one micro-batch's backprop, + Fisher sums for element2."""
    s, n, seq = c.shapes, c.calibration["nsamples"], c.calibration["seqlen"]
    batch, chunked = _llm_pruner_batch(c)
    fisher = c.W if c.options.get("importance") == "element2" else 0
    grads = with_gradients(s, backprop(s, batch, seq, c.B, chunked), -(-n // batch), c.B)
    return _base(c) + grads + fisher + 2 * s.largest_matrix * 8


def score_minillm(c: Setting) -> int:
    """MINI-LLM: backprop variants as LLM-Pruner's (own batch_size, chunked loss); forward-only ones a
    LayerPass with (2q + 1) streams next to a no-grad forward and one Linear's snapshot and ĝ."""
    s, opts, n, seq = c.shapes, c.options, c.calibration["nsamples"], c.calibration["seqlen"]
    batch = min(n, max(1, int(opts.get("batch_size", 4))))
    if "backprop" in (opts.get("gradient"), opts.get("fms_gradient")):
        grads = with_gradients(s, backprop(s, batch, seq, c.B, True), -(-n // batch), c.B)
        return _base(c) + grads + 2 * s.largest_matrix * 8
    tokens = batch * seq
    streams = 2 * int(opts.get("directions", 16)) + 1 if CONSTANTS["minillm_layerwise"] else 1
    forward = layer_forward(s, tokens, seq, c.B) + chunked_loss(s, tokens)
    return _base(c) + max(_layer_pass(c, batch, streams), forward) + 3 * s.largest_matrix * 4


def score_bonsai(c: Setting) -> int:
    """Bonsai: rounds of masked sub-model losses on the LayerPass, `mask_batch` masks' streams (+ the
    clean one) per layer residency, gates.gated's fp32 copy of the out-projection's input, next to a
    no-grad forward; slicing inside the phase (each round prunes physically)."""
    s, opts, n, seq = c.shapes, c.options, c.calibration["nsamples"], c.calibration["seqlen"]
    batch = min(n, max(1, int(opts.get("bsz", 4))))
    streams = min(int(opts.get("mask_batch", 16)), int(opts.get("masks_per_iter", 200))) + 1
    tokens = batch * seq
    gate = tokens * s.intermediate * 4  # gates.gated: an fp32 copy of the out-projection's input
    forward = layer_forward(s, tokens, seq, c.B) + chunked_loss(s, tokens) + gate
    return _base(c) + slicing(c) + max(_layer_pass(c, batch), _layer_pass(c, batch, streams) + gate, forward)


def score_slicegpt(c: Setting) -> int:
    """SliceGPT (suite/pruning/rotation.py): fuse (the head untied: one more V×H copy; mapped on CPU
    every weight is written anew while the file's pages stay: + W), then a LayerPass (hidden states +
    outputs), two [H, H] float64 matrices (the Gram matrix and eigh's eigenvectors) and a float64
    copy of the largest matrix while it is rotated."""
    s, batch = c.shapes, max(1, int(c.options.get("batch_size", 1)))
    return (_base(c) + (c.W if c.mapped else 0) + s.vocab * s.hidden * c.B + _layer_pass(c, batch)
            + 2 * s.hidden * s.hidden * 8 + 2 * s.largest_matrix * 8)


def score_shortgpt(c: Setting) -> int:
    """ShortGPT (LayerPass): as flap's pass (inputs and outputs of one layer; float64 cosines of one
    micro-batch, within the statistics term)."""
    return _base(c) + _layer_pass(c, max(1, int(c.options.get("batch_size", 1))))


def score_sleb(c: Setting) -> int:
    """SLEB (LayerPass): three carried streams (the embeddings' output, the shared prefix, the
    candidate's run) + outputs, and the float64 logits and log-softmax of one micro-batch (2 fp64 =
    4 fp32 copies) for its loss."""
    batch = max(1, int(c.options.get("batch_size", 1)))
    return _base(c) + _layer_pass(c, batch, streams=3) + logits(c.shapes, batch * c.calibration["seqlen"], 4, c.B)


def generic_score(c: Setting) -> int:
    """A method whose registry entry names no formula, from what the entry and module declare:
    data-free (CALIBRATION None): `score_data_free`; forward-only: a statistics LayerPass of the
    method's `batch_size` (default 1) plus a float64 copy of the largest matrix; backprop
    (`forward_only=False`): a .grad per weight next to one micro-batch's backprop with full logits
    (micro-batch: `batch_size`, 0 or absent = all N windows) plus the float64 importance product.
    An upper-side estimate for a new method: `--compare` shows how far it is from a measured run."""
    from suite.methods import registered

    if c.calibration is None:
        return score_data_free(c)
    n, seq = c.calibration["nsamples"], c.calibration["seqlen"]
    size = int(c.options.get("batch_size", 0) or 0)
    if registered(c.method).forward_only:
        return _base(c) + _layer_pass(c, max(1, size)) + 2 * c.shapes.largest_matrix * 8
    batch = min(n, size) if size > 0 else n
    grads = with_gradients(c.shapes, backprop(c.shapes, batch, seq, c.B, False), -(-n // batch), c.B)
    return _base(c) + grads + 2 * c.shapes.largest_matrix * 8


def slicing(c: Setting) -> int:
    """What slicing adds to the dense weights: on CUDA (or CPU without mapping) each sliced Linear's
    new copy while its old one is alive: the largest matrix. Mapped on CPU, the dense pages stay
    and the kept layer weights are new memory: W_sliced. Methods removing whole layers (shortgpt,
    sleb) copy nothing: 0."""
    if removes_layers(c):
        return 0
    return c.W_sliced if c.mapped else c.shapes.largest_matrix * c.B


def removes_layers(c) -> bool:
    """Whether the cell's method removes whole layers (suite/pipeline.py removes_layers): nothing sliced."""
    from suite.methods import get_method
    from suite.pruning.scoring import removes_layers as whole_layers

    return c.method != "dense" and whole_layers(get_method(c.method))


def transformed(c: Setting) -> bool:
    """Whether the cell's method transforms the model itself (suite/pruning/scoring.py `transforms`):
    nothing is left to select or slice after its score phase."""
    from suite.methods import get_method
    from suite.pruning.scoring import transforms

    return c.method != "dense" and transforms(get_method(c.method))


def prune(c: Setting) -> int:
    """prune (select + slice): W + `slicing`; after a sequential method (sliced during score)
    what remains resident (`after_prune`)."""
    if sequential(c) or transformed(c):  # a transforming method (slicegpt) changed the model inside score
        return after_prune(c) - unread(c)
    return c.Wd - unread(c) + slicing(c) + heap_residue(c)


def after_prune(c: Setting) -> int:
    """The weights resident after pruning, as evaluation reads them: W_pruned (plus the dense file
    pages when mapped on CPU), plus the LayerPass's `heap_residue`; the dense cell: W."""
    if c.method == "dense":
        return c.Wd
    pruned = c.W_pruned if c.offload is None else min(c.W_pruned, c.Wd)
    return (c.W + c.W_sliced if c.mapped else pruned) + heap_residue(c)


def perplexity(c: Setting) -> int:
    """evaluate, perplexity: weights + one batch of `perplexity_batch` windows of the evaluation
    seqlen: the full fp32 logits with their log-softmax (`logit_copies_eval`) and one layer's
    activations."""
    seq = int(c.evaluation.get("seqlen", 128))
    tokens = CONSTANTS["perplexity_batch"] * seq
    return (after_prune(c) + logits(c.shapes, tokens, CONSTANTS["logit_copies_eval"], c.B)
            + layer_forward(c.shapes, tokens, seq, c.B))


def lm_eval(c: Setting) -> int:
    """evaluate, zero-shot (lm-eval loglikelihood): weights + a batch of `evaluation.batch_size`
    requests ("auto": 1 here — lm-eval then grows it to fill the device) of `lm_eval_tokens` tokens:
    fp32 logits and log-softmax, one layer's activations; on CPU lm-eval's own import."""
    size = c.evaluation.get("batch_size", 1)
    tokens = (size if isinstance(size, int) else 1) * CONSTANTS["lm_eval_tokens"]
    extra = CONSTANTS["cpu_lm_eval_mb"] * MiB if c.device == "cpu" else 0
    return (after_prune(c) + logits(c.shapes, tokens, CONSTANTS["logit_copies_eval"], c.B)
            + layer_forward(c.shapes, tokens, CONSTANTS["lm_eval_tokens"], c.B) + extra)


def evaluate(c: Setting) -> int:
    """evaluate: the larger of perplexity (when any corpus) and zero-shot (when any task)."""
    ev = c.evaluation
    parts = [perplexity(c) if ev.get("perplexity", ["wikitext2"]) else 0, lm_eval(c) if ev.get("tasks") else 0]
    return max(parts)


def recover(c: Setting) -> int:
    """recover (LoRA, suite/recovery.py): pruned weights + LoRA adapters with AdamW states (small:
    ignored) + backprop of one micro-batch (`micro_batch_size` × `cutoff_len`) with the full logits
    of transformers' loss: the base weights are frozen, so no .grad of W."""
    r = c.recovery
    return after_prune(c) + backprop(c.shapes, int(r.get("micro_batch_size", 4)), int(r.get("cutoff_len", 256)),
                                     c.B, False)


def throughput(c: Setting) -> int:
    """The throughput probe (suite/speed.py; not a recorded phase: it runs between load and score
    on the dense model and after evaluation on the pruned one): W + a prefill of `speed_batch`
    windows (logits in the model's dtype, one layer's activations) + the KV cache
    2 · L · b·S · kv_heads · head_dim · B."""
    s, seq = c.shapes, int(c.evaluation.get("seqlen", 128))
    tokens = CONSTANTS["speed_batch"] * seq
    kv = 2 * s.layers * tokens * s.kv_heads * s.head_dim * c.B
    return max(c.Wd, after_prune(c)) + tokens * s.vocab * c.B + layer_forward(s, tokens, seq, c.B) + kv


PHASES = ("load", "calibrate", "score", "prune", "recover", "evaluate", "throughput")


def predict(cell: dict, s: Shapes | None = None) -> dict | None:
    """{phase: predicted peak bytes} of one grid cell (`suite.config.expand_cells`), on CPU with the
    interpreter baseline; phases the cell does not run are absent. Raises UserError as `shapes`."""
    s = s if s is not None else shapes(cell["model"])
    c = setting(cell, s)
    out = {"load": load(c)}
    if c.method != "dense":
        if c.calibration is not None:
            out["calibrate"] = calibrate(c)
        out["score"] = score(c)
        out["prune"] = prune(c)
        if c.recovery:
            out["recover"] = recover(c)
    out["evaluate"] = evaluate(c)
    if c.evaluation.get("throughput", True):
        out["throughput"] = throughput(c)
    if c.device == "cpu":
        out = {k: v + CONSTANTS["cpu_baseline_mb"] * MiB for k, v in out.items()}
    return out


# --------------------------------------------------------------------------- sizes and tables
def device_memory(device: str) -> int | None:
    """Default capacity: the visible GPU's memory for a cuda cell (None when torch sees none), the
    host's total RAM for a cpu cell."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / GiB:.2f}"


def cell_name(cell: dict) -> str:
    return f"{cell['model']} {cell.get('label', cell['method'])} {cell.get('ratio', 0.0):g} s{cell.get('seed', 0)}"


def dry_run_table(cells: list[dict], capacity: int | None = None) -> tuple[str, int, int]:
    """The `--dry-run` table (tabulate), the number of cells that will not fit and of those of unknown shapes.

    One row per cell: device, dtype, each phase's predicted peak (GB = GiB), the max, the capacity
    it is compared with (`capacity`, else `device_memory` of the cell's device) and "will not fit"."""
    from tabulate import tabulate

    rows, misfits, unknown, cache = [], 0, 0, {}
    for cell in cells:
        if cell["model"] not in cache:
            try:
                cache[cell["model"]] = shapes(cell["model"])
            except UserError as exc:
                cache[cell["model"]] = str(exc)
        s = cache[cell["model"]]
        device = str(cell.get("device", "cpu"))
        head = [cell_name(cell), device, cell.get("dtype", "float32")]
        if isinstance(s, str):
            rows.append(head + [f"shapes unknown: {s}"] + [""] * (len(PHASES) + 2))
            unknown += 1
            continue
        peaks = predict(cell, s)
        cap = capacity if capacity is not None else device_memory(device)
        top = max(peaks.values())
        fits = "?" if cap is None else ("" if top <= cap else "will not fit")
        misfits += fits == "will not fit"
        rows.append(head + [_gb(peaks[p]) if p in peaks else "-" for p in PHASES]
                    + [_gb(top), "?" if cap is None else _gb(cap), fits])
    headers = ["cell", "device", "dtype", *PHASES, "max", "memory", "fits"]
    headers[3] = "load (GiB)"
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), misfits, unknown


def compare_table(cells: list[dict], records: list[dict]) -> tuple[str, float | None]:
    """Predicted vs measured peak (MiB) per recorded phase of every cell with a record (matched by
    cell key), with the error (predicted / measured − 1, %); returns the table and the largest |error|."""
    from tabulate import tabulate

    from suite.records import cell_key

    by_key = {r.get("cell_key"): r for r in records if not r.get("error")}
    rows, worst = [], None
    for cell in cells:
        record = by_key.get(cell_key(cell))
        if record is None:
            continue
        try:
            peaks = predict(cell)
        except UserError:
            continue
        for phase, measured in sorted((record.get("phases") or {}).items()):
            if phase not in peaks or not measured.get("peak_mb"):
                continue
            predicted = peaks[phase] / MiB
            error = 100 * (predicted / measured["peak_mb"] - 1)
            worst = abs(error) if worst is None else max(worst, abs(error))
            rows.append([cell_name(cell), phase, f"{predicted:.0f}", f"{measured['peak_mb']:.0f}", f"{error:+.1f}"])
    headers = ["cell", "phase", "predicted MiB", "measured MiB", "error %"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), worst


def commit_warning(cells: list[dict], records: list[dict], path) -> str | None:
    """One line when the records `compare_table` matches were written by another commit than the
    current code's (`provenance.git_commit`): their peaks may predate the code the formulas follow."""
    from collections import Counter

    from suite.records import cell_key, provenance

    keys = {cell_key(cell) for cell in cells}
    current = provenance()["git_commit"]
    commits = Counter(str((r.get("provenance") or {}).get("git_commit") or "unknown")[:12]
                      for r in records if not r.get("error") and r.get("cell_key") in keys)
    others = [(c, n) for c, n in commits.most_common() if c != current[:12]]
    if not others:
        return None
    named = ", ".join(f"{c} ({n})" for c, n in others)
    return (f"warning: {path}: {sum(n for _, n in others)} of {sum(commits.values())} compared records come "
            f"from commit {named}, not the current code's {current[:12]}: measured peaks of older code may "
            "differ from what these formulas model")


def read_records(path) -> list[dict]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise UserError(f"--compare: cannot read {path}: {exc.strerror}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise UserError(f"--compare: {path}:{i} is not a JSON record") from None
    return out
