"""`python -m suite plot RESULTS.jsonl --out FIG.png`: perplexity (WikiText-2, PTB) and accuracy vs ratio,
scoring memory per method and ratio (suite/plots.py)."""
from __future__ import annotations

from pathlib import Path

from suite.pruning.errors import UserError

NAME = "plot"
HELP = ("plot a results file: WikiText-2 and PTB perplexity and zero-shot accuracy vs pruning ratio, and "
        "the memory scoring adds per method and ratio; the title names the model(s) and evaluation caps.")


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
