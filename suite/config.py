"""Experiment config: a YAML file checked against SCHEMA, defaults filled, expanded into grid cells.

SCHEMA is plain data: a key maps either to a nested schema (a dict, for a mapping with defaults)
or to `(check, default)`, where `check(value, where)` returns the value or raises UserError and
`REQUIRED` as the default means the key must be given. Every error names the file and the path of
the key, e.g. `config.yaml: methods[2].options.eps: expected number, got 'abc'`.
"""
from __future__ import annotations

import copy
import difflib
import importlib
import json
import re
from pathlib import Path

import yaml

from minillm.errors import UserError

REQUIRED = object()
PAPER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
DTYPES = ("float32", "bfloat16", "float16")
_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "mapping"}


class _Invalid(Exception):
    """A check failed at `where` (the key path); load_config prefixes the file name."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------- checks
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # `1e-3`: YAML 1.1 reads it as a string


def _expect(kind, value, where):
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        value = float(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise _Invalid(where, f"expected {_TYPE_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else value


def string(value, where):
    return _expect(str, value, where)


def boolean(value, where):
    return _expect(bool, value, where)


def positive_int(value, where):
    if _expect(int, value, where) <= 0:
        raise _Invalid(where, f"expected a positive integer, got {value!r}")
    return value


def positive_int_or_auto(value, where):
    """A positive integer, or "auto" (lm-eval finds the largest batch that fits the device)."""
    return value if value == "auto" else positive_int(value, where)


def optional(check):
    return lambda value, where: None if value is None else check(value, where)


def integer(value, where):
    return _expect(int, value, where)


def ratio(value, where):
    value = _expect(float, value, where)
    if not 0.0 < value < 1.0:
        raise _Invalid(where, f"expected a pruning ratio in (0, 1), got {value!r}")
    return value


def one_of(*choices):
    def check(value, where):
        if value not in choices:
            raise _Invalid(where, f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def list_of(check, nonempty=True):
    def check_list(value, where):
        _expect(list, value, where)
        if nonempty and not value:
            raise _Invalid(where, "expected a non-empty list")
        return [check(item, f"{where}[{i}]") for i, item in enumerate(value)]
    return check_list


def file_name(value, where):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", _expect(str, value, where)):
        raise _Invalid(where, f"expected a name made of letters, digits, '.', '_', '-', got {value!r}")
    return value


def method(value, where):
    """A method name, or {name, label (default: name), options (default: {})}."""
    if isinstance(value, str):
        value = {"name": value}
    _expect(dict, value, where)
    entry = _fill(METHOD_SCHEMA, value, where)
    _check_method(entry, where)
    entry["label"] = entry["label"] or default_label(entry["name"], entry["options"])
    return entry


def default_label(name: str, options: dict) -> str:
    """The table's row name of a method entry without a `label`: its name, and "NAME (one-shot)"
    for a method that prunes layer by layer by default run with `sequential=false`
    (`wanda-sp --opt sequential=false`, the earlier one-shot variant)."""
    registry = _method_registry() or {}
    module = registry.get(name)
    try:
        module = importlib.import_module(module) if isinstance(module, str) else module
    except ImportError:
        return name
    defaults = _method_options(module) if module is not None else None
    sequential = getattr(module, "sequential", None)
    if defaults is None or sequential is None:
        return name
    given = {k: v for k, v in options.items() if k in defaults}
    return name if sequential({**defaults, **given}) else f"{name} (one-shot)"


def recovery_block(value, where):
    """`recovery:` (grid-wide or per method): LoRA settings (suite/recovery.py DEFAULTS) plus
    `ratios` (recover only those ratios' cells; default all); `false` (per method): no recovery."""
    if value is False:
        return False
    value = dict(_expect(dict, value, where))
    ratios = value.pop("ratios", None)
    if ratios is not None:
        ratios = list_of(ratio)(ratios, f"{where}.ratios")
    from suite.recovery import settings_with_defaults

    for key in ("learning_rate", "lora_dropout"):
        if key in value:
            value[key] = _expect(float, value[key], f"{where}.{key}")
    try:
        settings_with_defaults(value)
    except UserError as exc:
        raise _Invalid(where, str(exc)) from None
    return {**value, "ratios": ratios}


# --------------------------------------------------------------------------- schema
METHOD_SCHEMA = {
    "name": (string, REQUIRED),
    "label": (optional(string), None),
    "options": (lambda v, w: dict(_expect(dict, v, w)), {}),
    "recovery": (optional(recovery_block), None),
}
SCHEMA = {
    "name": (file_name, REQUIRED),
    "models": (list_of(string), REQUIRED),
    "methods": (list_of(method), REQUIRED),
    "ratios": (list_of(ratio), REQUIRED),
    "seeds": (list_of(integer), [0]),
    # null nsamples/seqlen = each method's own documented default (its paper's, scaled to CPU)
    "calibration": {
        "corpus": (string, "c4"),
        "nsamples": (optional(positive_int), None),
        "seqlen": (optional(positive_int), None),
    },
    "evaluation": {
        "perplexity": (list_of(string, nonempty=False), ["wikitext2", "ptb", "c4"]),
        "seqlen": (positive_int, 128),
        "max_tokens": (optional(positive_int), None),
        "tasks": (list_of(string, nonempty=False), PAPER_TASKS),
        "limit": (optional(positive_int), None),
        "batch_size": (positive_int_or_auto, 1),  # zero-shot (lm-eval); "auto": its largest fitting batch
        "throughput": (boolean, True),
    },
    "device": (string, "cpu"),
    "dtype": (one_of(*DTYPES), "float32"),
    "dense": (boolean, True),
    # LoRA recovery after pruning (LLM-Pruner's post-training; suite/recovery.py): null = none
    "recovery": (optional(recovery_block), None),
}


def _fill(schema: dict, data: dict, where: str) -> dict:
    """Check `data` against `schema` and return a new dict with every default filled in."""
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(schema)}"
            raise _Invalid(f"{prefix}{key}", f"unknown key ({hint})")
    out = {}
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            value = {} if data.get(key) is None else data[key]
            out[key] = _fill(spec, _expect(dict, value, path), path)
        elif key in data:
            out[key] = spec[0](data[key], path)
        elif spec[1] is REQUIRED:
            raise _Invalid(path, "missing required key")
        else:
            out[key] = list(spec[1]) if isinstance(spec[1], list) else spec[1]
    return out


