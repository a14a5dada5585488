"""The layer-by-layer pass: calibration hidden states carried through the decoder one layer at a time.

The mechanism of the field's own pruning code (SparseGPT `llama_sequential`, Wanda and FLAP
`lib/prune.py`: `prepare_calibration_input`, then per layer `outs[j] = layer(inps[j], ...)` and
`inps, outs = outs, inps`), written once for every method and architecture:

1. `LayerPass(model, windows)` runs the model's embeddings on the calibration windows and stops at
   the first decoder layer, keeping per micro-batch the layer's input hidden states
   [batch, seq, hidden], and the keyword arguments the model itself builds for each layer
   (attention mask, position ids, rotary `position_embeddings`, BLOOM's ALiBi, Gemma 3's per-type
   masks...; the layers' forwards are stubbed for that pass), so every architecture's own masking
   and positions are used, not re-derived here.
2. For layer i: `with lp.resident(i) as layer:` brings the layer to the compute device (no-op when
   it already lives there; see `resident`), `lp.forward(i)` runs every micro-batch through it
   (with whatever hooks the caller registered), the caller may score, select and slice the layer,
   and `lp.advance(outputs)` makes the outputs the next layer's inputs (recompute them first with
   another `lp.forward(i)` if the layer changed: sequential pruning, FLAP's `prune_wanda_sp`).
3. `lp.finish(hidden)` applies what follows the last layer inside the decoder (final norm, OPT's
   `project_out`): `head(lp.finish(h))` are the logits.

Memory: one layer's weights and activations plus the carried hidden states
(nsamples × seqlen × hidden × bytes; `hidden_device="cpu"` keeps them in host memory and moves one
micro-batch at a time to the device). A pass equals one whole-model forward of the same
micro-batches (tests/test_layerwise.py: per-layer input statistics ≤ 1e-5 relative).

Offloaded weights (`suite.models.load_model(offload="cpu"|"disk")`, accelerate's hooks): `resident`
materialises the layer and writes any change back to accelerate's offload storage on exit
(`materialised`); code outside a pass uses `resident_layer(model, i)` or `resident_sets(group_sets)`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from suite.pruning.architectures import adapter_for


_HIDDEN_ON: ContextVar = ContextVar("hidden_on", default=None)


@contextmanager
def hidden_on(device):
    """Within the block, passes whose `hidden_device` is not given keep their carried hidden states
    on `device` ("cpu", or None: the compute device): the user's `--hidden-on` for every method,
    one-shot statistics passes included, without a parameter through each method's `score`."""
    token = _HIDDEN_ON.set(device)
    try:
        yield
    finally:
        _HIDDEN_ON.reset(token)


def hidden_device():
    """Where passes now keep their carried hidden states: the enclosing `hidden_on` block's device
    ("cpu"), or None (the compute device)."""
    return _HIDDEN_ON.get()


class _Captured(Exception):
    """Raised by the first layer's pre-hook: the embeddings' work is done."""


