"""Grid configs written by tests: a small one-model grid file (`write_grid`), and a one-method grid
loaded through `suite.config.load_config` with that method entry's options (`load_grid`)."""
from __future__ import annotations


def write_grid(tmp_path, models=("tiny-llama",), methods=("wanda-sp",), **extra) -> str:
    """Path of a grid file in `tmp_path`: `models` x `methods` at ratio 0.2, 4 calibration windows of 32
    tokens for every method, WikiText-2 perplexity on 256 tokens, no tasks; `extra` keys replace these."""
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "grid", "models": list(models), "methods": list(methods), "ratios": [0.2],
        "calibration": {"apply_to": "all", "nsamples": 4, "seqlen": 32}, "device": "cpu",
        "evaluation": {"perplexity": ["wikitext2"], "max_tokens": 256, "tasks": [], "throughput": False}, **extra}))
    return str(path)


ONE_METHOD_GRID = ("name: g\nmodels: [tiny-llama]\nratios: [0.2]\n"
                   "methods: [{{name: {method}, options: {{{options}}}}}]\n{extra}")


def load_grid(tmp_path, method="minillm", options="", extra=""):
    """`load_config` of a one-model grid whose only method entry is `method` with `options` (YAML
    flow-mapping text, e.g. "scope: global, round_to: 8"); `extra`: more top-level YAML lines."""
    from suite.config import load_config

    path = tmp_path / "g.yaml"
    path.write_text(ONE_METHOD_GRID.format(method=method, options=options, extra=extra))
    return load_config(path)
