"""`python -m suite run CONFIG [--out FILE] [--force] [--merge] [--quiet] [--repair] [--jobs N]`: run an experiment grid."""
from __future__ import annotations

NAME = "run"
HELP = ("run an experiment grid from a YAML config (configs/*.yaml): each cell in a fresh process, "
        "results appended to results/<name>.jsonl; finished cells are skipped on a rerun.")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="experiment config, e.g. configs/smoke.yaml")
    parser.add_argument("--out", help="results file (default: results/<config name>.jsonl)")
    parser.add_argument("--force", action="store_true", help="rerun every cell, even those already in the results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--merge", action="store_true",
                        help="append to a results file that holds another grid's records (refused otherwise)")
    parser.add_argument("--repair", action="store_true",
                        help="move a damaged last line of the results file to <file>.corrupt, then run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once, each with cpu_count/JOBS torch threads (default 1: timings "
                             "undisturbed by a neighbour)")


def run(args) -> int:
    from minillm.errors import UserError
    from suite.runner import run_grid

    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    return run_grid(args.config, out=args.out, force=args.force, quiet=args.quiet, repair=args.repair,
                    jobs=args.jobs, merge=args.merge)
