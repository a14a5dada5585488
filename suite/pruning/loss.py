"""The calibration loss: mean next-token cross-entropy, forward-only or with autograd, whole-model or
layer by layer (one decoder layer resident, several hidden-state streams at once).

Shared by the methods that read a loss: MINI-LLM's SPSA estimates (`minillm/zo.py`) and gates,
LLM-Pruner's Taylor pass (`baselines/llm_pruner.py`), and any method that evaluates masked or
perturbed copies of the model on the layer pass (`LayerwiseLoss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from suite.pruning.architectures import decoder_and_head
from suite.pruning.layerwise import LayerPass


LOSS_CHUNK_ELEMENTS = 1 << 22  # logits of at most 4M entries (16 MB in fp32) exist at once


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk of rows: fp32 logits = head(hidden), then log-softmax."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _lm_loss_sum(model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of one batch (fp32 logits) and its token count.

    batch: [b, s] token ids; returns (a 0-dim fp32 tensor, b·(s−1)). The output embedding is
    applied to the decoder's last hidden states a few rows at a time (`LOSS_CHUNK_ELEMENTS`
    logits per chunk), so the [b, s, vocab] logits never exist at once (4 x 128 tokens x 49k
    vocabulary would be 100 MB, with as much again for log-softmax).

    Under autograd (`torch.is_grad_enabled()`), chunking alone would not bound memory: every
    chunk's logits and log-softmax would be saved for backward, i.e. the full logits again. Each
    chunk therefore runs under `torch.utils.checkpoint.checkpoint` (non-reentrant): only its slice
    of the last hidden states is saved, and the head and cross-entropy are recomputed chunk by
    chunk during backward. A backward pass then holds the decoder's activations plus one chunk's
    logits, whatever the vocabulary. Without grad (forward-only passes) nothing is saved anyway.

    Same value as ``cross_entropy(model(x).logits[:, :-1], x[:, 1:], reduction="sum")`` and the
    same gradient, up to fp32 summation order (tests/test_minillm.py, tests/test_backprop.py).
    A model whose head cannot be separated (`decoder_and_head` gives None) computes full logits.
    """
    targets = batch[:, 1:].reshape(-1)
    base, head = decoder_and_head(model)
    if base is None:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, reduction="sum")
        return loss, targets.numel()
    hidden = base(input_ids=batch, use_cache=False)[0][:, :-1]
    return head_loss_sum(head, hidden.reshape(-1, hidden.size(-1)), targets), targets.numel()


def head_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy(head(hidden), targets) for hidden [tokens, hidden] and targets [tokens], the
    output embedding applied `LOSS_CHUNK_ELEMENTS // vocab` rows at a time (fp32 logits per chunk)."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)
    saving = torch.is_grad_enabled()
    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if saving:
            part = checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_loss_sum(head, h, t)
        loss = loss + part
    return loss


