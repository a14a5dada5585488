"""`python -m suite info --model M`: the architecture facts pruning depends on."""
from __future__ import annotations

NAME = "info"
HELP = "print architecture, layers, heads / kv-heads, head dim, intermediate size, parameter count"


def epilog() -> str:
    from suite.models import models_help

    return models_help()


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model name, directory, .gguf file or hub id (listed below)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import json

    from suite.models import describe, load_model

    info = describe(load_model(args.model))
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0
