"""Models larger than the device: `--offload cpu|disk`, built on accelerate's big-model loading.

`suite.models.load_model(..., offload=, device_memory=, offload_folder=)` places whole decoder
layers with accelerate's `infer_auto_device_map` under a cap on the compute device's memory
(`max_memory`); what does not fit is offloaded: its modules hold meta tensors and an
`AlignDevicesHook` loads their weights for each forward (host memory for "cpu", memory-mapped
files in the offload folder for "disk"). A model in a local directory or the hub cache is loaded
straight into that layout (`from_pretrained(device_map="auto", ...)`: no full copy in memory); a
model built in code (tiny-*, the embedded GGUF, a pruned directory) is built first, then
dispatched (`accelerate.dispatch_model`).

Everything downstream works on such a model: the layer pass and `plan.apply_plan` materialise one
layer at a time and write changed weights back to the offload storage
(`suite.pruning.layerwise.materialised`), forwards (perplexity, lm-eval's HFLM) run through the hooks,
`save_pretrained` reads the offloaded weights back. On a CPU-only machine the "device" is host
memory: `--offload disk --device-memory SIZE` caps the weights held in memory (the test set-up).
"""
from __future__ import annotations

from pathlib import Path

import torch

from suite.pruning.errors import UserError

OFFLOAD_KINDS = ("cpu", "disk")

def offload_refusal(method_name: str, options: dict | None = None) -> str | None:
    """Why `method_name` with `options` cannot score offloaded weights yet, or None.

    Every method's default runs on offloaded weights (one layer resident: `layerwise.LayerPass`,
    `resident_sets`, LLM-Pruner's `layerwise.layer_gradients`, MINI-LLM's layer-by-layer SPSA).
    What still needs the whole model at once is refused: MINI-LLM's `perturb=all` (embeddings and
    head perturbed with every layer, `zo.Snapshot`) and `gradient=backprop` / `fms_gradient=backprop`
    (one whole-model backward) and its gate spaces `space=mask|layer` (gates hooked on every layer's
    projections at once; their weights are not materialised), LLM-Pruner's `importance=element2` (a Fisher buffer per weight of
    every layer across its per-window passes), and `slicegpt` (it replaces the embeddings, the head and
the norms of the whole model, not one resident layer)."""
    o = options or {}
    if method_name == "minillm":
        if o.get("perturb") == "all":
            return "minillm perturb=all perturbs the embeddings and head together with every layer"
        if "backprop" in (o.get("gradient"), o.get("fms_gradient")):
            return "minillm gradient=backprop backpropagates through the whole model at once"
        if o.get("space") in ("mask", "layer"):
            return f"minillm space={o['space']} gates the projections of every layer at once"
    if method_name == "slicegpt":
        return "slicegpt replaces the embeddings, the head and every residual norm, beyond the layer pass's one layer"
    if method_name == "llm-pruner" and o.get("importance") == "element2":
        return "llm-pruner importance=element2 keeps a Fisher buffer per weight of every layer"
    return None


def refuse_method(method_name: str, options: dict | None = None) -> None:
    """UserError for a method / option combination that cannot score offloaded weights yet."""
    why = offload_refusal(method_name, options)
    if why:
        raise UserError(f"{why}: it does not run with --offload yet; load the model without --offload")


