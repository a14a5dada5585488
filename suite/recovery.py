"""Recover step of the flow (prune -> recover -> evaluate): LoRA fine-tuning of a pruned model, merged back.

MINI-LLM and LLM-Pruner recover a pruned model with LoRA on instruction data, as LLM-Pruner's
`post_training.py` does (itself alpaca-lora's `finetune.py`); both papers report every method
"w/o tune" and "w/ tune". Here: PEFT (`LoraConfig`, `get_peft_model`, `merge_and_unload`) and the
transformers `Trainer` (AdamW, linear warm-up/decay, gradient accumulation); nothing hand-written
but the data preparation. The merged model has exactly the pruned shapes, so it saves and loads
as any pruned directory.

With ``adapter_only`` (not in LLM-Pruner; `suite recover --adapter-only`, a grid's
``recovery: {adapter_only: true}``) the LoRA weights are NOT merged: `recover` returns the
`PeftModel` (pruned base + adapter) and `save_adapter` writes PEFT's usual adapter directory
(``adapter_config.json`` naming the unchanged pruned base directory, ``adapter_model.safetensors``),
which plain transformers + PEFT load with ``PeftModel.from_pretrained(base, ADAPTER)``;
`load_with_adapter` is the suite's reader of the pair.

Defaults (`DEFAULTS`) are LLM-Pruner's published recovery: its README's command
`python post_training.py --prune_model ... --data_path yahma/alpaca-cleaned --lora_r 8
--num_epochs 2 --learning_rate 1e-4 --batch_size 64` over its script's argument defaults
(micro_batch_size 4, cutoff_len 256, val_set_size 2000, lora_alpha 16, lora_dropout 0.05,
targets q/k/v/o/gate/down/up_proj, prompt template "alpaca", train_on_inputs off, add_eos_token
off) and the Trainer arguments hard-coded there (warmup_steps 100, logging_steps 10, optim
adamw_torch; the validation split `train_test_split(test_size=val_set_size, seed=42)`).

Data (`data`): instruction rows with ``instruction``, ``input``, ``output`` (the default
``yahma/alpaca-cleaned``, or any mirrored dataset of that shape, e.g. ``tatsu-lab/alpaca``),
rendered with the Alpaca template, loss on the response tokens only; or ``c4``: plain text, the
C4 train documents that neither calibration (the cell's own draw, `data.calibration_documents`) nor
C4 perplexity (the held-out tail) use, cut into `cutoff_len`-token windows, loss on every token.

Deliberate differences from post_training.py: the data order is seeded (`seed`; LLM-Pruner
shuffles unseeded), no intermediate checkpoints and no best-checkpoint reload (the final adapter
is merged; the validation loss is measured once, at the end), `max_steps` caps training (the CPU
demo), the dtype is the model's (LLM-Pruner trains in fp16 on CUDA), and a non-finite training
loss stops the run with a `UserError` (the cell fails, nothing is saved).
"""
from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError

DEFAULTS = {
    "data": "yahma/alpaca-cleaned",  # README --data_path
    "lora_r": 8,                     # README --lora_r 8 (script default 8)
    "lora_alpha": 16,                # script default
    "lora_dropout": 0.05,            # script default
    "lora_targets": None,            # None: the architecture's (Adapter.lora_targets), q/k/v/o/gate/up/down on LLaMA
    "learning_rate": 1e-4,           # README (script default 3e-4)
    "epochs": 2,                     # README --num_epochs 2 (script default 5)
    "batch_size": 64,                # README --batch_size 64 (script default 128)
    "micro_batch_size": 4,           # script default; gradient accumulation = batch_size // micro_batch_size
    "cutoff_len": 256,               # script default
    "val_set_size": 2000,            # script default
    "prompt_template": "alpaca",     # script default
    "train_on_inputs": False,        # script default
    "add_eos_token": False,          # script default (the full prompt always ends with EOS, as there)
    "warmup_steps": 100,             # TrainingArguments in the script
    "logging_steps": 10,             # TrainingArguments in the script
    "max_steps": None,               # not in LLM-Pruner: caps the optimiser steps (the CPU demo)
    "max_examples": None,            # not in LLM-Pruner: use only the first N training examples
}

