"""`python -m suite plot RESULTS.jsonl --out FIG.png`: perplexity vs ratio and scoring memory per method."""
from __future__ import annotations

from pathlib import Path

from minillm.errors import UserError

NAME = "plot"
HELP = "plot a results file: WikiText-2 perplexity vs pruning ratio, and scoring peak memory per method."


def add_arguments(parser) -> None:
    parser.add_argument("results", help="results file written by `python -m suite run`")
    parser.add_argument("--out", required=True, help="image to write (.png, .pdf or .svg)")


def run(args) -> int:
    from suite.plots import save_figure
    from suite.records import read_records

    if not Path(args.results).exists():
        raise UserError(f"{args.results}: results file not found")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_figure(read_records(args.results), args.out)
    print(f"wrote {args.out}")
    return 0
