"""`python -m suite eval`: perplexity and zero-shot accuracy of one model (dense or pruned directory).

    python -m suite eval --model tiny-llama --ppl wikitext2,ptb,c4 --max-tokens 4096
    python -m suite eval --model smollm2-135m --ppl none --tasks paper --limit 100 --json out.json
    python -m suite eval --model out/flap --adapter out/flap-lora     # a pruned base + its LoRA adapter
    python -m suite eval --model out/flap-lora                        # the same: the adapter names its base

Prints a small table; `--json OUT` writes the metrics atomically (temp file, then os.replace).
"""
from __future__ import annotations

from pathlib import Path

from suite.pruning.errors import UserError
from suite.offload import add_offload_arguments
from suite.precision import add_dtype_argument

NAME = "eval"
HELP = "perplexity (wikitext2/ptb/c4) and lm-eval zero-shot accuracy of a model"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip() and v.strip().lower() != "none"]


def epilog() -> str:
    from suite.models import models_help

    return models_help()


def _batch_size(value: str):
    import argparse

    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model name, directory, .gguf file or hub id (listed below)")
    parser.add_argument("--adapter", type=Path, default=None, metavar="DIR",
                        help="a PEFT adapter directory (suite recover --adapter-only) applied, unmerged, to --model; "
                             "an adapter directory given as --model brings its base (adapter_config.json)")
    parser.add_argument("--ppl", type=_csv, default=["wikitext2"],
                        help="comma-separated corpora for perplexity: wikitext2,ptb,c4 or 'none' (default wikitext2)")
    parser.add_argument("--seqlen", type=int, default=128, help="perplexity window length (default 128)")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on evaluated tokens per corpus")
    parser.add_argument("--tasks", type=_csv, default=[],
                        help="comma-separated lm-eval tasks, or 'paper' for the 7 tasks pruning papers report")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    parser.add_argument("--batch-size", type=_batch_size, default=4,
                        help="batch size (default 4); 'auto': lm-eval's largest batch that fits the device "
                             "(perplexity then uses 4)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_dtype_argument(parser)
    add_offload_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the metrics as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _base_and_adapter(args):
    """(base model spec, adapter directory or None): `--adapter`, or `--model` an adapter directory
    (its adapter_config.json names the base). Raises UserError for a directory that is no adapter."""
    from suite.recovery import adapter_base

    if args.adapter is not None:
        adapter_base(args.adapter)  # an adapter directory at all: fail before loading the base
        return args.model, args.adapter
    if (Path(args.model) / "adapter_config.json").is_file():
        return adapter_base(args.model), Path(args.model)
    return args.model, None


def run(args) -> int:
    from suite import data, evaluate
    from suite.models import load_model, load_tokenizer, model_source
    from suite.records import write_json_atomic
    from suite.offload import offload_kwargs

    ppl_batch = 4 if args.batch_size == "auto" else args.batch_size
    if args.seqlen < 2 or ppl_batch < 1:
        raise UserError("--seqlen must be >= 2 and --batch-size >= 1")
    for corpus in args.ppl:
        data.get_corpus(corpus)  # unknown corpus: fail before loading the model
    tasks = list(evaluate.PAPER_TASKS) if args.tasks == ["paper"] else args.tasks
    if not args.ppl and not tasks:
        raise UserError("nothing to evaluate: give --ppl and/or --tasks")
    data.require_source()  # no mirror and no hub: one line now, not after loading the model
    offload = offload_kwargs(args)
    base, adapter = _base_and_adapter(args)
    if adapter is not None and args.offload is not None:
        raise UserError("--adapter does not run on offloaded weights; drop --offload")

    model = load_model(base, dtype=args.dtype, device=args.device, **offload)
    if adapter is not None:
        from suite.recovery import load_with_adapter

        model = load_with_adapter(model, adapter)
    warnings = [w for w in [evaluate.check_window(model, args.seqlen)] if w] if args.ppl else []
    tokenizer = load_tokenizer(base)
    result = {"model": base, **({"adapter": str(adapter)} if adapter is not None else {}), "seqlen": args.seqlen,
              "max_tokens": args.max_tokens, "limit": args.limit, "perplexity": {}, "zero_shot": {}}
    if (source := model_source(base)) is not None:  # a .gguf file: which one, by content
        result["model_source"] = source
    if warnings:
        result["warnings"] = warnings
    rows = []
    for corpus in args.ppl:
        ppl = evaluate.perplexity(model, tokenizer, corpus, seq_len=args.seqlen, max_tokens=args.max_tokens,
                                  batch_size=ppl_batch, quiet=args.quiet)
        result["perplexity"][corpus] = ppl
        rows.append((f"ppl {corpus}", f"{ppl:.3f}", ""))
    if tasks:
        zs = evaluate.zero_shot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                quiet=args.quiet)
        result["zero_shot"] = {k: v for k, v in zs.items() if not k.startswith("_")}
        result["zero_shot_mean"] = zs["_mean"]
        for task, metrics in result["zero_shot"].items():
            if "skipped" in metrics:
                rows.append((task, "skipped", metrics["skipped"]))
            else:
                rows.append((task, _fmt(metrics.get("acc")), f"acc_norm {_fmt(metrics.get('acc_norm'))}"))
        rows.append(("mean acc", _fmt(zs["_mean"]), ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  value")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<8}  {note}".rstrip())
    if args.json is not None:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0