# alpaca-lora templates/alpaca.json (LLM-Pruner's Prompter)
TEMPLATES = {
    "alpaca": {
        "prompt_input": "Below is an instruction that describes a task, paired with an input that provides "
                        "further context. Write a response that appropriately completes the request.\n\n"
                        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    },
}
# settings outside LLM-Pruner's recovery that change nothing when off: a cell lists them only when
# set, so the keys of cells recorded before they existed stay valid
OPTIONAL = {"adapter_only": False}  # keep the LoRA adapter unmerged (saved beside the pruned base)
ADAPTER_RECORD = "recovery.json"  # the adapter directory's record (the run's `recovery` entry)
INSTRUCTION_FIELDS = ("instruction", "input", "output")
VAL_SPLIT_SEED = 42  # post_training.py: train_test_split(..., shuffle=True, seed=42)


def settings_with_defaults(settings: dict | None) -> dict:
    """DEFAULTS overridden by `settings`; unknown keys and bad values are a UserError."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULTS) - set(OPTIONAL))
    if unknown:
        raise UserError(f"unknown recovery setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join([*DEFAULTS, *OPTIONAL])}")
    for key, off in OPTIONAL.items():
        if key in settings and not isinstance(settings[key], bool):
            raise UserError(f"recovery {key} must be true or false, got {settings[key]!r}")
        if settings.get(key, off) == off:
            settings.pop(key, None)  # off: not listed (see OPTIONAL)
    out = {**DEFAULTS, **{k: v for k, v in settings.items()}}
    for key in ("lora_r", "epochs", "batch_size", "micro_batch_size", "cutoff_len", "logging_steps"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise UserError(f"recovery {key} must be a positive integer, got {out[key]!r}")
    if out["batch_size"] % out["micro_batch_size"]:
        raise UserError(f"recovery batch_size {out['batch_size']} is not a multiple of "
                        f"micro_batch_size {out['micro_batch_size']}")
    if out["prompt_template"] not in TEMPLATES:
        raise UserError(f"unknown prompt_template {out['prompt_template']!r}; known: {', '.join(TEMPLATES)}")
    if isinstance(out["lora_targets"], str):
        out["lora_targets"] = [t.strip() for t in out["lora_targets"].split(",") if t.strip()]
    return out


# --------------------------------------------------------------------------- data
def render_prompt(template: str, instruction: str, input: str = "", output: str = "") -> str:
    """The Alpaca prompt (alpaca-lora `Prompter.generate_prompt`): instruction, optional input, then output."""
    t = TEMPLATES[template]
    prompt = t["prompt_input"] if input else t["prompt_no_input"]
    return prompt.format(instruction=instruction, input=input) + output


def tokenize_instruction(tokenizer, row: dict, settings: dict) -> dict:
    """One example as post_training.py's `generate_and_tokenize_prompt`: the full prompt (+EOS when it
    fits), labels -100 over the user prompt unless train_on_inputs."""
    cutoff = settings["cutoff_len"]

    def tokenize(text, add_eos):
        ids = tokenizer(text, truncation=True, max_length=cutoff)["input_ids"]
        if add_eos and ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff:
            ids = ids + [tokenizer.eos_token_id]
        return ids

    full = tokenize(render_prompt(settings["prompt_template"], row["instruction"], row["input"], row["output"]), True)
    labels = list(full)
    if not settings["train_on_inputs"]:
        user = tokenize(render_prompt(settings["prompt_template"], row["instruction"], row["input"]),
                        settings["add_eos_token"])
        n = len(user) - (1 if settings["add_eos_token"] else 0)
        labels = [-100] * n + labels[n:]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels[: len(full)]}


def instruction_rows(data: str) -> list[dict]:
    from suite.data import load_rows

    rows = load_rows(data, None, "train")
    if not rows or not all(f in rows[0] for f in INSTRUCTION_FIELDS):
        raise UserError(f"recovery data {data!r} is not instruction data: rows need the fields "
                        f"{', '.join(INSTRUCTION_FIELDS)} (got {', '.join(sorted(rows[0])) if rows else 'no rows'})")
    return rows


def split_train_val(rows: list, val_set_size: int) -> tuple[list, list]:
    """(train, validation): a seeded shuffle (seed 42, as post_training.py's split), the last rows validate."""
    if val_set_size and val_set_size >= len(rows):
        raise UserError(f"recovery val_set_size {val_set_size} leaves no training data of {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(VAL_SPLIT_SEED).shuffle(order)
    cut = len(rows) - (val_set_size or 0)
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def plain_text_examples(tokenizer, texts: list[str], cutoff: int) -> list[dict]:
    """Documents tokenised and cut into `cutoff`-token windows (each document's tail dropped); loss on all tokens."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - cutoff + 1, cutoff):
            window = ids[i: i + cutoff]
            out.append({"input_ids": window, "attention_mask": [1] * cutoff, "labels": list(window)})
    return out


def recovery_examples(tokenizer, settings: dict, calibration: dict | None = None, seed: int = 0):
    """(train, validation) tokenised examples for `settings["data"]`; `calibration` (c4 only): the
    pruning's calibration settings (corpus, nsamples, seqlen and, optionally, the pruning's `seed`), whose documents
    are excluded."""
    if settings["data"] == "c4":
        from suite.data import c4_recovery_documents

        calib_seed = (calibration or {}).get("seed", seed)  # the pruning's seed drew its windows
        docs = plain_text_examples(tokenizer, c4_recovery_documents(tokenizer, calibration, calib_seed),
                                   settings["cutoff_len"])
        train, val = split_train_val(docs, settings["val_set_size"])
    else:
        train, val = split_train_val(instruction_rows(settings["data"]), settings["val_set_size"])
        train = [tokenize_instruction(tokenizer, r, settings) for r in train]
        val = [tokenize_instruction(tokenizer, r, settings) for r in val]
    if settings["max_examples"]:
        train = train[: settings["max_examples"]]
    if not train:
        raise UserError(f"recovery data {settings['data']!r} gave no training example")
    return train, val


# --------------------------------------------------------------------------- LoRA
def lora_target_names(model, targets=None) -> list[str]:
    """Full names of the decoder Linears LoRA adapts: names ending in a target suffix, of non-zero
    width (a removed attention or MLP block keeps 0-width Linears that never run)."""
    adapter = adapter_for(model)
    targets = tuple(targets or adapter.lora_targets)
    if not targets:
        raise UserError(f"architecture {model.config.model_type!r} declares no LoRA targets (Adapter.lora_targets)")
    layer_ids = {id(layer) for layer in adapter.layers(model)}
    names = []
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            for sub, linear in module.named_modules():
                if (isinstance(linear, torch.nn.Linear) and sub.rsplit(".", 1)[-1] in targets
                        and linear.in_features and linear.out_features):
                    names.append(f"{name}.{sub}")
    if not names:
        raise UserError(f"no Linear named {', '.join(targets)} in the decoder layers")
    return names


def attach_lora(model, settings: dict):
    """`get_peft_model` with LoRA on every target Linear (base weights frozen); returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"],
                        lora_dropout=settings["lora_dropout"], bias="none", task_type="CAUSAL_LM",
                        target_modules=lora_target_names(model, settings["lora_targets"]))
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- training
@dataclass
class RecoveryOutcome:
    # the merged model (the pruned model object itself, its Linears updated); with adapter_only the
    # PeftModel around the unchanged pruned model
    model: object
    info: dict = field(default_factory=dict)


