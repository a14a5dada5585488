"""Experiment config: a YAML file checked against SCHEMA, defaults filled, expanded into grid cells.

SCHEMA is plain data: a key maps either to a nested schema (a dict, for a mapping with defaults)
or to `(check, default)`, where `check(value, where)` returns the value or raises UserError and
`REQUIRED` as the default means the key must be given. Every error names the file and the path of
the key, e.g. `config.yaml: methods[2].options.eps: expected number, got 'abc'`.

Calibration (issue 11): every method calibrates with its own published setting (its module's
CALIBRATION) unless the config says otherwise EXPLICITLY. A method entry's own `calibration:`
(corpus, nsamples, seqlen) applies to that entry's cells. The grid's `calibration:` applies to
every method only with `apply_to: all`; without it, a grid value that differs from a calibrating
method's own value is refused (one line naming the method, its value and where that comes from),
so a grid can no longer silently replace, e.g., LLM-Pruner's 10 windows with 128. A grid value
equal to every method's own (the default corpus c4 is) is allowed. Precedence per key: the method
entry, then the grid with `apply_to: all`, then the method's own. Each cell carries where each
given value came from (`calibration_origin`, not part of its key); the record's
`calibration_origin` adds the method's defaults and their `source` (suite/pipeline.py).
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
# the seven zero-shot tasks of the papers' tables (LLM-Pruner, FLAP, MINI-LLM); `suite eval --tasks paper`
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


def size(value, where):
    """A memory size: bytes (integer) or a string such as 24GB, 512MiB (suite.offload.parse_size)."""
    from suite.offload import parse_size

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(where, f"expected a size such as 24GB, got {value!r}")
    try:
        parse_size(value)
    except UserError as exc:
        raise _Invalid(where, str(exc)) from None
    return value


def _check_offload(config: dict) -> None:
    if config["offload"] is None and config["device_memory"] is not None:
        raise _Invalid("device_memory", "needs offload: cpu or disk")
    if config["offload"] == "cpu" and config["device"].split(":")[0] == "cpu":
        raise _Invalid("offload", "cpu keeps weights in host memory, which is the device on a CPU: use disk")
    if config["offload"] is not None:
        from suite.offload import offload_refusal

        for i, entry in enumerate(config["methods"]):
            why = offload_refusal(entry["name"], entry.get("options"))
            if why:
                raise _Invalid(f"methods[{i}]", f"{why}: it does not run with offload yet")
    if config["offload"] is not None and (config["recovery"] or any(m.get("recovery") for m in config["methods"])):
        raise _Invalid("offload", "LoRA recovery does not run on offloaded weights; drop offload or recovery")


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
    if entry["calibration"] is None:
        del entry["calibration"]  # absent, as before the key existed (the grid's hash stays the same)
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


CALIBRATION_KEYS = ("corpus", "nsamples", "seqlen")
CALIBRATION_SCHEMA = {
    "corpus": (optional(string), None),
    "nsamples": (optional(positive_int), None),
    "seqlen": (optional(positive_int), None),
}


def method_calibration(value, where):
    """A method entry's own `calibration:` (any of corpus, nsamples, seqlen); keys not given: None."""
    return _fill(CALIBRATION_SCHEMA, _expect(dict, value, where), where)


