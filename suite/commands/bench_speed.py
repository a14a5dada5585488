"""`python -m suite bench-speed --model DENSE --pruned DIR[,DIR...] [--runs 5]`: pruned-vs-dense speed.

Each run times dense, pruned, dense again (suite/speed.py: torch.utils.benchmark, median and IQR,
prefill and per-token decode separately) for every pruned model, and prints per run the speed-ups
and the dense/dense control; `--json OUT` writes every timing. The control says how far two
timings of the same model drift apart on this machine at this moment: run it on idle cores.
"""
from __future__ import annotations

from suite.precision import add_dtype_argument

NAME = "bench-speed"
HELP = "pruned vs dense prefill and decode speed, with a dense/dense control (torch.utils.benchmark)"


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the dense model (name, directory, .gguf or hub id)")
    parser.add_argument("--pruned", required=True, help="comma list of pruned directories (`suite prune --out`)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions of the dense/pruned/dense sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per prefill / decode step (default 4)")
    parser.add_argument("--seqlen", type=int, default=128, help="prefill length in tokens (default 128)")
    parser.add_argument("--max-run-time", type=float, default=5.0, help="seconds per timing at most")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    add_dtype_argument(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="write every timing here (atomically)")


def run(args) -> int:
    from minillm.errors import UserError
    from suite.data import eval_windows
    from suite.models import load_model, load_tokenizer
    from suite.records import provenance, write_json_atomic
    from suite.speed import compare

    if args.runs < 1 or args.batch_size < 1 or args.seqlen < 2:
        raise UserError("--runs and --batch-size must be >= 1, --seqlen >= 2")
    pruned_dirs = [p.strip() for p in args.pruned.split(",") if p.strip()]
    dense = load_model(args.model, dtype=args.dtype, device=args.device)
    pruned = {p: load_model(p, dtype=args.dtype, device=args.device) for p in pruned_dirs}
    windows = eval_windows(load_tokenizer(args.model), "wikitext2", args.seqlen,
                           max_tokens=args.batch_size * args.seqlen)
    kw = dict(batch_size=args.batch_size, max_run_time=args.max_run_time)
    results = {p: [] for p in pruned_dirs}
    print(f"{'pruned':<32} {'run':>3} {'prefill x':>9} {'control':>8} {'decode x':>9} {'control':>8}")
    for run_index in range(args.runs):
        for path, model in pruned.items():
            r = compare(dense, model, windows, **kw)
            results[path].append(r)
            print(f"{path[-32:]:<32} {run_index:>3} {r['prefill_speedup']:>9.3f} {r['prefill_dense_control']:>8.3f} "
                  f"{r['decode_speedup']:>9.3f} {r['decode_dense_control']:>8.3f}")
    if args.json:
        from pathlib import Path

        write_json_atomic(Path(args.json), {"kind": "bench-speed", "model": args.model, "runs": results,
                                            "provenance": provenance(config={k: v for k, v in vars(args).items()
                                                                             if not k.startswith("_")}, seed=0)})
        print(f"wrote {args.json}")
    return 0
