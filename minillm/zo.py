"""Forward-only (zeroth-order) gradient estimates: two-sided SPSA, in place and seed-regenerated.

This is the estimator of MINI-LLM (Cheng, Zhang, Shi 2024, arXiv 2407.11681, Sec. 3.2), which takes
it from MeZO (Malladi et al. 2023, `large_models/trainer.py`: `zo_perturb_parameters`,
`zo_forward`, `zo_step`). For each of q directions k with seed s_k and z_k ~ N(0, I):

    θ += ε z_k ; L₊ = L(θ)
    θ −= 2ε z_k; L₋ = L(θ)
    θ += ε z_k                              (back to θ, up to rounding: see below)
    c_k = (L₊ − L₋) / 2ε                   (the projected gradient, ≈ gᵀ z_k)
    ĝ = (1/q) Σ_k c_k z_k                   (E[ĝ] = ∇L + O(ε²): unbiased for the smoothed loss)

Memory, as in MeZO: z is never stored. Every perturbed tensor i draws its share of z_k from its own
`torch.Generator` seeded by `tensor_seed(s_k, i)` (splitmix64 of the pair), so any one tensor's
share can be regenerated alone, bitwise identically, long after the forward passes. The estimate
is therefore only the list of (s_k, c_k) pairs (`Estimate`); `Estimate.gradient(i)` rebuilds ĝ for
tensor i alone (one tensor-sized buffer + one for z), which the scorer reduces to group scores at
once and drops. No parameter `.grad`, no copy of the weights, never two tensors' ĝ at a time.
(MeZO reseeds the global RNG and draws all parameters in sequence; per-tensor generators are this
project's change: they make a single tensor's z regenerable without drawing all earlier ones.)

Restoring the weights. In floating point W + εz − 2εz + εz is not W bitwise: each of the three
in-place additions rounds its result. The error of one addition is at most half an ulp of its
result plus half an ulp of the rounded product εz (the products themselves cancel exactly: 2ε is a
power-of-two multiple of ε), so after q directions every element satisfies

    |ΔW| ≤ Σ_k 3·½·(ulp(M_k) + ulp(2ε·max|z_k|)),   M_k = max|W| + 2ε·max|z_k| + drift so far,

which `spsa` accumulates per tensor (`Estimate.drift_bound`); typically ~1e-7 for fp32 weights of
magnitude ≤ 1 at q = 64 (the measured drift is a random walk, well below the bound).
In bf16 the bound is ~2^8 times the fp32 one: 16 round trips changed 85 % of SmolLM2's prunable
weights, by up to 1.6e-2 relative. MINI-LLM therefore restores them exactly (`restore=auto`): on
the layer-by-layer pass (`spsa_layerwise`, below) the perturbed tensors of the ONE resident layer
are copied before its first stream and every stream starts from that copy, which is copied back
before the next layer: bit-identical for every source (hub id, local directory, `.bin`, GGUF,
models built in code) and dtype, at the memory of one layer's perturbed tensors (SmolLM2-135M
fp32: one layer's q/o/gate/up/down, `copy_mb` 12.7 MiB) and no disk. `Snapshot` (a scratch file in
`$MINILLM_SCRATCH` or the temp dir holding all perturbed tensors' bytes) remains for SPSA over
tensors outside the decoder layers (`perturb=all`: embeddings and head too), which runs whole-model
forwards. `restore=checkpoint` instead reads the tensors back from the safetensors directory the
model was loaded from (`model.name_or_path`), verified against the drift bound tensor by tensor (a
file that is not the model's source is refused, and that tensor keeps its bounded drift);
`restore=arithmetic` keeps the drift.

Layer by layer (`suite.pruning.loss.LayerwiseLoss`, `spsa_layerwise`, `coordinate_layerwise`, `blockwise_layerwise`):
the losses are computed on `layerwise.LayerPass`, one decoder layer resident at a time, carrying
one hidden-state stream per perturbed copy of the model (2q for SPSA); memory is one layer plus
(2q + 1) × nsamples × seqlen × hidden of hidden states, wherever the rest of the model lives.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open

from suite.pruning.loss import LayerwiseLoss

_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------- seeds and directions
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def tensor_seed(seed: int, index: int) -> int:
    """Seed of tensor `index`'s share of the direction with seed `seed` (63-bit, well mixed).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed; splitmix64 mixes every
    input bit into those, so distinct (seed, index) pairs still get distinct streams but for
    chance collisions (~1e-3 over a whole q = 16 estimate of SmolLM2's ~200 weight tensors).
    """
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(index) & _MASK64)) >> 1


def direction_seeds(seed: int, q: int, stream: int = 0) -> list[int]:
    """The q direction seeds of one estimate; `stream` separates independent estimates (layers)."""
    base = tensor_seed(seed, stream + (1 << 40))
    return [tensor_seed(base, k) for k in range(q)]


def direction(seed: int, index: int, shape, device="cpu") -> torch.Tensor:
    """z ~ N(0, I) in float32 for tensor `index` of direction `seed`: regenerated bitwise identically.

    Drawn on `device` (a CUDA generator draws different numbers than the CPU one: estimates are
    reproducible per device type).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, index))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)