# --------------------------------------------------------------------------- methods registry
# Options every method accepts: the pipeline takes them out before calling the method's scorer.
SELECTION_OPTIONS = ("head_mode", "scope", "layers", "allow_empty", "round_to")


def _method_registry() -> dict | None:
    """`suite.methods.METHODS` (name -> method module or its import path) if that module exists."""
    try:
        module = importlib.import_module("suite.methods")
    except ModuleNotFoundError as exc:
        if exc.name == "suite.methods":
            return None
        raise
    return getattr(module, "METHODS", None)


def _method_options(entry) -> dict | None:
    """The method module's OPTIONS (name -> default), or None when they cannot be known here."""
    try:
        module = importlib.import_module(entry) if isinstance(entry, str) else entry
    except ImportError:
        return None  # a broken method module fails its own cells, with the error in the record
    options = getattr(module, "OPTIONS", None)
    return options if isinstance(options, dict) else None


def _check_method(entry: dict, where: str) -> None:
    """A registered method name; options known to the method and typed like their defaults."""
    registry = _method_registry()
    if registry is None:
        return
    name = entry["name"]
    if name == "dense":
        raise _Invalid(f"{where}.name", "'dense' is not a pruning method; the dense row comes from `dense: true`")
    if name not in registry:
        raise _Invalid(f"{where}.name", f"unknown method {name!r} (known: {', '.join(sorted(registry))})")
    defaults = _method_options(registry[name])
    if defaults is None:
        return
    for key, value in entry["options"].items():
        path = f"{where}.options.{key}"
        if key in SELECTION_OPTIONS:
            continue
        if key not in defaults:
            known = ", ".join([*defaults, *SELECTION_OPTIONS])
            raise _Invalid(path, f"unknown option of {name} (known: {known})")
        kind = type(defaults[key])
        if kind in (bool, int, float, str):
            entry["options"][key] = _expect(kind, value, path)
    module = registry[name]
    module = importlib.import_module(module) if isinstance(module, str) else module
    check = getattr(module, "check_options", None)  # the method's own value checks, as `suite prune` runs them
    if check is not None:
        given = {k: v for k, v in entry["options"].items() if k not in SELECTION_OPTIONS}
        try:
            check({**defaults, **given})
        except UserError as exc:
            raise _Invalid(f"{where}.options", str(exc)) from None


