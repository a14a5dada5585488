"""`python -m suite <command>`: each command is one module in `suite/commands/` (a registry, as in lm-eval).

A command module defines `NAME` (the sub-command, e.g. "zo-diagnose"), `HELP`, `add_arguments(parser)`
and `run(args) -> int`. Adding a command is adding one file. Bad input (`UserError`) prints one line
`error: ...` on stderr and exits 2: never a traceback wall.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from suite.pruning.errors import UserError
import suite.commands

DESCRIPTION = """\
Benchmark suite for structured pruning of LLMs: MINI-LLM (forward-only gradients) against
magnitude, random, Wanda-sp, FLAP, LLM-Pruner, Bonsai (forward-only sub-models), SliceGPT (residual
width) and the depth pruners ShortGPT and SLEB. Prune one model (`prune`), evaluate a model
(`eval`), run a whole grid of models x methods x ratios from a YAML config (`run`), then turn its
results file into a table (`table`) or a figure (`plot`). `COMMAND --help` lists each command's
options, methods and model names.

Data: perplexity, calibration and zero-shot read the dataset mirror named by MINILLM_DATA
(e.g. export MINILLM_DATA=$PWD/../shared/data); without it, the Hugging Face hub, if reachable."""


def _command_modules():
    for info in sorted(pkgutil.iter_modules(suite.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"suite.commands.{info.name}")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the suite's one-line errors: `error: PROG: message (see PROG --help)` on stderr,
    exit 2, instead of the usage block (`--help` still prints it). Sub-command parsers inherit it."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m suite", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        epilog = module.epilog() if hasattr(module, "epilog") else None
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    from suite.measure import steady_allocator

    steady_allocator()  # peak-memory records track live tensors (suite/measure.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # library chatter is not ours to print; errors still surface
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()  # transformers' own bars (weight loading, shard writing)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
