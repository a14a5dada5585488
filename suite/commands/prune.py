"""`python -m suite prune`: load -> calibrate -> score -> select -> slice -> save one pruned model.

Everything that can be checked without the model is checked first (ratio, method and its options,
--out, the dataset source), so a typo costs no model load. `--out` never replaces anything silently:
an existing path is refused unless `--force`, and even then only an earlier pruned model (it holds
plan.json), an empty directory or a regular file is replaced, never another directory.
"""
from __future__ import annotations

from suite.offload import add_offload_arguments
from suite.precision import add_dtype_argument

NAME = "prune"
HELP = "prune a model with one method to a parameter ratio and save it as a directory"


def epilog() -> str:
    from suite.methods import methods_help
    from suite.models import models_help

    return (f"methods (--method):\n{methods_help()}\n\n{models_help()}\n\n"
            "method options (--opt KEY=VALUE): an unknown KEY lists the method's options; defaults and\n"
            "their sources are in each method's module docstring (baselines/*.py, minillm/method.py).\n"
            "Calibration and perplexity read the dataset mirror named by MINILLM_DATA.")


def add_arguments(parser):
    from suite.methods import METHODS

    parser.add_argument("--model", required=True, help="model name, directory, .gguf file or hub id (below)")
    parser.add_argument("--method", required=True, metavar="METHOD",
                        help="pruning method: " + ", ".join(METHODS) + " (described below)")
    parser.add_argument("--ratio", type=float, required=True, help="pruning ratio in (0, 1): the fraction of the parameters --ratio-of counts to remove")
    parser.add_argument("--ratio-of", choices=("all", "layers"), default="all",
                        help="what --ratio is a fraction of: all = ALL parameters, embeddings and output head "
                             "included (default; LLM-Pruner, FLAP); layers = the decoder layers' parameters "
                             "(Bonsai and later papers); the record holds both achieved fractions")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of calibration sampling and of random/SPSA draws (default 0)")
    parser.add_argument("--out", required=True, help="output directory (written atomically; must not exist "
                        "unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out (an earlier pruned model, an empty directory or a file)")
    parser.add_argument("--calib", default=None, help="calibration corpus (default: the method's, c4)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the method's)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: the method's)")
    parser.add_argument("--head-mode", default="q-head", choices=["q-head", "kv-group"],
                        help="head groups on GQA: single q heads (equal count per kv group) or whole kv groups")
    parser.add_argument("--scope", default=None, choices=["layer", "global"],
                        help="selection scope: rank each layer's groups on their own, every layer pruned by the same "
                        "ratio or the method's allocation (layer), or all groups of the layer range in one "
                        "ranking (global) (default: the method's)")
    parser.add_argument("--layers", default=None,
                        help="layer range, the decoder layers that may be pruned: all | start:end (indices) | "
                        "0.125:0.9375 (fractions of depth) (default: the method's)")
    parser.add_argument("--allow-empty", action="store_true", help="allow a layer to lose every head or every channel (a whole attention/MLP block)")
    parser.add_argument("--round-to", type=int, default=None,
                        help="each pruned layer keeps a multiple of this many MLP channels (LLM-Pruner's round_to; off)")
    parser.add_argument("--depth-rule", default=None, choices=["nearest", "not_above"],
                        help="methods that remove whole layers (shortgpt, sleb): the number of layers nearest the ratio, "
                        "or the most not above it (default nearest)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method option (repeatable)")
    parser.add_argument("--ppl", default=None, help="also report perplexity before/after, e.g. wikitext2")
    parser.add_argument("--max-tokens", type=int, default=16384, help="token cap for --ppl")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    add_dtype_argument(parser)
    add_offload_arguments(parser, hidden=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_options(pairs) -> dict:
    from suite.pruning.errors import UserError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--opt expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def check_out(out, force: bool) -> None:
    """Refuse to replace anything unless `force`; never replace a directory that is not a pruned model."""
    from suite.pruning.errors import UserError

    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.json").is_file():
        raise UserError(f"{out} exists and is not a pruned-model directory; choose another --out "
                        "(--force replaces only an earlier pruned model, an empty directory or a file)")
    if not force:
        what = "a pruned model" if (out / "plan.json").is_file() else "a directory" if out.is_dir() else "a file"
        raise UserError(f"{out} exists ({what}); choose another --out or pass --force to replace it")


def run(args) -> int:
    from pathlib import Path

    from suite.pruning.errors import UserError
    from suite.pruning.plan import carried_plan
    from suite.pruning.saving import save_pruned
    from suite.pruning.scoring import check_selection, checked_options
    from suite.data import require_source
    from suite.methods import get_method
    from suite.models import load_model, load_tokenizer, model_source
    from suite.offload import offload_kwargs, refuse_method
    from suite.config import default_label
    from suite.pipeline import hidden_on_setting, outcome_record, prune
    from suite.records import provenance

    if not 0.0 < args.ratio < 1.0:
        raise UserError(f"ratio must be in (0, 1), got {args.ratio}")
    method = get_method(args.method)  # fail fast on an unknown method, before loading anything
    options = parse_options(args.opt)
    merged = checked_options(method, options, args.scope)  # unknown keys, types, values, scope: before loading anything
    check_selection(method, args.method, args.scope, args.layers, args.head_mode, args.allow_empty, args.round_to,
                    args.depth_rule)  # flags the method's kind never reads: before loading anything
    hidden_on = hidden_on_setting(options, args.hidden_on)  # --hidden-on and --opt hidden_on: one setting
    check_out(Path(args.out), args.force)
    offload = offload_kwargs(args)  # bad sizes or combinations: one line before loading
    if args.offload is not None:
        refuse_method(args.method, merged)
    if args.hidden_on is not None and method.CALIBRATION is None:
        raise UserError(f"--hidden-on: {args.method} calibrates on nothing, so no layer-by-layer pass keeps "
                        "hidden states to place; leave --hidden-on out")
    if method.CALIBRATION is not None or args.ppl:
        require_source()
    out = Path(args.out)
    model = load_model(args.model, dtype=args.dtype, device=args.device, **offload)
    if getattr(model.config, "pruned_layers", None) is not None and carried_plan(model) is None:
        raise UserError(f"{args.model} is a pruned model without plan.json: its heads' and channels' original "
                        "numbering is unknown, so a second pruning could not be saved correctly")
    tokenizer = load_tokenizer(args.model)
    ppl = {}
    if args.ppl:
        from suite.evaluate import perplexity

        ppl["before"] = perplexity(model, tokenizer, args.ppl, max_tokens=args.max_tokens, quiet=args.quiet)
    calib = {"corpus": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen}
    calib["origin"] = {k: "command line" for k, v in calib.items() if v is not None}  # the record's calibration_origin
    outcome = prune(model, tokenizer, args.method, args.ratio, seed=args.seed, options=options, calib=calib,
                    head_mode=args.head_mode, scope=args.scope, layers=args.layers,
                    allow_empty=args.allow_empty, device=args.device, round_to=args.round_to,
                    hidden_on=args.hidden_on, ratio_of=args.ratio_of, depth_rule=args.depth_rule)
    if args.ppl:
        ppl["after"] = perplexity(model, tokenizer, args.ppl, max_tokens=args.max_tokens, quiet=args.quiet)
    record = {"model": args.model, "method": args.method, "label": default_label(args.method, outcome.options),
              "seed": args.seed, **outcome_record(outcome, args.ratio)}
    if (source := model_source(args.model)) is not None:  # a .gguf file: which one, by content
        record["model_source"] = source
    if ppl:
        record["perplexity"] = {args.ppl: ppl}
    # where the weights and hidden states lived (the grid's RUNTIME_KEYS, plus the folder; None: a
    # temporary one): they change no result, but say how the scoring's time and memory were spent
    record.update(offload=args.offload, device_memory=args.device_memory, offload_folder=args.offload_folder,
                  hidden_on=hidden_on or "device")
    record["provenance"] = provenance(config=vars(args) | {"_run": None}, seed=args.seed)
    save_pruned(model, tokenizer, carried_plan(model), out, extra=record)  # original numbering
    sel = outcome.selection
    net = outcome.params_dense - outcome.params_pruned  # what the record and a reload count
    print(f"{args.method} on {args.model}: removed {net:,} of {outcome.params_dense:,} parameters "
          f"({record['ratio_achieved']:.4f} of all, {record['ratio_achieved_layers']:.4f} of the decoder layers; "
          f"target {args.ratio} of {args.ratio_of}, {sel.target_removed:,})")
    if outcome.depth_rule:
        print(f"  whole layers removed (numbered as in the input model): {sel.plan.removed_layers} (rule {outcome.depth_rule}: the layer count "
              f"{'nearest' if outcome.depth_rule == 'nearest' else 'not above'} the target)")
    if net != sel.removed:
        print(f"  (slicing removed {sel.removed:,}; the method then added {sel.removed - net:,}, e.g. biases)")
    score = outcome.phases["score"]
    print(f"scoring: {score['seconds']:.1f} s, peak {score['peak_mb']:.0f} MB ({score['peak_source']})")
    if ppl:
        print(f"{args.ppl} perplexity: {ppl['before']:.2f} -> {ppl['after']:.2f}")
    print(f"saved to {out}")
    return 0