# --------------------------------------------------------------------------- load / expand
def _no_duplicates(values: list, key: str, what: str) -> None:
    for i, value in enumerate(values):
        if value in values[:i]:
            raise _Invalid(f"{key}[{i}]", f"duplicate {what} {value!r}")


def _check_unique(config: dict) -> None:
    """No grid cell twice, and one table row per label."""
    for key in ("models", "ratios", "seeds"):
        _no_duplicates(config[key], key, "entry")
    labels = [m["label"] for m in config["methods"]]
    _no_duplicates(labels, "methods", "label (give each entry its own `label`)")
    if "dense" in labels:
        raise _Invalid(f"methods[{labels.index('dense')}]", "the label 'dense' is reserved for the unpruned row")
    runs = [(m["name"], json.dumps(m["options"], sort_keys=True)) for m in config["methods"]]
    for i, run in enumerate(runs):
        if run in runs[:i]:  # the same cells under two labels: the second would never run
            raise _Invalid(f"methods[{i}]", f"same method and options as methods[{runs.index(run)}]")


def validate(data, source: str = "config") -> dict:
    """Check a parsed config (a dict) and return it with defaults filled."""
    try:
        if not isinstance(data, dict):
            raise _Invalid("", f"expected a mapping at the top level, got {type(data).__name__}")
        config = _fill(SCHEMA, data, "")
        _check_unique(config)
        return config
    except _Invalid as exc:
        raise UserError(f"{source}: {exc}") from None


def load_config(path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return validate(data, str(path))


def grid_identity(config: dict) -> dict:
    """{"name", "config_hash"} of a checked config: which grid a cell (and so a record) belongs to.

    The hash is of the config with its defaults filled (first 16 hex digits of sha256 of its
    canonical JSON), so an edited grid is another version of the same name. Not part of `cell_key`.
    """
    from suite.records import sha256_hex

    return {"name": config["name"], "config_hash": sha256_hex(config)[:16]}


def expand_cells(config: dict) -> list[dict]:
    """Dense row first per model, then methods x ratios x seeds, in config order; each cell also
    carries `grid` (`grid_identity`), which `suite run` checks an existing results file against."""
    shared = {key: config[key] for key in ("calibration", "evaluation", "device", "dtype")}
    shared["grid"] = grid_identity(config)
    cells = []
    for model in config["models"]:
        if config["dense"]:
            cells.append({"model": model, "method": "dense", "label": "dense", "options": {},
                          "ratio": 0.0, "seed": config["seeds"][0], **shared})
        for entry in config["methods"]:
            for ratio in config["ratios"]:
                recovery = cell_recovery(config.get("recovery"), entry.get("recovery"), ratio)
                for seed in config["seeds"]:
                    cells.append({"model": model, "method": entry["name"], "label": entry["label"],
                                  "options": entry["options"], "ratio": ratio, "seed": seed, **shared,
                                  **({"recovery": recovery} if recovery else {})})
    return [copy.deepcopy(cell) for cell in cells]  # independent dicts: no cell shares a nested one


def cell_recovery(grid: dict | None, method: dict | bool | None, ratio: float) -> dict | None:
    """A cell's full recovery settings (defaults filled, so the cell key names them), or None.

    The method's block overrides the grid's key by key; `false` on the method turns recovery off."""
    grid = grid or None  # `recovery: false` at the grid level: none
    if method is False or (grid is None and method is None):
        return None
    block = {**(grid or {}), **{k: v for k, v in (method or {}).items() if v is not None or k != "ratios"}}
    ratios = block.pop("ratios", None)
    if ratios is not None and ratio not in ratios:
        return None
    from suite.recovery import settings_with_defaults

    return settings_with_defaults(block)