def calibration_loss(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of the causal LM on the calibration windows (no grad)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            loss, n = _lm_loss_sum(model, batch.to(device))
            total += float(loss.double())
            count += n
    return total / count


def backprop_loss(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `windows` with autograd, backpropagated micro-batch by micro-batch.

    windows: [n, s] token ids; `batch_size` windows per forward+backward. Each micro-batch's summed
    loss is divided by the token count of ALL windows, n·(s−1), before its backward, so the `.grad`
    of everything that requires grad accumulates exactly d(mean loss)/dθ, the gradient of one
    batch ``model(x, labels=x).loss`` (equal up to floating-point summation order; the windows are
    equal-length and unpadded). Memory: one micro-batch's decoder activations plus one loss chunk
    (`_lm_loss_sum` checkpoints the head), and the `.grad` buffers. Returns the mean loss (float).
    The caller owns clearing `.grad`. Shared by MINI-LLM's `gradient=backprop` and gate backprop
    (minillm/method.py) and LLM-Pruner's Taylor pass (baselines/llm_pruner.py).
    """
    device = next(model.parameters()).device
    count = windows[:, 1:].numel()
    total = 0.0
    with torch.enable_grad():
        for batch in windows.split(max(1, int(batch_size))):
            loss, _ = _lm_loss_sum(model, batch.to(device))
            (loss / count).backward()
            total += float(loss.detach().double())
    return total / count


# --------------------------------------------------------------------------- layer by layer
class LayerwiseLoss:
    """The calibration loss of perturbed copies of the model, computed on the layer-by-layer pass.

    A *stream* is one copy's hidden states (a list of [b, seq, hidden] micro-batches, on the pass's
    `hidden_device`). `losses(start, inputs, perturbation)` sends `perturbation.n` streams into
    layer `start` with `inputs` and through every later layer, each layer resident ONCE for all
    streams (`LayerPass.resident`): at a layer the perturbation touches, stream s runs after
    `perturbation.apply(j, s)` has put layer j's tensors in stream s's state, and
    `perturbation.leave(j)` puts them back before the next layer (also when anything raises);
    at a layer it does not touch, streams that share their inputs share one forward. After the
    last layer `LayerPass.finish` and the output embedding in chunks (`head_loss_sum`, as
    `calibration_loss`) give each stream's mean next-token cross-entropy.

    Memory: one layer's weights and activations, plus n + 1 streams of nsamples × seqlen × hidden
    × bytes (n = 2q for SPSA), plus the perturbation's own copy of one layer's perturbed tensors.
    `layer_forwards` counts forwards of one layer over the whole calibration set.
    """

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 4, hidden_device=None):
        _, self.head = decoder_and_head(model)
        if self.head is None:
            raise ValueError(f"{type(model).__name__}: no decoder/head split for the layer-by-layer loss")
        self.lp = LayerPass(model, windows, batch_size, hidden_device=hidden_device)
        self.targets = [b[:, 1:].reshape(-1) for b in windows.split(max(1, int(batch_size)))]
        self.count = int(windows[:, 1:].numel())
        self.layer_forwards = 0

    @property
    def depth(self) -> int:
        return len(self.lp.layers)

    def loss(self, stream: list[torch.Tensor], blocks: int = 1):
        """Mean next-token cross-entropy of a stream that has passed the last layer; with `blocks`
        > 1, a list: the mean of each of `blocks` equal consecutive row blocks of every micro-batch
        (m copies of the windows in one batch, `gates.gated` with 2-D gates)."""
        totals = [0.0] * blocks
        with torch.no_grad():
            for h, t in zip(stream, self.targets, strict=True):
                h = self.lp.finish(h.to(self.lp.device))[:, :-1]
                rows, t = h.shape[0] // blocks, t.to(h.device).view(h.shape[0], -1)
                for r in range(blocks):
                    part = h[r * rows:(r + 1) * rows]
                    totals[r] += float(head_loss_sum(self.head, part.reshape(-1, part.size(-1)),
                                                     t[r * rows:(r + 1) * rows].reshape(-1)).double())
        out = [total / (self.count / blocks) for total in totals]
        return out[0] if blocks == 1 else out

    @staticmethod
    def _consumed(streams, s):
        """Stream s's micro-batches, each dropped from it as it is read when no other stream shares
        the list (`LayerPass.forward` zips its inputs lazily): one micro-batch in flight, not a stream."""
        stream = streams[s]
        if any(other is stream for t, other in enumerate(streams) if t != s):
            return stream

        def read():
            for b in range(len(stream)):
                h, stream[b] = stream[b], None
                yield h
        return read()

    def losses(self, start: int, inputs: list[torch.Tensor], perturbation, progress=None, blocks: int = 1) -> list:
        """Each stream's `loss` (a list of `blocks` losses per stream when blocks > 1)."""
        streams = [inputs] * perturbation.n
        steps = range(start, self.depth)
        for j in (progress(steps) if progress else steps):
            with self.lp.resident(j):
                if j in perturbation.layers:
                    perturbation.enter(j)
                    try:
                        for s in range(perturbation.n):
                            perturbation.apply(j, s)
                            inputs_s = self._consumed(streams, s) if j > start else streams[s]
                            streams[s] = self.lp.forward(j, inputs_s)
                    finally:
                        perturbation.leave(j)
                    self.layer_forwards += perturbation.n
                else:
                    done = {}
                    for s in range(perturbation.n):
                        if id(streams[s]) not in done:
                            done[id(streams[s])] = self.lp.forward(
                                j, self._consumed(streams, s) if j > start else streams[s])
                            self.layer_forwards += 1
                        streams[s] = done[id(streams[s])]
                    del done
        out = []
        for s in range(perturbation.n):
            out.append(self.loss(streams[s], blocks))
            streams[s] = None
        return out

    def clean_inputs(self, layers):
        """Yield (i, the unperturbed inputs of layer i) for the sorted `layers`, advancing one stream
        from layer 0 (each layer between resident once); then `clean_loss` holds the unperturbed loss."""
        h, i = self.lp.hidden, 0
        for target in sorted(set(layers)):
            while i < target:
                with self.lp.resident(i):
                    h = self.lp.forward(i, h)
                self.layer_forwards += 1
                i += 1
            yield target, h
        while i < self.depth:
            with self.lp.resident(i):
                h = self.lp.forward(i, h)
            self.layer_forwards += 1
            i += 1
        self.clean_loss = self.loss(h)
