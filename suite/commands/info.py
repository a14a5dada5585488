"""`python -m suite info --model M`: the architecture facts pruning depends on."""
from __future__ import annotations

from suite.precision import add_dtype_argument

NAME = "info"
HELP = "print architecture, layers, heads / kv-heads, head dim, intermediate size, parameter count"


def epilog() -> str:
    from suite.models import models_help

    return models_help()


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="model name, directory, .gguf file or hub id (listed below)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_dtype_argument(parser)


def run(args) -> int:
    import json

    import torch

    from suite.models import describe, load_model, skeleton
    from suite.precision import parse_dtype

    model = skeleton(args.model)  # the config alone (meta device): no weight file is read
    if model is None:  # a .gguf file holds its config among the weights
        model = load_model(args.model, dtype=args.dtype)
    info = describe(model)
    dtype = parse_dtype(args.dtype)
    info["dtype"] = args.dtype
    info["weights_mb"] = round(sum(p.numel() for p in model.parameters() if p.is_floating_point())
                               * torch.finfo(dtype).bits / 8 / 2**20, 1)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0
