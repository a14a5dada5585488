"""`python -m suite check FRESH.jsonl --reference REF.jsonl [--strict]` and
`python -m suite check --record CONFIG [--reference REF.jsonl]`: the regression gate (suite/regression.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from suite.pruning.errors import UserError

NAME = "check"
HELP = ("regression gate: compare fresh records with reference records cell by cell (kept heads and channels "
        "exactly, metrics within tolerance; improvements reported), or record references from a grid config.")


def epilog() -> str:
    return ("exit status: 0 pass (improvements and cells without reference are listed), 1 a regression, a "
            "changed plan, a failed or missing cell (with --strict also an improvement or a cell without "
            "reference), 2 bad input.\n\nexample (CI):\n"
            "  python -m suite check --record configs/my-method.yaml      # once; commit the reference\n"
            "  python -m suite run configs/my-method.yaml --out fresh.jsonl --force\n"
            "  python -m suite check fresh.jsonl --reference results/reference/my-method.jsonl")


def add_arguments(parser) -> None:
    parser.add_argument("fresh", nargs="?", help="fresh results file (JSON Lines from `suite run`)")
    parser.add_argument("--reference", help="reference results file (default with --record: "
                                            "results/reference/<config name>.jsonl)")
    parser.add_argument("--record", metavar="CONFIG",
                        help="run this grid config (every cell, afresh) and write its records as the reference")
    parser.add_argument("--strict", action="store_true",
                        help="also fail (exit 1) on an improvement (the reference needs updating) or a cell "
                             "without reference")


def _read(path: str, what: str) -> list[dict]:
    from suite.records import read_records

    if not Path(path).is_file():
        raise UserError(f"{path}: {what} file not found")
    return read_records(path)


def record(config: str, out: str | None) -> int:
    from suite.config import load_config
    from suite.records import PROJECT_DIR
    from suite.runner import run_grid

    name = load_config(config)["name"]
    out = Path(out) if out else PROJECT_DIR / "results" / "reference" / f"{name}.jsonl"
    partial = out.with_name(f".{out.stem}.recording.jsonl")  # the old reference stays until the new one is whole
    if partial.exists():
        partial.unlink()
    code = run_grid(config, out=str(partial), force=True, quiet=True)
    os.replace(partial, out)  # a reference is one run of the config, not an accumulation of reruns
    logs = partial.with_suffix(".logs")  # the cells' stderr (suite/runner.py log_path): kept when one failed
    if code == 0 and logs.is_dir():
        shutil.rmtree(logs)
    print(f"recorded the reference of {config} in {out}" + ("" if code == 0 else f" (some cells failed: {logs})"))
    return code


def run(args) -> int:
    from suite.regression import check

    if args.record:
        if args.fresh:
            raise UserError("--record runs a config and writes the reference: give no FRESH file with it")
        return record(args.record, args.reference)
    if not args.fresh or not args.reference:
        raise UserError("give FRESH.jsonl and --reference REF.jsonl (or --record CONFIG)")
    report = check(_read(args.fresh, "fresh results"), _read(args.reference, "reference"))
    print("\n".join(report.lines(args.strict)))
    return report.exit_code(args.strict)