def ulp(x: float, dtype: torch.dtype = torch.float32) -> float:
    """Unit in the last place of a positive number x in `dtype` (an upper bound for subnormals too)."""
    info = torch.finfo(dtype)
    x = max(float(x), info.tiny)
    return info.eps * 2.0 ** math.floor(math.log2(x))


# --------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """A two-sided SPSA estimate stored as seeds and projected gradients (no tensor is kept).

    names/shapes: the perturbed tensors in order (tensor i's z share uses index i).
    seeds, coeffs: s_k and c_k = (L₊ − L₋)/2ε per direction k.
    drift_bound: per tensor, the bound on max |ΔW| the in-place round trips can have left.
    """

    names: list[str]
    shapes: list[tuple]
    seeds: list[int]
    coeffs: list[float]
    eps: float
    drift_bound: list[float] = field(default_factory=list)
    device: str = "cpu"

    @property
    def q(self) -> int:
        return len(self.seeds)

    def z(self, k: int, i: int) -> torch.Tensor:
        return direction(self.seeds[k], i, self.shapes[i], self.device)

    def gradient(self, i: int, q: int | None = None) -> torch.Tensor:
        """ĝ of tensor i from the first q directions, rebuilt from the seeds (float32)."""
        q = self.q if q is None else q
        if not 0 < q <= self.q:
            raise ValueError(f"q must be in 1..{self.q}, got {q}")
        out = torch.zeros(self.shapes[i], dtype=torch.float32, device=self.device)
        for k in range(q):
            out.add_(self.z(k, i), alpha=self.coeffs[k])
        return out.div_(q)

    def prefix_gradients(self, i: int, qs: Sequence[int]):
        """Yield (q, ĝ_q) for the increasing prefixes `qs` of tensor i, drawing each z once."""
        qs = sorted(set(int(q) for q in qs))
        acc = torch.zeros(self.shapes[i], dtype=torch.float32, device=self.device)
        done = 0
        for q in qs:
            for k in range(done, q):
                acc.add_(self.z(k, i), alpha=self.coeffs[k])
            done = q
            yield q, acc / q

    def summary(self) -> dict:
        c = torch.tensor(self.coeffs, dtype=torch.float64) if self.coeffs else torch.zeros(1, dtype=torch.float64)
        return {
            "q": self.q, "eps": self.eps, "tensors": len(self.names),
            "dims": int(sum(math.prod(s) for s in self.shapes)),
            "coeff_mean": float(c.mean()), "coeff_rms": float(c.pow(2).mean().sqrt()),
            "drift_bound": max(self.drift_bound) if self.drift_bound else 0.0,
        }


@torch.no_grad()
def _perturb(tensors, seed: int, scale: float, device, want_max: bool = False) -> list[float]:
    zmax = []
    for i, t in enumerate(tensors):
        z = direction(seed, i, t.shape, device)
        if want_max:
            zmax.append(float(z.abs().max()) if z.numel() else 0.0)
        t.add_(z.to(t.dtype), alpha=scale)
        del z
    return zmax


def _new_estimate(named_tensors, eps: float, directions: int, seed: int, stream: int, device) -> "Estimate":
    """An empty `Estimate` for SPSA over `named_tensors` (`spsa`, `spsa_layerwise`): the direction
    seeds of (seed, stream), the tensors' names and shapes. Raises ValueError for eps <= 0 or
    directions < 1."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions}")
    return Estimate([n for n, _ in named_tensors], [tuple(t.shape) for _, t in named_tensors],
                    direction_seeds(seed, directions, stream), [], float(eps),
                    device=str(device.type if device.type != "cuda" else device))


