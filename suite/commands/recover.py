"""`python -m suite recover`: LoRA recovery of a pruned model (suite/recovery.py), merged and saved.

    python -m suite recover --model out/flap --out out/flap-tuned                  # LLM-Pruner's recovery
    python -m suite recover --model out/flap --out out/flap-tuned --data tatsu-lab/alpaca \\
        --set val_set_size=8 --set max_steps=30 --ppl wikitext2                     # a short CPU run

    python -m suite recover --model out/flap --out out/flap-lora --adapter-only   # PEFT adapter only

The output is a pruned directory like the input (standard config, plan.json, safetensors), its
`pruning.json` extended by a `recovery` entry (settings, LoRA, steps, tokens seen, losses, time and
peak memory). With ``--adapter-only`` it is PEFT's adapter directory instead (adapter_config.json
naming the --model directory as its base, adapter_model.safetensors, the record as recovery.json),
the base left unchanged: ``PeftModel.from_pretrained(base, OUT)`` loads the pair, and
``suite eval --model OUT`` (or ``--model BASE --adapter OUT``) evaluates it. Written only when the
run succeeded: a diverging run exits 2 and writes nothing.
"""
from __future__ import annotations

from suite.precision import add_dtype_argument

NAME = "recover"
HELP = "LoRA-recover a pruned model (LLM-Pruner's post-training defaults), merge and save it"


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="pruned directory (or any model `suite info` accepts)")
    parser.add_argument("--out", required=True, help="output directory (written atomically, only on success)")
    parser.add_argument("--data", default=None,
                        help="instruction dataset (Alpaca fields; default yahma/alpaca-cleaned) or c4 (plain text)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (default: 2 epochs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any recovery setting (suite/recovery.py DEFAULTS), e.g. lora_r=16 (repeatable)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="save the LoRA adapter (PEFT's form) beside the unchanged --model directory, unmerged")
    parser.add_argument("--seed", type=int, default=0, help="seed of LoRA's initialisation, dropout and data order (default 0)")
    parser.add_argument("--ppl", default=None, help="also report perplexity before/after, e.g. wikitext2")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token cap for --ppl")
    add_dtype_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--force", action="store_true", help="replace an existing --out (an earlier pruned model or a file)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_settings(pairs) -> dict:
    import yaml

    from suite.pruning.errors import UserError

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        parsed = yaml.safe_load(value) if value.strip() else None
        try:  # YAML 1.1 reads `1e-4` as a string
            parsed = float(parsed) if isinstance(parsed, str) and "e" in parsed.lower() else parsed
        except ValueError:
            pass
        settings[key.strip()] = parsed
    return settings


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from suite.pruning.errors import UserError
    from suite.pruning.plan import Plan, full_plan
    from suite.pruning.saving import PLAN_FILE, save_pruned
    from suite import recovery
    from suite.measure import measure
    from suite.models import load_model, load_tokenizer, model_source, resolve
    from suite.commands.prune import check_out
    from suite.records import provenance

    settings = parse_settings(args.set)
    if args.data is not None:
        settings["data"] = args.data
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    if args.adapter_only:
        settings["adapter_only"] = True
    settings = recovery.settings_with_defaults(settings)  # bad settings: fail before loading anything
    out = Path(args.out)
    if not (args.force and (out / "adapter_config.json").is_file()):  # --force replaces an earlier adapter too
        check_out(out, args.force)  # as prune: nothing is replaced silently
    kind, where = resolve(args.model)
    if settings.get("adapter_only") and kind not in ("pruned", "dir"):
        raise UserError(f"--adapter-only saves an adapter for a base directory; {args.model!r} is no directory "
                        "(save it first: suite prune, or save_pretrained)")
    if settings.get("adapter_only") and out.resolve() == Path(where).resolve():
        raise UserError("--adapter-only keeps the base unchanged: --out must not be the --model directory")
    if kind == "pruned" and not (where / PLAN_FILE).is_file():
        raise UserError(f"{where} has no {PLAN_FILE}: the recovered directory could not name its kept heads/channels")
    source = json.loads((where / "pruning.json").read_text()) if kind == "pruned" and (where / "pruning.json").is_file() else {}
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = load_tokenizer(args.model)
    plan = Plan.load(where / PLAN_FILE) if kind == "pruned" else full_plan(model)
    ppl = {}
    if args.ppl:
        from suite.evaluate import perplexity

        ppl["before"] = perplexity(model, tokenizer, args.ppl, max_tokens=args.max_tokens, quiet=args.quiet)
    calibration = dict(source["calibration"], seed=source.get("seed", 0)) if source.get("calibration") else None
    with measure(args.device) as phase:
        outcome = recovery.recover(model, tokenizer, settings, seed=args.seed, calibration=calibration,
                                   device=args.device, quiet=args.quiet)
    info = {**outcome.info, "phase": phase}
    if args.ppl:
        ppl["after"] = perplexity(outcome.model, tokenizer, args.ppl, max_tokens=args.max_tokens, quiet=args.quiet)
        info["perplexity"] = {args.ppl: ppl}
    if (gguf := model_source(args.model)) is not None:  # a .gguf file: which one, by content
        source["model_source"] = gguf
    record = {**source, "recovery": info,
              "recovery_provenance": provenance(config=vars(args) | {"_run": None}, seed=args.seed)}
    if settings.get("adapter_only"):
        recovery.save_adapter(outcome.model, where, out, record=record)
    else:
        save_pruned(outcome.model, tokenizer, plan, out, extra=record)
    print(f"recovered {args.model}: {info['steps']} steps, {info['tokens_seen']:,} tokens, final training loss "
          f"{info['train_loss_final']:.4f}" + (f", validation loss {info['eval_loss']:.4f}" if "eval_loss" in info else ""))
    print(f"recovery: {phase['seconds']:.1f} s, peak {phase['peak_mb']:.0f} MB ({phase['peak_source']})")
    if ppl:
        print(f"{args.ppl} perplexity: {ppl['before']:.2f} -> {ppl['after']:.2f}")
    print(f"saved to {out}" + (f" (adapter of {where})" if settings.get("adapter_only") else ""))
    return 0