def parse_size(value) -> int | None:
    """'2GB' | '512MiB' | '1.5GB' | 2000000 -> bytes (decimal units as accelerate's
    `convert_file_size_to_int`: KB = 10^3, KiB = 2^10); None -> None. UserError otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise UserError(f"device memory must be positive, got {value}")
        return value
    from accelerate.utils import convert_file_size_to_int

    text = str(value).strip().upper()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise UserError(f"device memory {value!r}: expected a size such as 24GB, 512MiB or a byte count")
    return size


def check_offload(offload, device, device_memory, offload_folder) -> None:
    """One-line UserError for an offload setting that cannot work (before any weight is read)."""
    if offload is None:
        if device_memory is not None or offload_folder is not None:
            raise UserError("--device-memory and --offload-folder need --offload cpu|disk")
        return
    if offload not in OFFLOAD_KINDS:
        raise UserError(f"offload {offload!r}: choose cpu or disk")
    parse_size(device_memory)
    if offload_folder is not None:
        _check_folder(offload_folder)
    if offload == "cpu" and torch.device(device).type == "cpu":
        raise UserError("--offload cpu keeps weights in host memory, which is the device on a CPU: "
                        "use --offload disk (with --device-memory as the cap)")


def _check_folder(offload_folder) -> None:
    folder = Path(offload_folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"offload folder {folder} is not an empty directory: accelerate would reuse "
                        "the weights left there; give a new or empty one")


def max_memory(device, offload, device_memory) -> dict:
    """accelerate's `max_memory`: the compute device's cap, and host memory for offload "cpu"
    (none for "disk" on a CUDA device: what does not fit goes to the folder)."""
    dev = torch.device(device)
    key = "cpu" if dev.type == "cpu" else (dev.index or 0)
    cap = parse_size(device_memory)
    if cap is None:
        from accelerate.utils import get_max_memory

        cap = get_max_memory()[key]
    out = {key: cap}
    if dev.type != "cpu":
        from accelerate.utils import get_max_memory

        out["cpu"] = get_max_memory()["cpu"] if offload == "cpu" else 0
    return out


_TEMPORARY: list[str] = []  # this process's temporary offload folders


def _remove_temporary() -> None:
    import shutil

    while _TEMPORARY:
        shutil.rmtree(_TEMPORARY.pop(), ignore_errors=True)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a `kill`, a batch system's stop) as Ctrl-C and a normal exit: the temporary offload
    folders removed, then SIGTERM's default action, so the process still ends killed by SIGTERM."""
    import os
    import signal

    _remove_temporary()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def offload_dir(offload_folder) -> str:
    """The offload folder: the given one (created; it must be empty: accelerate would reuse the
    weights an earlier run left there), or a temporary one removed at exit, on Ctrl-C and on SIGTERM
    (a handler is installed where SIGTERM has the default one, in the main thread)."""
    import atexit
    import signal
    import tempfile
    import threading

    if offload_folder is not None:
        _check_folder(offload_folder)
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        return str(offload_folder)
    path = tempfile.mkdtemp(prefix="minillm-offload-")
    if not _TEMPORARY:
        atexit.register(_remove_temporary)
    _TEMPORARY.append(path)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    return path


def _no_split(model) -> list[str]:
    from suite.pruning.architectures import adapter_for

    return sorted({type(layer).__name__ for layer in adapter_for(model).layers(model)})


def load_offloaded(where: str, dtype, device, offload, device_memory, offload_folder, config=None):
    """`from_pretrained(device_map="auto", max_memory=..., offload_folder=...)`: transformers builds
    the model on the meta device and places whole decoder layers (its `_no_split_modules`) with
    accelerate's `infer_auto_device_map`; offloaded weights are read from the model's own
    safetensors files when used, never copied whole into memory. `config`: the model's config as
    loaded and edited by the caller (`suite.models`: a GGUF quantization_config removed), or None."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, device_map="auto", max_memory=max_memory(device, offload, device_memory),
            offload_folder=offload_dir(offload_folder), **({"config": config} if config is not None else {}))
    except OSError as exc:
        raise UserError(f"cannot load model {where!r}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def dispatch_offloaded(model, device, offload, device_memory, offload_folder):
    """A model built in memory, dispatched as `load_offloaded` would load it (accelerate's
    `infer_auto_device_map` over whole decoder layers, then `dispatch_model`: offloaded weights go
    to the folder (disk) or stay in host memory (cpu), their modules hold meta tensors)."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory=max_memory(device, offload, device_memory),
                                       no_split_module_classes=_no_split(model))
    if set(device_map) == {""}:  # all on one side: dispatch_model needs named modules to offload
        device_map = {name: device_map[""] for name, _ in model.named_children()}
    dev = torch.device(device)
    main = "cpu" if dev.type == "cpu" else (dev.index or 0)
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir(offload_folder))


def add_offload_arguments(parser, hidden: bool = False) -> None:
    """The shared `--offload`, `--device-memory`, `--offload-folder` (and, for commands that prune,
    `--hidden-on`) options."""
    parser.add_argument("--offload", default=None, choices=OFFLOAD_KINDS,
                        help="keep only what fits --device-memory on the device; the rest of the weights in "
                             "host memory (cpu: a CUDA device only) or in --offload-folder (disk)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="with --offload: cap on the weights kept on the device (accelerate's max_memory), e.g. "
                             "24GB, 512MiB (default: free memory); a grid's device_memory: is the same cap, "
                             "`run --dry-run --device-memory` is the device's size instead")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --offload: where offloaded weights go (default: a temporary directory removed at exit)")
    if hidden:
        parser.add_argument("--hidden-on", default=None, choices=HIDDEN_ON,
                            help="where the layer-by-layer passes keep the calibration hidden states between "
                                 "layers (default device; cpu: host memory, one micro-batch moved at a time); "
                                 "refused for a method that calibrates on nothing (random, magnitude)")


HIDDEN_ON = ("device", "cpu")


def offload_kwargs(args) -> dict:
    """`load_model` keyword arguments from parsed CLI arguments (checked: one-line UserError)."""
    out = {"offload": args.offload, "device_memory": args.device_memory, "offload_folder": args.offload_folder}
    check_offload(args.offload, args.device, args.device_memory, args.offload_folder)
    return out