def spsa(loss_fn: Callable[[], float], named_tensors: Sequence[tuple[str, torch.Tensor]], eps: float,
         directions: int, seed: int, stream: int = 0, progress=None) -> Estimate:
    """Two-sided SPSA of `loss_fn` w.r.t. `named_tensors`, perturbed in place and put back.

    `loss_fn()` evaluates the loss at the current (perturbed) values and returns a float. The same
    calibration batch is used for L₊ and L₋ (MeZO). If anything raises mid-direction the pending
    perturbation is undone before the exception propagates.
    """
    tensors = [t for _, t in named_tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    est = _new_estimate(named_tensors, eps, directions, seed, stream, device)
    with torch.no_grad():
        amax = [float(t.abs().max()) if t.numel() else 0.0 for t in tensors]
    drift = [0.0] * len(tensors)
    steps = range(directions)
    for k in (progress(steps) if progress else steps):
        s = est.seeds[k]
        offset = 0.0  # how far from θ the tensors are, in units of ε·z_k
        try:
            zmax = _perturb(tensors, s, eps, device, want_max=True)
            offset = 1.0
            lp = float(loss_fn())
            _perturb(tensors, s, -2 * eps, device)
            offset = -1.0
            lm = float(loss_fn())
            _perturb(tensors, s, eps, device)
            offset = 0.0
        finally:
            if offset:
                _perturb(tensors, s, -offset * eps, device)
        est.coeffs.append((lp - lm) / (2 * eps))
        for i, t in enumerate(tensors):
            step = 2 * eps * zmax[i]
            big = amax[i] + drift[i] + step
            drift[i] += 1.5 * (ulp(big, t.dtype) + ulp(step, t.dtype)) if big > 0 else 0.0
    est.drift_bound = drift
    return est


@dataclass
class CoordinateEstimate:
    """Central differences along every coordinate: ĝ_j = (L(θ + ε e_j) − L(θ − ε e_j)) / 2ε.

    Forward-only like SPSA but deterministic and exact up to O(ε²); it costs 2 forwards per
    coordinate, so it only suits small spaces (a layer's head gates, the per-sub-block gates),
    where it beats SPSA at equal cost once q ≳ d/2. This project's addition, not the paper's.
    """

    names: list[str]
    grads: list[torch.Tensor]
    eps: float
    forwards: int

    @property
    def q(self) -> int:
        return self.forwards // 2

    def gradient(self, i: int, q: int | None = None) -> torch.Tensor:
        return self.grads[i].clone()

    def summary(self) -> dict:
        return {"estimator": "coordinate", "eps": self.eps, "tensors": len(self.names),
                "dims": int(sum(g.numel() for g in self.grads)), "drift_bound": 0.0}


def coordinate(loss_fn: Callable[[], float], named_tensors: Sequence[tuple[str, torch.Tensor]], eps: float,
               progress=None) -> CoordinateEstimate:
    """Central-difference gradient of `loss_fn` w.r.t. every element of `named_tensors` (restored exactly)."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    grads, forwards = [], 0
    coords = [(i, j) for i, (_, t) in enumerate(named_tensors) for j in range(t.numel())]
    out = [torch.zeros(t.numel(), dtype=torch.float64) for _, t in named_tensors]
    for i, j in (progress(coords) if progress else coords):
        flat = named_tensors[i][1].view(-1)
        with torch.no_grad():
            saved = flat[j].clone()
            try:
                flat[j] = saved + eps
                lp = float(loss_fn())
                flat[j] = saved - eps
                lm = float(loss_fn())
            finally:
                flat[j] = saved  # the saved scalar: exact
        out[i][j] = (lp - lm) / (2 * eps)
        forwards += 2
    for (_, t), g in zip(named_tensors, out):
        grads.append(g.float().view(t.shape).to(t.device))
    return CoordinateEstimate([n for n, _ in named_tensors], grads, float(eps), forwards)


# --------------------------------------------------------------------------- restoring weights
class Snapshot:
    """The exact bytes of `tensors`, kept in an anonymous scratch file until `restore()`.

    Written and read one tensor at a time (memory: one tensor's bytes on the host); the file is
    unlinked at creation (`tempfile.TemporaryFile`), so it vanishes with the process whatever
    happens. Directory: `$MINILLM_SCRATCH`, else the system's temp dir. `bytes`: the file's size.
    """

    def __init__(self, tensors):
        self.file = tempfile.TemporaryFile(dir=os.environ.get("MINILLM_SCRATCH") or None)
        self.spans = []
        with torch.no_grad():
            for t in tensors:
                raw = t.detach().reshape(-1).cpu().view(torch.uint8).numpy()  # no copy for a CPU tensor
                self.spans.append((self.file.tell(), raw.nbytes, t.dtype, tuple(t.shape)))
                self.file.write(memoryview(raw))
        self.file.flush()
        self.bytes = self.file.tell()

    def restore(self, tensors) -> int:
        """Copy the saved bytes back into `tensors` (the same tensors, in order); returns their count."""
        with torch.no_grad():
            for t, (start, size, dtype, shape) in zip(tensors, self.spans, strict=True):
                if (t.dtype, tuple(t.shape)) != (dtype, shape):
                    raise ValueError(f"snapshot: tensor changed from {dtype}{list(shape)} to {t.dtype}{list(t.shape)}")
                buf = bytearray(size)
                self.file.seek(start)
                self.file.readinto(buf)
                if size:
                    t.copy_(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape))
                del buf
        self.file.close()
        return len(self.spans)


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes SPSA perturbs


def _safetensors_index(path: Path) -> dict:
    """name -> (path, name, shape) of the floating-point tensors of a .safetensors file (its header
    only, through `safetensors.safe_open`). Raises SafetensorError or OSError for an unreadable file."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            view = f.get_slice(name)
            if view.get_dtype() in _FLOAT_DTYPES:
                out[name] = (path, name, tuple(view.get_shape()))
    return out


def _read_tensor(where) -> torch.Tensor:
    """One tensor of `_safetensors_index`'s `where`, in the file's dtype (`safe_open.get_tensor`: only that
    tensor's bytes are read; its mapping is dropped when the file is closed)."""
    path, name, _ = where
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def restore_from_checkpoint(model, named_tensors, bounds) -> dict:
    """Copy the perturbed tensors back from the safetensors the model was loaded from, one at a time.

    A tensor is restored only if the file's value is within its drift bound of the current one
    (so a file that is not this model's source is never copied in). Tensors are read one at a time
    (`safetensors.safe_open`, only that tensor's bytes), so the peak is one tensor. Returns a summary:
    {"restore": "checkpoint"|"partial"|"arithmetic", "restored", "tensors", "drift_bound", "source"}.
    """
    summary = {"restore": "arithmetic", "restored": 0, "tensors": len(named_tensors),
               "drift_bound": max(bounds) if bounds else 0.0, "source": None}
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    folder = Path(str(source)) if source else None
    if not named_tensors or folder is None or not folder.is_dir():
        return summary
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            index.update(_safetensors_index(path))
        except (OSError, SafetensorError):
            continue
    if not index:
        return summary
    summary["source"] = str(folder)
    restored = 0
    with torch.no_grad():
        for (name, tensor), bound in zip(named_tensors, bounds):
            where = index.get(name)
            if where is None or where[2] != tuple(tensor.shape):
                continue
            saved = _read_tensor(where).to(device=tensor.device, dtype=tensor.dtype)
            if float((saved - tensor).abs().max()) <= bound * (1 + 1e-6):
                tensor.copy_(saved)
                restored += 1
            del saved
    summary["restored"] = restored
    if restored:
        summary["restore"] = "checkpoint" if restored == len(named_tensors) else "partial"
    return summary


def parameter_layers(lp, tensors) -> list[int]:
    """The decoder layer holding each tensor (by identity); ValueError for one outside the layers."""
    where = {id(p): i for i, layer in enumerate(lp.layers) for p in layer.parameters()}
    missing = [i for i, t in enumerate(tensors) if id(t) not in where]
    if missing:
        raise ValueError(f"{len(missing)} perturbed tensor(s) are not in a decoder layer")
    return [where[id(t)] for t in tensors]


class Directions:
    """SPSA's 2q streams: stream 2k is θ + εz_k, stream 2k+1 is θ − εz_k on every perturbed layer.

    z_k's share of tensor `index` is `direction(seeds[k], index, shape)`: the same z as `spsa`
    perturbing all tensors at once, so the estimate is the same up to floating-point order.
    exact=True: layer j's perturbed tensors are copied once on entering it (memory: one layer's
    perturbed tensors) and every stream starts from that copy, which is copied back on leaving:
    bit-identical for every source and dtype. exact=False: MeZO's in-place round trips +εz, −2εz,
    +εz per direction, whose rounding drift `drift` bounds per tensor (see the module docstring).
    """

    def __init__(self, tensors, layers, seeds, eps: float, exact: bool, device, resolve=None):
        self.n, self.seeds, self.eps, self.exact, self.device = 2 * len(seeds), seeds, eps, exact, device
        self.resolve = resolve  # resolve(index) -> the tensor as it is while its layer is resident
        self.by_layer = {}
        for index, (t, layer) in enumerate(zip(tensors, layers)):
            self.by_layer.setdefault(layer, []).append((index, t))
        self.layers = set(self.by_layer)
        self.drift = [0.0] * len(tensors)
        self.copy_bytes = max((sum(t.numel() * t.element_size() for _, t in ts) for ts in self.by_layer.values()),
                              default=0)

    def _add(self, j, k, scale, want_max=False):
        zmax = {}
        for index, t in self.by_layer[j]:
            z = direction(self.seeds[k], index, t.shape, t.device if self.device is None else self.device)
            if want_max:
                zmax[index] = float(z.abs().max()) if z.numel() else 0.0
            t.add_(z.to(device=t.device, dtype=t.dtype), alpha=scale)
            del z
        return zmax

    @torch.no_grad()
    def enter(self, j):
        self.offset = 0.0  # arithmetic: how far from θ layer j is, in units of ε·z_k
        if self.resolve is not None:  # bringing a layer to the device may replace its Parameters (offload)
            self.by_layer[j] = [(index, self.resolve(index)) for index, _ in self.by_layer[j]]
        if self.exact:
            self.saved = [t.detach().clone() for _, t in self.by_layer[j]]
        else:
            self.amax = {index: float(t.abs().max()) if t.numel() else 0.0 for index, t in self.by_layer[j]}

    @torch.no_grad()
    def apply(self, j, s):
        k, sign = divmod(s, 2)
        sign = 1.0 - 2.0 * sign
        if self.exact:
            for (index, t), saved in zip(self.by_layer[j], self.saved):
                t.copy_(saved)
            self._add(j, k, sign * self.eps)
            return
        if sign > 0:
            if self.offset:  # back from θ − εz_{k−1}
                self._add(j, k - 1, self.eps)
                self.offset = 0.0
            zmax = self._add(j, k, self.eps, want_max=True)
            self.offset = 1.0
            for index, t in self.by_layer[j]:
                step = 2 * self.eps * zmax[index]
                big = self.amax[index] + self.drift[index] + step
                self.drift[index] += 1.5 * (ulp(big, t.dtype) + ulp(step, t.dtype)) if big > 0 else 0.0
        else:
            self._add(j, k, -2 * self.eps)
            self.offset = -1.0
        self.k = k

    @torch.no_grad()
    def leave(self, j):
        if self.exact:
            for (_, t), saved in zip(self.by_layer[j], self.saved):
                t.copy_(saved)
            del self.saved
        elif self.offset:
            self._add(j, self.k, -self.offset * self.eps)
            self.offset = 0.0


def spsa_layerwise(runner: LayerwiseLoss, named_tensors, layers: Sequence[int], eps: float, directions: int,
                   seed: int, stream: int = 0, start: int = 0, inputs=None, exact: bool = True,
                   progress=None) -> Estimate:
    """Two-sided SPSA as `spsa` of the calibration loss, on the layer-by-layer pass.

    named_tensors: (name, tensor) perturbed in place; layers[i]: the decoder layer whose forward
    reads tensor i (its own weights, or a gate hooked into it). The q directions' 2q losses
    L(θ ± εz_k) come from 2q hidden-state streams carried from layer `start` (inputs: that
    layer's unperturbed inputs, default the pass's layer-0 inputs) to the end, each layer
    resident once with all directions (the loop order that keeps memory at one layer; MeZO's
    `zo_step` loops directions outside and whole-model forwards inside). Memory: one layer
    + (2q + 1) × nsamples × seqlen × hidden × bytes of hidden states (on the pass's hidden
    device) + one layer's perturbed tensors (exact=True). Same seeds and z as `spsa`, so the
    coefficients c_k = (L₊ − L₋)/2ε equal the whole-model ones up to floating-point order
    (tests/test_minillm.py). The tensors are back to their values on return (bit-identical if
    `exact`, else within `Estimate.drift_bound`).
    """
    tensors = [t for _, t in named_tensors]
    device = runner.lp.device
    est = _new_estimate(named_tensors, eps, directions, seed, stream, device)
    model = runner.lp.model

    def resolve(index):  # a model parameter by its name (gates are the caller's own tensors)
        try:
            return model.get_parameter(est.names[index])
        except AttributeError:
            return tensors[index]

    pert = Directions(tensors, list(layers), est.seeds, eps, exact, device, resolve=resolve)
    losses = runner.losses(start, runner.lp.hidden if inputs is None else inputs, pert, progress=progress)
    est.coeffs = [(losses[2 * k] - losses[2 * k + 1]) / (2 * eps) for k in range(directions)]
    est.drift_bound = pert.drift
    est.copy_bytes = pert.copy_bytes if exact else 0
    return est


class Coordinates:
    """Central differences: stream 2c is gate element c + ε, stream 2c+1 element c − ε (one layer)."""

    def __init__(self, coords, eps: float):
        self.coords, self.eps, self.n = coords, eps, 2 * len(coords)
        self.layers = {layer for layer, _, _ in coords}

    @torch.no_grad()
    def enter(self, j):
        self.saved = None

    @torch.no_grad()
    def apply(self, j, s):
        c, sign = divmod(s, 2)
        self.leave(j)
        _, flat, e = self.coords[c]
        self.saved = (flat, e, flat[e].clone())
        flat[e] = self.saved[2] + (self.eps if sign == 0 else -self.eps)

    @torch.no_grad()
    def leave(self, j):
        if self.saved is not None:
            flat, e, value = self.saved
            flat[e] = value  # the saved scalar: exact
            self.saved = None


def coordinate_layerwise(runner: LayerwiseLoss, named_tensors, layers: Sequence[int], eps: float,
                         streams: int = 32, progress=None) -> CoordinateEstimate:
    """`coordinate` on the layer-by-layer pass: a coordinate of a tensor read by layer i changes
    nothing before layer i, so its two losses run from layer i's unperturbed inputs (one clean
    stream advanced through the layers) with at most `streams` streams at a time.
    Memory: one layer + (streams + 1) × nsamples × seqlen × hidden × bytes."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out = [torch.zeros(t.numel(), dtype=torch.float64) for _, t in named_tensors]
    coords = {}
    for i, ((_, t), layer) in enumerate(zip(named_tensors, layers)):
        coords.setdefault(layer, []).extend((layer, i, e) for e in range(t.numel()))
    chunk = max(1, streams // 2)
    forwards = 0
    clean = runner.clean_inputs(coords)
    for layer, inputs in (progress(clean) if progress else clean):
        todo = coords[layer]
        for at in range(0, len(todo), chunk):
            part = todo[at:at + chunk]
            flats = [(layer, named_tensors[i][1].view(-1), e) for _, i, e in part]
            losses = runner.losses(layer, inputs, Coordinates(flats, eps))
            for c, (_, i, e) in enumerate(part):
                out[i][e] = (losses[2 * c] - losses[2 * c + 1]) / (2 * eps)
            forwards += 2 * len(part)
    grads = [g.float().view(t.shape).to(t.device) for (_, t), g in zip(named_tensors, out)]
    return CoordinateEstimate([n for n, _ in named_tensors], grads, float(eps), forwards)


def blockwise_layerwise(runner: LayerwiseLoss, named_tensors, layers: Sequence[int], eps: float, directions: int,
                        seed: int, progress=None) -> list[tuple[list[int], Estimate]]:
    """One SPSA estimate per layer i over the tensors read by layer i alone (stream i + 1 of
    `seed`), its 2q streams started from layer i's unperturbed inputs (one clean stream advanced
    through the layers): d drops to one layer's tensors, at the cost of layers ≥ i per estimate.
    Returns (indices into `named_tensors`, estimate) per layer. This project's addition."""
    by_layer = {}
    for i, layer in enumerate(layers):
        by_layer.setdefault(layer, []).append(i)
    out = []
    clean = runner.clean_inputs(by_layer)
    for layer, inputs in (progress(clean) if progress else clean):
        idx = by_layer[layer]
        est = spsa_layerwise(runner, [named_tensors[i] for i in idx], [layer] * len(idx), eps, directions, seed,
                             stream=layer + 1, start=layer, inputs=inputs)
        out.append((idx, est))
    return out


def progress_bar(label: str):
    """A `progress=` callable for the estimators above (tqdm, every 10 s) when stderr is a terminal or
    MINILLM_PROGRESS is set; else None."""
    import sys

    if not (sys.stderr.isatty() or os.environ.get("MINILLM_PROGRESS")):
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=label, mininterval=10.0, file=sys.stderr)
