"""`python -m suite zo-diagnose`: forward-only gradient estimates vs the true gradient (minillm/diagnose.py)."""
from __future__ import annotations

from suite.precision import add_dtype_argument

NAME = "zo-diagnose"
HELP = "compare MINI-LLM's forward-only (SPSA) gradient with backprop: cosine and group-score rank agreement"


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model name, directory, .gguf file or hub id")
    parser.add_argument("--space", default="weight,mask", help="comma list of weight, mask, layer")
    parser.add_argument("--directions", default="4,16,64", help="comma list of q (prefixes of one SPSA run)")
    parser.add_argument("--eps", default=None,
                        help="SPSA step: one value for all spaces, or space=value pairs (weight=1e-3,mask=1e-2); "
                             "default: the method's eps (weights) and gate_eps (gates)")
    parser.add_argument("--calib", default="c4", help="calibration corpus")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration windows (default 4)")
    parser.add_argument("--seqlen", type=int, default=128, help="calibration window length in tokens (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample and direction seed")
    parser.add_argument("--head-mode", default="q-head", choices=["q-head", "kv-group"],
                        help="head groups on GQA: single q heads (default) or whole kv groups")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="minillm option for the estimate (blockwise, mask_groups, estimator, activation, aggregate, abs, members, "
                             "batch_size); estimator=coordinate applies to the mask and layer spaces")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the record here (atomically)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    add_dtype_argument(parser)


def _ints(text: str, what: str) -> list[int]:
    from suite.pruning.errors import UserError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} expects a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what} values must be >= 1, got {text!r}")
    return values


def _eps(text: str | None, spaces: list[str]) -> dict:
    from suite.pruning.errors import UserError

    if not text:
        return {}
    try:
        if "=" not in text:
            return {space: float(text) for space in spaces}
        out = {}
        for pair in text.split(","):
            key, _, value = pair.partition("=")
            out[key.strip()] = float(value)
    except ValueError:
        raise UserError(f"--eps expects a number or space=number pairs, got {text!r}") from None
    unknown = set(out) - set(spaces)
    if unknown:
        raise UserError(f"--eps names spaces not requested: {', '.join(sorted(unknown))}")
    if min(out.values()) <= 0:
        raise UserError("--eps values must be > 0")
    return out


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(result: dict) -> None:
    for space, rec in result.items():
        print(f"\n{space}: d = {rec['dims']:,}, eps = {rec['eps']:g}, loss = {rec['loss']:.4f}, "
              f"ZO {rec['seconds']['zo']:.0f} s, backprop {rec['seconds']['backprop']:.1f} s")
        ref = rec.get("reference", {})
        if "true_vs_wanda_sp" in ref:
            r = ref["true_vs_wanda_sp"]
            print(f"  reference: Spearman(true-gradient scores, Wanda-sp) heads {_fmt(r['heads'])} "
                  f"channels {_fmt(r['channels'])}")
        if "no_gradient_vs_true" in ref:
            r = ref["no_gradient_vs_true"]
            print(f"  reference: Spearman(FMS with g≡1, FMS with true g) heads {_fmt(r['heads'])} "
                  f"channels {_fmt(r['channels'])}")
        if space == "layer":
            print(f"  {'q':>5} {'cosine':>8} {'ρ |ĝ| vs |g|':>14} {'ρ layer sens.':>14}")
            for q, row in rec["q"].items():
                print(f"  {q:>5} {_fmt(row['cosine'], '.4f'):>8} {_fmt(row['spearman_abs']):>14} "
                      f"{_fmt(row['spearman_layer_sensitivity']):>14}")
            continue
        print(f"  {'q':>5} {'cosine':>8} {'ρ vs true (h/c)':>17} {'ρ vs Wanda-sp (h/c)':>21}")
        for q, row in rec["q"].items():
            t, w = row["spearman_vs_true"], row["spearman_vs_wanda_sp"]
            print(f"  {q:>5} {_fmt(row['cosine'], '.4f'):>8} {_fmt(t['heads']):>8}/{_fmt(t['channels']):<8} "
                  f"{_fmt(w['heads']):>10}/{_fmt(w['channels']):<10}")


def run(args) -> int:
    import time

    from suite.pruning.architectures import all_group_sets
    from minillm.diagnose import SPACES, diagnose
    from suite.pruning.errors import UserError
    from suite.commands.prune import parse_options
    from suite.data import calibration_windows
    from suite.models import load_model, load_tokenizer
    from suite.records import provenance, write_json_atomic

    spaces = [s.strip() for s in args.space.split(",") if s.strip()]
    bad = [s for s in spaces if s not in SPACES]
    if bad or not spaces:
        raise UserError(f"--space: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(SPACES)}")
    qs = _ints(args.directions, "directions")
    eps = _eps(args.eps, spaces)
    options = parse_options(args.opt)
    allowed = {"blockwise", "mask_groups", "estimator", "activation", "aggregate", "abs", "members", "batch_size"}
    if set(options) - allowed:
        raise UserError(f"--opt: only {', '.join(sorted(allowed))} apply to the diagnosis")
    from minillm import method
    from suite.pruning.scoring import checked_options

    options = {k: v for k, v in checked_options(method, {**options, "space": "mask"}).items() if k in allowed}
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.model)
    windows = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=args.seed)
    group_sets = all_group_sets(model, args.head_mode)
    t0 = time.perf_counter()
    result = diagnose(model, windows, group_sets, spaces, qs, eps=eps, options=options, seed=args.seed)
    record = {
        "kind": "zo-diagnose", "model": args.model,
        "calibration": {"corpus": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen},
        "seed": args.seed, "head_mode": args.head_mode, "directions": qs, "options": options,
        "spaces": result, "seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(config={k: v for k, v in vars(args).items() if not k.startswith("_")},
                                 seed=args.seed),
    }
    print_table(result)
    if args.json:
        write_json_atomic(args.json, record, indent=1, sort_keys=False)
        print(f"\nwrote {args.json}")
    return 0