def _divergence_callback():
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise UserError(f"recovery diverged: training loss {loss} at step {state.global_step}")

    return StopOnNonFiniteLoss()


def train_lora(peft_model, tokenizer, train: list, val: list, settings: dict, seed: int = 0,
               device: str = "cpu", quiet: bool = True) -> dict:
    """Train the LoRA weights with transformers' Trainer; returns steps, tokens seen and losses."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    dtype = next(peft_model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="minillm-recover-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=settings["micro_batch_size"],
            per_device_eval_batch_size=settings["micro_batch_size"],
            gradient_accumulation_steps=settings["batch_size"] // settings["micro_batch_size"],
            warmup_steps=settings["warmup_steps"], num_train_epochs=settings["epochs"],
            max_steps=settings["max_steps"] or -1, learning_rate=settings["learning_rate"],
            logging_steps=settings["logging_steps"], logging_first_step=True, optim="adamw_torch",
            save_strategy="no", eval_strategy="no", report_to=[], seed=seed, data_seed=seed,
            use_cpu=not str(device).startswith("cuda"), bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16, disable_tqdm=quiet, dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        )
        saved = tokenizer.pad_token_id, tokenizer.padding_side  # restored: evaluation shares the tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = 0  # post_training.py sets 0 unconditionally
        tokenizer.padding_side = "left"  # as post_training.py
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        trainer = Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=val or None,
                          data_collator=collator, callbacks=[_divergence_callback()])
        if quiet:
            trainer.remove_callback(PrinterCallback)  # prints every log dict to stdout otherwise
        peft_model.config.use_cache = False
        try:
            result = trainer.train()
        finally:
            tokenizer.pad_token_id, tokenizer.padding_side = saved
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not math.isfinite(result.training_loss):
            raise UserError(f"recovery diverged: mean training loss {result.training_loss}")
        info = {"steps": trainer.state.global_step, "examples": len(train),
                "epochs_done": round(float(trainer.state.epoch or 0), 4),
                "tokens_seen": int(trainer.state.num_input_tokens_seen),
                "train_loss_mean": result.training_loss, "train_loss_final": losses[-1] if losses else None,
                "loss_log": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e]}
        if val:
            info["eval_loss"] = trainer.evaluate()["eval_loss"]
            info["val_examples"] = len(val)
            if not math.isfinite(info["eval_loss"]):
                raise UserError(f"recovery diverged: validation loss {info['eval_loss']}")
    peft_model.config.use_cache = True
    return info


def merge_lora(peft_model):
    """W <- W + B·A·(alpha / r) in every adapted Linear (PEFT's merge_and_unload); returns the base model."""
    model = peft_model.merge_and_unload()
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"recovery diverged: non-finite weights in {name} after merging")
    return model.eval()


