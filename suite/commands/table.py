"""`python -m suite table RESULTS.jsonl --format md|latex|csv [--out FILE] [--relative] [--published] [--costs]`:
the paper-style quality table (or the costs table)."""
from __future__ import annotations

from pathlib import Path

from suite.pruning.errors import UserError

NAME = "table"
HELP = "format a results file (JSON Lines from `suite run`) as a Markdown, LaTeX (booktabs) or CSV table."


def add_arguments(parser) -> None:
    parser.add_argument("results", help="results file written by `python -m suite run`")
    parser.add_argument("--format", choices=("md", "latex", "csv"), default="md", help="output format (default: md)")
    parser.add_argument("--out", help="write the table to this file instead of stdout")
    parser.add_argument("--stderr", choices=("auto", "on", "off"), default="auto",
                        help="show accuracies as acc ± standard error: auto (default) = when the evaluation "
                             "capped the questions per task (a limit), on, off")
    parser.add_argument("--bare", action="store_true",
                        help="LaTeX: the tabular alone, without the table environment, caption and label")
    parser.add_argument("--relative", action="store_true",
                        help="the %% of dense view: every metric as a percentage of its model's dense row")
    parser.add_argument("--published", action="store_true",
                        help="add under each reproduced row whose method, model, ratio (and what it counts) and tuning "
                             "match suite/published.yaml a row with the published values and the difference in "
                             "percent; the caption lists the protocol differences that remain")
    parser.add_argument("--costs", action="store_true",
                        help="the costs instead: every phase's peak memory and time, pruned/dense speed-ups "
                             "with their dense/dense controls")


def run(args) -> int:
    from suite.records import read_records
    from suite.tables import format_table

    if not Path(args.results).exists():
        raise UserError(f"{args.results}: results file not found")
    text = format_table(read_records(args.results), args.format, stderr=args.stderr, bare=args.bare,
                        costs=args.costs, relative=args.relative, published=args.published)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0