# --------------------------------------------------------------------------- schema
METHOD_SCHEMA = {
    "name": (string, REQUIRED),
    "label": (optional(string), None),
    "options": (lambda v, w: dict(_expect(dict, v, w)), {}),
    "recovery": (optional(recovery_block), None),
    # the entry's own calibration (overrides the method's published one for this entry only)
    "calibration": (optional(method_calibration), None),
}
SCHEMA = {
    "name": (file_name, REQUIRED),
    "models": (list_of(string), REQUIRED),
    "methods": (list_of(method), REQUIRED),
    "ratios": (list_of(ratio), REQUIRED),
    "seeds": (list_of(integer), [0]),
    # null nsamples/seqlen = each method's own documented default (its paper's, scaled to CPU); a
    # value for every method needs `apply_to: all` (module docstring); `apply_to` is left out of the
    # checked config when not given, so older configs keep their hash
    "calibration": {
        "corpus": (string, "c4"),
        "nsamples": (optional(positive_int), None),
        "seqlen": (optional(positive_int), None),
        "apply_to": (optional(one_of("all")), None),
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
    # models larger than the device (suite/offload.py); they never change a result, so they are in
    # neither the cell key nor the grid's hash (RUNTIME_KEYS): a grid may resume with other values
    "offload": (optional(one_of("cpu", "disk")), None),
    "device_memory": (optional(lambda v, w: size(v, w)), None),
    "hidden_on": (one_of("device", "cpu"), "device"),
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
    module = registry[name]
    try:
        module = importlib.import_module(module) if isinstance(module, str) else module
    except ImportError:
        return  # a broken method module fails its own cells, with the error in the record
    if hasattr(module, "Options"):  # one declaration (minillm.options): types, choices, ranges, combinations
        from minillm.options import parse

        given = {k: v for k, v in entry["options"].items() if k not in SELECTION_OPTIONS}
        try:
            parsed = parse(module.Options, name, given, entry["options"].get("scope"))
        except UserError as exc:
            raise _Invalid(f"{where}.options", str(exc)) from None
        entry["options"].update({k: parsed[k] for k in given})
        return
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
    check_scope = getattr(module, "check_scope", None)  # and the options the selection scope would ignore
    given = {k: v for k, v in entry["options"].items() if k not in SELECTION_OPTIONS}
    try:
        if check is not None:
            check({**defaults, **given})
        if check_scope is not None:
            check_scope({**defaults, **given}, entry["options"].get("scope"))
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
    runs = [(m["name"], json.dumps(m["options"], sort_keys=True), json.dumps(m.get("calibration"), sort_keys=True))
            for m in config["methods"]]
    for i, run in enumerate(runs):
        if run in runs[:i]:  # the same cells under two labels: the second would never run
            raise _Invalid(f"methods[{i}]", f"same method and options as methods[{runs.index(run)}]")


def _own_calibration(module) -> dict | None:
    """A method module's CALIBRATION (its published setting and `source`), or None (it calibrates on nothing)."""
    try:
        module = importlib.import_module(module) if isinstance(module, str) else module
    except ImportError:
        return None  # a broken method module fails its own cells, with the error in the record
    own = getattr(module, "CALIBRATION", None)
    return own if isinstance(own, dict) else None


def _check_calibration(config: dict) -> None:
    """No grid calibration value silently replaces a method's own; entries calibrate only calibrating methods."""
    registry = _method_registry()
    if registry is None:
        return
    grid = config["calibration"]
    explicit = grid.get("apply_to") == "all"
    for i, entry in enumerate(config["methods"]):
        own, mine = _own_calibration(registry[entry["name"]]), entry.get("calibration") or {}
        if own is None:
            if any(v is not None for v in mine.values()):
                raise _Invalid(f"methods[{i}].calibration", f"{entry['name']} uses no calibration data")
            continue
        for key in CALIBRATION_KEYS:
            value = grid.get(key)
            if explicit or value is None or mine.get(key) is not None or value == own.get(key):
                continue
            raise _Invalid(f"calibration.{key}",
                           f"{value!r} would replace {entry['name']}'s own {key} {own.get(key)!r} "
                           f"({own.get('source', 'its CALIBRATION')}); to use it for every method write "
                           f"`apply_to: all` under calibration, or give it in methods[{i}].calibration")


def validate(data, source: str = "config") -> dict:
    """Check a parsed config (a dict) and return it with defaults filled."""
    try:
        if not isinstance(data, dict):
            raise _Invalid("", f"expected a mapping at the top level, got {type(data).__name__}")
        config = _fill(SCHEMA, data, "")
        if config["calibration"]["apply_to"] is None:
            del config["calibration"]["apply_to"]
        _check_unique(config)
        _check_calibration(config)
        _check_offload(config)
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

    hashed = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    if config.get("calibration", {}).get("apply_to") == "all":
        # `apply_to: all` states what a grid calibration meant before issue 11 (one setting for
        # every method): the same grid, so the same hash, and older results files stay its own
        hashed["calibration"] = {k: v for k, v in config["calibration"].items() if k != "apply_to"}
    return {"name": config["name"], "config_hash": sha256_hex(hashed)[:16]}


RUNTIME_KEYS = ("offload", "device_memory", "hidden_on")  # where weights and hidden states live: no result changes


def expand_cells(config: dict) -> list[dict]:
    """Dense row first per model, then methods x ratios x seeds, in config order; each cell also
    carries `grid` (`grid_identity`), which `suite run` checks an existing results file against."""
    shared = {key: config[key] for key in ("evaluation", "device", "dtype")}
    grid_calib = {k: config["calibration"][k] for k in CALIBRATION_KEYS}
    shared.update({key: config[key] for key in RUNTIME_KEYS if config.get(key) not in (None, "device")})
    shared["grid"] = grid_identity(config)
    cells = []
    for model in config["models"]:
        if config["dense"]:
            cells.append({"model": model, "method": "dense", "label": "dense", "options": {},
                          "ratio": 0.0, "seed": config["seeds"][0], "calibration": grid_calib, **shared})
        for entry in config["methods"]:
            calibration, origin = cell_calibration(config["calibration"], entry.get("calibration"))
            for ratio in config["ratios"]:
                recovery = cell_recovery(config.get("recovery"), entry.get("recovery"), ratio)
                for seed in config["seeds"]:
                    cells.append({"model": model, "method": entry["name"], "label": entry["label"],
                                  "options": entry["options"], "ratio": ratio, "seed": seed,
                                  "calibration": calibration, **shared, "calibration_origin": origin,
                                  **({"recovery": recovery} if recovery else {})})
    return [copy.deepcopy(cell) for cell in cells]  # independent dicts: no cell shares a nested one


def cell_calibration(grid: dict, entry: dict | None) -> tuple[dict, dict]:
    """(the cell's calibration {corpus, nsamples, seqlen}, where each given value comes from).

    The entry's values win, then the grid's; None = the method's own (resolved in the cell,
    suite/pipeline.py). Origins: "method entry", "grid (apply_to: all)", or "grid" for a grid value
    without the marker (validation has made sure it equals every method's own). A cell's key has
    the values alone: a grid without entry calibrations keeps the keys it had before issue 11.
    """
    label = "grid (apply_to: all)" if grid.get("apply_to") == "all" else "grid"
    values, origin = {}, {}
    for key in CALIBRATION_KEYS:
        mine = (entry or {}).get(key)
        values[key] = mine if mine is not None else grid.get(key)
        if values[key] is not None:
            origin[key] = "method entry" if mine is not None else label
    return values, origin


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