def recover(model, tokenizer, settings: dict | None = None, seed: int = 0, calibration: dict | None = None,
            device: str = "cpu", quiet: bool = True) -> RecoveryOutcome:
    """LoRA-recover `model` (pruned, in memory) and merge; returns the merged model (with
    ``adapter_only``: the unmerged PeftModel, `model`'s weights unchanged) and the record's
    `recovery` entry (settings, LoRA, steps, tokens seen, losses). Raises UserError on bad settings,
    bad data or a diverging run."""
    settings = settings_with_defaults(settings)
    train, val = recovery_examples(tokenizer, settings, calibration, seed)
    targets = sorted({n.rsplit(".", 1)[-1] for n in lora_target_names(model, settings["lora_targets"])})
    torch.manual_seed(seed)  # LoRA's A init (kaiming) and dropout masks
    peft_model = attach_lora(model, settings)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info = train_lora(peft_model, tokenizer, train, val, settings, seed=seed, device=device, quiet=quiet)
    merged = _checked_adapter(peft_model) if settings.get("adapter_only") else merge_lora(peft_model)
    info = {"settings": settings, "lora": {"r": settings["lora_r"], "alpha": settings["lora_alpha"],
                                           "dropout": settings["lora_dropout"], "targets": targets,
                                           "trainable_params": trainable}, **info}
    return RecoveryOutcome(merged, info)


# --------------------------------------------------------------------------- adapter only
def _checked_adapter(peft_model):
    """The unmerged PeftModel in eval mode; a non-finite LoRA weight is a diverged run (UserError)."""
    for name, p in peft_model.named_parameters():
        if "lora_" in name and not torch.isfinite(p).all():
            raise UserError(f"recovery diverged: non-finite LoRA weights in {name}")
    return peft_model.eval()


def save_adapter(peft_model, base_dir, out_dir, record: dict | None = None):
    """Write PEFT's adapter directory for `peft_model` (`PeftModel.save_pretrained`) to `out_dir`,
    its ``base_model_name_or_path`` the absolute `base_dir` (the pruned directory, left unchanged),
    `record` as ``recovery.json``. Atomic as `save_pruned`: a temporary sibling renamed into place
    (an existing `out_dir` replaced: the caller's decision). Returns the directory."""
    import json

    from suite.pruning.saving import written_atomically

    with written_atomically(out_dir, "adapter_config.json") as tmp:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(Path(base_dir).resolve())
        peft_model.save_pretrained(tmp, safe_serialization=True)
        if record:
            (tmp / ADAPTER_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    return Path(out_dir)


def adapter_base(adapter_dir) -> str:
    """The base model an adapter directory names (``adapter_config.json``'s base_model_name_or_path).

    Raises UserError when `adapter_dir` holds no adapter_config.json or it names no base."""
    import json

    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter directory (no adapter_config.json)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path} names no base model (base_model_name_or_path); pass the base with --model")
    return base


def load_with_adapter(model, adapter_dir):
    """`model` (the loaded base) with the adapter of `adapter_dir` on it, unmerged:
    ``PeftModel.from_pretrained(model, adapter_dir)`` in eval mode. Raises UserError when the
    adapter does not fit the base (another model's adapter: missing modules or other shapes)."""
    from peft import PeftModel

    adapter_base(adapter_dir)  # an adapter directory at all
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (ValueError, RuntimeError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"adapter {adapter_dir} does not fit the base model: {reason[:300]}") from None