def device_of(module: nn.Module) -> torch.device:
    """The device `module` computes on: its first non-meta parameter's, else (weights offloaded by
    accelerate) its hook's execution device, else cpu."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    hook = getattr(module, "_hf_hook", None)  # accelerate-dispatched: its execution device
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return torch.device("cpu")


_device_of = device_of  # the engine core's earlier private name


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerPass:
    """Calibration hidden states of the decoder layers, advanced one layer at a time.

    model:          a causal LM with an adapter (`architectures.adapter_for`)
    windows:        [nsamples, seqlen] token ids
    batch_size:     windows per micro-batch (FLAP and Wanda feed one at a time: 1)
    device:         compute device (default: the input embedding's device)
    hidden_device:  where the carried hidden states live between layers ("cpu" or the device;
                    default: the enclosing `hidden_on` block's, else the device)

    Attributes: `layers` (the decoder layers), `hidden` (list of [b, seq, hidden] tensors, the
    current layer's inputs), `kwargs[i][b]` (layer i's keyword arguments for micro-batch b, as the
    model builds them; identical ones are one shared object).
    """

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 1, device=None, hidden_device=None):
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = list(self.adapter.layers(model))
        embed = model.get_input_embeddings()
        self.device = torch.device(device) if device is not None else device_of(embed)
        hidden_device = hidden_device if hidden_device is not None else _HIDDEN_ON.get()
        self.hidden_device = torch.device(hidden_device) if hidden_device is not None else self.device
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self._capture(windows, max(1, int(batch_size)))

    def _capture(self, windows: torch.Tensor, batch_size: int) -> None:
        # Every layer's keyword arguments are recorded (Gemma 3 gives sliding and full-attention
        # layers different masks and rotary tables); the layers' own forwards are stubbed out for
        # this pass, since the models build all of them before their layer loop.
        n = len(self.layers)
        grabbed: dict = {}

        def grab(j):
            def hook(module, args, kwargs):
                if j == 0:
                    grabbed["hidden"] = args[0] if args else kwargs["hidden_states"]
                grabbed[j] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if j == n - 1:
                    raise _Captured
            return hook

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        handles = [layer.register_forward_pre_hook(grab(j), with_kwargs=True) for j, layer in enumerate(self.layers)]
        saved = [layer.__dict__.get("forward") for layer in self.layers]  # accelerate's wrapper, if any
        for layer in self.layers:
            layer.forward = passthrough
        base = getattr(self.model, "base_model", None) or self.model
        embed_device = device_of(self.model.get_input_embeddings())
        self.kwargs = [[] for _ in range(n)]
        shared: list[dict] = []
        try:
            with torch.no_grad():
                for batch in windows.split(batch_size):
                    grabbed.clear()
                    try:
                        base(input_ids=batch.to(embed_device), use_cache=False)
                    except _Captured:
                        pass
                    else:
                        raise RuntimeError("the last decoder layer was never called")
                    self.hidden.append(grabbed["hidden"].detach().to(self.hidden_device))
                    for j in range(n):
                        kwargs = {k: _move(v, self.device) for k, v in grabbed[j].items()}
                        # equal micro-batches and layers of one type get equal masks / positions: one copy
                        kwargs = next((e for e in shared if e.keys() == kwargs.keys()
                                       and all(_same(e[k], kwargs[k]) for k in kwargs)), kwargs)
                        if not any(e is kwargs for e in shared):
                            shared.append(kwargs)
                        self.kwargs[j].append(kwargs)
        finally:
            for h in handles:
                h.remove()
            for layer, forward in zip(self.layers, saved):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @contextmanager
    def resident(self, i: int):
        """Layer i on the compute device for the duration of the block (SparseGPT's
        `layers[i].to(dev)` ... `layers[i] = layer.cpu()`): moved there and back when it lives
        elsewhere, untouched when it already lives on the device. A layer whose weights accelerate
        offloaded (`suite.models.load_model(offload=...)`) is materialised and its changes written
        back to the offload storage on exit (`materialised`)."""
        layer = self.layers[i]
        if offloaded(layer):
            with materialised(layer):
                yield layer
            return
        home = device_of(layer)
        if home == self.device:
            yield layer
            return
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to(home)

    def forward(self, i: int, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Layer i's outputs for every micro-batch (on `hidden_device`), from `inputs` (default: the
        current hidden states). Runs under no_grad; hooks the caller registered on the layer fire."""
        layer = self.layers[i]
        outputs = []
        with torch.no_grad():
            for h, kwargs in zip(self.hidden if inputs is None else inputs, self.kwargs[i]):
                out = _hidden(layer(h.to(self.device), **kwargs))
                outputs.append(out.to(self.hidden_device))
        return outputs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The next layer's inputs are `outputs` (from `forward`)."""
        self.hidden = outputs

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the decoder applies after its last layer (final norm; OPT's project_out)."""
        for module in self.adapter.tail(self.model):
            hidden = module(hidden)
        return hidden


# --------------------------------------------------------------------------- accelerate offload
def _offload_hooks(module: nn.Module) -> list:
    """(submodule, hook) for every submodule of `module` whose weights accelerate offloaded: an
    `AlignDevicesHook` with `offload=True` (`accelerate.utils.has_offloaded_params`); transformers'
    `from_pretrained(device_map=...)` and `accelerate.dispatch_model` put one on each leaf module."""
    if not any(hasattr(m, "_hf_hook") for m in module.modules()):
        return []
    from accelerate.utils import has_offloaded_params

    return [(m, m._hf_hook) for m in module.modules() if has_offloaded_params(m)]


def offloaded(module: nn.Module) -> bool:
    """Whether any weight of `module` (or its submodules) lives in accelerate's offload storage
    (meta tensors in the module, values in the hook's `weights_map`)."""
    return bool(_offload_hooks(module))


def _tensors(module: nn.Module, hook) -> dict:
    from accelerate.utils import named_module_tensors

    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=False,
                                     remove_non_persistent=True))


def _store(hook, name: str, tensor: torch.Tensor) -> None:
    """Write `tensor` as the hook's offloaded value of `name`: into the loader's in-memory dict
    (cpu offload) or as a new `.dat` file in its folder (disk offload, `accelerate.utils.offload_weight`,
    the file name accelerate reads it back from). The model's own weights files are never written."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    value = tensor.detach().to("cpu")
    store, key = hook.weights_map, name
    if isinstance(store, PrefixedDataset):
        store, key = store.dataset, store.prefix + name
    if not isinstance(store, OffloadedWeightsLoader):  # accelerate's own dict of cpu copies
        store[key] = value.clone()
        return
    if key in store.state_dict or store.save_folder is None:
        store.state_dict[key] = value.clone()
    else:
        path = os.path.join(store.save_folder, f"{key}.dat")
        if os.path.exists(path):
            os.unlink(path)  # a new file: readers of the old one keep their copy
        offload_weight(value, key, store.save_folder, index=store.index)
    if key not in store.all_keys:
        store.all_keys.append(key)


@contextmanager
def materialised(module: nn.Module):
    """The offloaded weights of `module` and its submodules loaded on their execution device for
    the block (accelerate's `align_module_device`, for a whole decoder layer at once), the hooks'
    own loading switched off meanwhile so forwards inside the block use (and may backpropagate
    through) these tensors; on exit every tensor that changed is written back to the offload
    storage (`_store`) and all are released to the meta device again.

    Changed means: a new Parameter object (slicing replaces weights with new shapes; FLAP's
    compensation adds a bias) or an in-place edit (the tensor's version counter moved). Unchanged
    tensors are not written. A no-op for a module without offloaded weights."""
    hooks = _offload_hooks(module)
    if not hooks:
        yield module
        return
    entered = []
    try:
        for m, hook in hooks:
            hook.pre_forward(m)
            hook.offload = False  # forwards inside the block: inputs moved, weights left in place
            entered.append((m, hook, {n: (t, t._version) for n, t in _tensors(m, hook).items()}))
        yield module
    finally:
        for m, hook, before in entered:
            hook.offload = True
            for name, tensor in _tensors(m, hook).items():
                if tensor.device.type == "meta":
                    continue
                old = before.get(name)
                if old is None or old[0] is not tensor or old[1] != tensor._version:
                    _store(hook, name, tensor)
            hook.post_forward(m, None)


def parameter_count(model) -> int:
    """All parameters of `model`, tied ones once; offloaded ones (meta tensors) by shape.

    accelerate's hooks give an offloaded module new Parameter objects after each forward, so tied
    input and output embeddings (`tie_word_embeddings`) may then be two objects: counted once."""
    total = sum(p.numel() for p in model.parameters())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if (getattr(model.config, "tie_word_embeddings", False) and out is not None and inp is not None
            and out.weight is not inp.weight and out.weight.shape == inp.weight.shape):
        total -= out.weight.numel()
    return total


def rebind_hooked_forwards(module: nn.Module) -> None:
    """After slicing swapped a submodule's class (BLOOM's attention that adds only its kept heads'
    ALiBi slopes, a dropped attention block), make accelerate's hook call the NEW class's forward:
    `add_hook_to_module` kept the old bound forward in `_old_forward`. No-op without hooks."""
    for m in module.modules():
        old = m.__dict__.get("_old_forward")
        if old is not None and getattr(old, "__func__", None) is not type(m).forward:
            m._old_forward = type(m).forward.__get__(m)


def resident_layer(model, i: int):
    """`with resident_layer(model, i) as layer:` decoder layer i with its weights readable and
    writable (offloaded ones materialised and written back, `materialised`): for code outside a
    `LayerPass` that reads or changes a layer's weights (one-shot scoring, `plan.apply_plan`,
    FLAP's compensation)."""
    return materialised(adapter_for(model).layers(model)[i])


def resident_sets(group_sets):
    """Iterate `group_sets` with each one's decoder layer resident (`materialised`, one layer at a
    time, consecutive sets of one layer sharing the residency): one-shot scoring that reads
    weights writes `for gs in resident_sets(group_sets):` instead of `for gs in group_sets:`."""
    i = 0
    while i < len(group_sets):
        j = i
        while j < len(group_sets) and group_sets[j].module is group_sets[i].module:
            j += 1
        with materialised(group_sets[i].module):
            yield from group_sets[i:j]
        i = j


def layer_gradients(model, windows: torch.Tensor, on_layer, batch_size: int = 1, hidden_device=None,
                    layers=None) -> float:
    """Backpropagate the mean causal-LM loss over `windows` ONE decoder layer at a time (gradient
    checkpointing at layer granularity, as the layer pass does the forward): the forward runs
    layer by layer keeping every layer's input hidden states (on `hidden_device`); the loss of
    every micro-batch is taken from the last layer's outputs through the decoder's tail and the
    head (`architectures.decoder_and_head`); then for i = L-1 ... 0, with layer i resident
    (offloaded weights materialised, `LayerPass.resident`), its forward is recomputed from its
    saved inputs with autograd on, the upstream gradient is backpropagated through it, and
    `on_layer(i, layer)` is called while the layer's parameters hold their .grad (dL/dW of the
    whole loss, every parameter of the layer requiring grad); then the .grad are dropped and the
    input gradient goes down one layer. `layers` (default all): the layers whose `on_layer` is
    called; the sweep stops below the lowest one.

    Equal to one whole-model `model(x, labels=x).loss.backward()` up to floating-point order
    (tests/test_offload.py). Memory: one layer's weights, activations and gradients, the L + 1
    hidden-state sets, one micro-batch's logits. Returns the loss (float). Dropout is not
    re-seeded between the two forwards of a layer: call it in eval mode.
    """
    from torch.nn import functional as F

    from suite.pruning.architectures import decoder_and_head

    _, head = decoder_and_head(model)
    lp = LayerPass(model, windows, batch_size, hidden_device=hidden_device)
    wanted = set(range(len(lp.layers)) if layers is None else layers)
    if not wanted:
        return float("nan")
    inputs = []
    for i in range(len(lp.layers)):  # forward: keep each layer's inputs
        inputs.append(lp.hidden)
        with lp.resident(i):
            lp.advance(lp.forward(i))
    count = windows.shape[0] * (windows.shape[1] - 1)  # HF's mean over every predicted token
    upstream, total = [], 0.0
    for h, ids in zip(lp.hidden, windows.split(max(1, int(batch_size)))):
        h = h.to(lp.device).requires_grad_(True)
        with torch.enable_grad():
            logits = head(lp.finish(h)).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   ids[:, 1:].reshape(-1).to(logits.device), reduction="sum") / count
            (grad,) = torch.autograd.grad(loss, h)
        total += float(loss)
        upstream.append(grad)
    for i in range(max(wanted), min(wanted) - 1, -1):
        with lp.resident(i) as layer:
            flags = {p: p.requires_grad for p in layer.parameters()}
            for p in flags:
                p.requires_grad_(True)
                p.grad = None
            try:
                below = []
                for x, grad, kwargs in zip(inputs[i], upstream, lp.kwargs[i]):
                    x = x.to(lp.device).requires_grad_(True)
                    with torch.enable_grad():
                        torch.autograd.backward(_hidden(layer(x, **kwargs)), grad.to(lp.device))
                    below.append(x.grad)
                if i in wanted:
                    on_layer(i, layer)
            finally:
                for p, flag in flags.items():
                    p.grad = None
                    p.requires_grad_(flag)
        upstream = below
        inputs[i] = None  # no longer needed
    return total
