"""Experiment config: a YAML file checked against pydantic models, defaults filled, expanded into grid cells.

The schema is declared once, as models (`GridConfig`, `Calibration`, `Evaluation`, `MethodEntry`,
`MethodCalibration`; the `recovery:` block is checked by suite/recovery.py's own
`settings_with_defaults`): unknown keys are refused (with a difflib "did you mean"), choices are
`Literal` types, numbers and ranges annotated types whose checks give this module's words. A
method entry's `options` are its method's own `Options` (`suite.pruning.scoring.checked_options`, the
same check as `suite prune --opt`). `_line` turns the first pydantic error into ONE line naming the
file and the path of the key, e.g. `config.yaml: ratios[1]: expected a pruning ratio in (0, 1),
got 1.5`; numbers are never booleans, and `1e-3` (a string in YAML 1.1) is the number it means.
The checks across keys (`_check_grid`: unique cells and labels, calibration, offload) run in that
order once every key is valid. `validate` returns plain dicts in the declared key order (hashed by
`grid_identity`, so the order and the keys left out when not given are part of a grid's identity).

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
from typing import Annotated, Literal, get_args

import pydantic
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from suite.pruning.errors import UserError

# the seven zero-shot tasks of the papers' tables (LLM-Pruner, FLAP, MINI-LLM); `suite eval --tasks paper`
PAPER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = get_args(Dtype)
CALIBRATION_KEYS = ("corpus", "nsamples", "seqlen")
RUNTIME_KEYS = ("offload", "device_memory", "hidden_on")  # where weights and hidden states live: no result changes
_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "mapping"}


class _Invalid(ValueError):
    """A check failed at `where` (a key path below the value checked; "" = the value itself).

    Raised inside a pydantic validator, it reaches `_line` as the error's ctx["error"]."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where, self.message = where, message


# --------------------------------------------------------------------------- value checks
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # `1e-3`: YAML 1.1 reads it as a string


def _expect(kind, value):
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        value = float(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise _Invalid("", f"expected {_TYPE_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else value


def _positive_int(value):
    if _expect(int, value) <= 0:
        raise _Invalid("", f"expected a positive integer, got {value!r}")
    return value


def _ratio(value):
    value = _expect(float, value)
    if not 0.0 < value < 1.0:
        raise _Invalid("", f"expected a pruning ratio in (0, 1), got {value!r}")
    return value


def _file_name(value):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", _expect(str, value)):
        raise _Invalid("", f"expected a name made of letters, digits, '.', '_', '-', got {value!r}")
    return value


def _size(value):
    """A memory size: bytes (integer) or a string such as 24GB, 512MiB (suite.offload.parse_size)."""
    from suite.offload import parse_size

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid("", f"expected a size such as 24GB, got {value!r}")
    try:
        parse_size(value)
    except UserError as exc:
        raise _Invalid("", str(exc)) from None
    return value


def _mapping(value):
    """A nested mapping; null or absent: {} (every default)."""
    return {} if value is None else _expect(dict, value)


def _recovery(value):
    """`recovery:` (grid-wide or per method): LoRA settings (suite/recovery.py DEFAULTS, checked by
    its `settings_with_defaults`) plus `ratios` (recover only those ratios' cells; default all);
    `false`: no recovery. Returns the given settings, then `ratios`."""
    if value is False:
        return False
    value = dict(_expect(dict, value))
    ratios = value.pop("ratios", None)
    if ratios is not None:
        ratios = [_at(f"ratios[{i}]", _ratio, r) for i, r in enumerate(_at("ratios", _list(True), ratios))]
    from suite.recovery import settings_with_defaults

    for key in ("learning_rate", "lora_dropout"):
        if key in value:
            value[key] = _at(key, lambda v: _expect(float, v), value[key])
    try:
        settings_with_defaults(value)
    except UserError as exc:
        raise _Invalid("", str(exc)) from None
    return {**value, "ratios": ratios}


def _at(where: str, check, value):
    """check(value), its error placed at `where`."""
    try:
        return check(value)
    except _Invalid as exc:
        raise _Invalid(_join(where, exc.where), exc.message) from None


def _list(nonempty: bool):
    def check(value):
        if not _expect(list, value) and nonempty:
            raise _Invalid("", "expected a non-empty list")
        return value
    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _one_of(choices):
    def check(value):
        if value not in choices:
            raise _Invalid("", f"expected one of {', '.join(choices)}, got {value!r}")
        return value
    return check


# The annotated types of the models: the check runs first (this module's words), then pydantic's type.
def _checked(kind, check):
    return Annotated[kind, BeforeValidator(check)]


String = _checked(str, lambda v: _expect(str, v))
Integer = _checked(int, lambda v: _expect(int, v))
Boolean = _checked(bool, lambda v: _expect(bool, v))
PositiveInt = _checked(int, _positive_int)
Ratio = _checked(float, _ratio)
Recovery = _checked(dict | Literal[False] | None, _optional(_recovery))


def Choice(literal):  # noqa: N802 - a type
    return _checked(literal, _one_of(get_args(literal)))


def Optional(kind):  # noqa: N802 - a type: the annotated type `kind`, or null
    base, check = get_args(kind)[0], kind.__metadata__[0].func
    return _checked(base | None, _optional(check))


def List(kind, nonempty=True):  # noqa: N802 - a type: a list of `kind` (pydantic checks the items)
    return _checked(list[kind], _list(nonempty))


def Mapping(model):  # noqa: N802 - a type: a nested model; null or absent = its defaults
    return Annotated[model, BeforeValidator(_mapping), Field(default_factory=model)]


# --------------------------------------------------------------------------- models
class _Schema(BaseModel):
    """Unknown keys refused first (difflib's closest known key), as one line."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        for key in data if isinstance(data, dict) else ():
            if key not in cls.model_fields:
                close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(cls.model_fields)}"
                raise _Invalid(str(key), f"unknown key ({hint})")
        return data


class Calibration(_Schema):
    """The grid's `calibration:`. null nsamples/seqlen = each method's own documented default (its
    paper's, scaled to CPU); a value for every method needs `apply_to: all` (module docstring);
    `apply_to` is left out of the checked config when not given, so older configs keep their hash."""

    corpus: String = "c4"
    nsamples: Optional(PositiveInt) = None
    seqlen: Optional(PositiveInt) = None
    apply_to: Optional(Choice(Literal["all"])) = None


class MethodCalibration(_Schema):
    """A method entry's own `calibration:` (overrides the method's published one for this entry only)."""

    corpus: Optional(String) = None
    nsamples: Optional(PositiveInt) = None
    seqlen: Optional(PositiveInt) = None


class Evaluation(_Schema):
    perplexity: List(String, nonempty=False) = ["wikitext2", "ptb", "c4"]
    seqlen: PositiveInt = 128
    max_tokens: Optional(PositiveInt) = None
    tasks: List(String, nonempty=False) = PAPER_TASKS
    limit: Optional(PositiveInt) = None
    # zero-shot (lm-eval); "auto": its largest fitting batch
    batch_size: _checked(int | Literal["auto"], lambda v: v if v == "auto" else _positive_int(v)) = 1
    throughput: Boolean = True


class MethodEntry(_Schema):
    """A method name, or {name, label (default: `default_label`), options (default: {}), recovery,
    calibration, models}. `options` are the method's `Options` (checked and converted, e.g. "1e-3" -> 0.001)
    plus the selection options (SELECTION_OPTIONS); only the given ones are kept. `models` (default:
    all of the grid's): the grid's models this entry runs on, e.g. a method that refuses a family."""

    name: String
    label: Optional(String) = None
    models: Optional(List(String)) = None
    options: _checked(dict, lambda v: dict(_expect(dict, v))) = {}
    recovery: Recovery = None
    calibration: Optional(_checked(MethodCalibration, _mapping)) = None

    @model_validator(mode="after")
    def _registered(self):
        _check_method(self)
        self.label = self.label or default_label(self.name, self.options)
        return self


def _entry(value):
    return {"name": value} if isinstance(value, str) else _expect(dict, value)


class GridConfig(_Schema):
    name: _checked(str, _file_name)
    models: List(String)
    methods: List(Annotated[MethodEntry, BeforeValidator(_entry)])
    ratios: List(Ratio)
    seeds: List(Integer) = [0]
    calibration: Mapping(Calibration)
    evaluation: Mapping(Evaluation)
    device: String = "cpu"
    dtype: Choice(Dtype) = "float32"
    # models larger than the device (suite/offload.py); they never change a result, so they are in
    # neither the cell key nor the grid's hash (RUNTIME_KEYS): a grid may resume with other values
    offload: Optional(Choice(Literal["cpu", "disk"])) = None
    device_memory: _checked(int | str | None, _optional(_size)) = None
    hidden_on: Choice(Literal["device", "cpu"]) = "device"
    # what a ratio is a fraction of (suite.pipeline.RATIO_OF): all parameters, or the decoder layers'
    ratio_of: Choice(Literal["all", "layers"]) = "all"
    dense: Boolean = True
    # LoRA recovery after pruning (LLM-Pruner's post-training; suite/recovery.py): null = none
    recovery: Recovery = None

    def to_dict(self) -> dict:
        """Plain dicts in the declared order; keys added after a grid's hash existed are left out
        when not given (the grid calibration's `apply_to`, a method entry's `calibration` and `models`)."""
        config = self.model_dump()
        if config["ratio_of"] == "all":
            del config["ratio_of"]  # the default, as before the key existed: grids keep their hash
        if config["calibration"]["apply_to"] is None:
            del config["calibration"]["apply_to"]
        for entry in config["methods"]:
            for key in ("calibration", "models"):
                if entry[key] is None:
                    del entry[key]
        return config


def _join(where: str, below: str) -> str:
    return f"{where}{below}" if not below or below.startswith("[") or not where else f"{where}.{below}"


def _line(exc: pydantic.ValidationError) -> str:
    """The first error of `exc` as `path: message` (path with `.key` and `[i]`)."""
    error = exc.errors(include_url=False)[0]
    where = ""
    for part in error["loc"]:
        where = _join(where, f"[{part}]" if isinstance(part, int) else str(part))
    kind, value, cause = error["type"], error.get("input"), (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid):
        where, message = _join(where, cause.where), cause.message
    elif kind == "missing":
        message = "missing required key"
    else:  # not reached by a config: every field's own check runs first
        message = f"{error['msg']}, got {value!r}"
    return f"{where}: {message}" if where else message


# --------------------------------------------------------------------------- methods registry
def _method_registry() -> dict | None:
    """`suite.methods.METHODS` (name -> `Method` entry, a method module or its import path) if that module exists."""
    try:
        module = importlib.import_module("suite.methods")
    except ModuleNotFoundError as exc:
        if exc.name == "suite.methods":
            return None
        raise
    return getattr(module, "METHODS", None)


def _method_module(name: str):
    """The registered method module of `name`, or None: no registry, not registered, or a broken
    module (that one fails its own cells, with the error in the record)."""
    module = (_method_registry() or {}).get(name)
    module = getattr(module, "module", module)  # a `suite.methods.Method` entry: its import path
    try:
        return importlib.import_module(module) if isinstance(module, str) else module
    except ImportError:
        return None


def _layer_range_spec(value):
    """A layer range as `suite prune --layers` takes it (suite.pruning.select.parse_layer_range's forms)."""
    from suite.pruning.select import parse_layer_range

    if isinstance(value, bool) or not isinstance(value, (str, list)):
        raise _Invalid("", f"expected 'all', 'start:end' or a list, got {value!r}")
    try:
        layers = parse_layer_range(value, 1 << 20)  # the form, and emptiness on any depth: the depth is the cell's
    except (UserError, TypeError, ValueError) as exc:
        raise _Invalid("", str(exc) if isinstance(exc, UserError) else
                       f"expected 'all', 'start:end' or a list of layer indices, got {value!r}") from None
    if not layers or min(layers) < 0:
        raise _Invalid("", f"the layer range {value!r} is {'empty' if not layers else 'negative'} on any model")
    return value


# A method entry's selection options: the checks of `suite prune`'s --head-mode, --scope, --layers,
# --allow-empty, --round-to and --depth-rule (the pipeline takes them out before calling the method's scorer).
SELECTION_CHECKS = {
    "head_mode": _one_of(("q-head", "kv-group")),  # architectures.HEAD_MODES (not imported here: it loads torch)
    "scope": _one_of(("layer", "global")),
    "layers": _layer_range_spec,
    "allow_empty": lambda v: _expect(bool, v),
    "round_to": _optional(_positive_int),
    "depth_rule": _one_of(("nearest", "not_above")),  # suite.pruning.select.DEPTH_RULES (methods removing whole layers)
}
SELECTION_OPTIONS = tuple(SELECTION_CHECKS)  # options every method accepts (suite/memory_model.py takes them out too)


def _check_method(entry: MethodEntry) -> None:
    """A registered method name; its selection options (SELECTION_CHECKS) and its options checked by
    the method's own `Options` (with the entry's `scope`), converted in place (given keys only)."""
    from suite.pruning.scoring import check_selection, checked_options

    for key, check in SELECTION_CHECKS.items():
        if key in entry.options:
            _at(f"options.{key}", check, entry.options[key])
    registry = _method_registry()
    if registry is None:
        return
    if entry.name == "dense":
        raise _Invalid("name", "'dense' is not a pruning method; the dense row comes from `dense: true`")
    if entry.name not in registry:
        raise _Invalid("name", f"unknown method {entry.name!r} (known: {', '.join(sorted(registry))})")
    module = _method_module(entry.name)
    if module is None:
        return
    known = [*getattr(getattr(module, "Options", None), "model_fields", {}), *SELECTION_OPTIONS]  # a config's options: the method's and selection's
    for key in entry.options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise _Invalid(f"options.{key}", f"unknown option of {entry.name} ({hint}known: {', '.join(known)})")
    given = {k: v for k, v in entry.options.items() if k not in SELECTION_OPTIONS}
    o = entry.options
    try:
        parsed = checked_options(module, given, o.get("scope"), name=entry.name)
        check_selection(module, entry.name, o.get("scope"), o.get("layers"), o.get("head_mode"),
                        bool(o.get("allow_empty")), o.get("round_to"), o.get("depth_rule"))
    except UserError as exc:
        raise _Invalid("options", str(exc)) from None
    entry.options.update({k: parsed[k] for k in given if k in parsed})  # an old spelling stays as given


def default_label(name: str, options: dict) -> str:
    """The table's row name of a method entry without a `label`: its name, with the variants its
    options name in parentheses: "one-shot" for a method that prunes layer by layer by default run
    with `sequential=false` (`wanda-sp --opt sequential=false`), and whatever the module's
    `variant(options) -> str | None` says (flap `variance=reference`: "reference variance")."""
    module = _method_module(name)
    defaults = getattr(module, "OPTIONS", None)
    if not isinstance(defaults, dict):
        return name
    merged = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    sequential, variant = getattr(module, "sequential", None), getattr(module, "variant", None)
    suffixes = [] if sequential is None or sequential(merged) else ["one-shot"]
    suffixes += [s for s in [variant(merged) if variant else None] if s]
    return f"{name} ({', '.join(suffixes)})" if suffixes else name


# --------------------------------------------------------------------------- checks across keys
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


def _check_offload(config: dict) -> None:
    """device_memory needs offload; offload needs a non-CPU device for `cpu`, methods that run
    offloaded (suite.offload.offload_refusal) and no LoRA recovery."""
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


def _own_calibration(name: str) -> dict | None:
    """A method's CALIBRATION (its published setting and `source`), or None (it calibrates on nothing)."""
    own = getattr(_method_module(name), "CALIBRATION", None)
    return own if isinstance(own, dict) else None


def _check_calibration(config: dict) -> None:
    """No grid calibration value silently replaces a method's own; entries calibrate only calibrating methods."""
    if _method_registry() is None:
        return
    grid = config["calibration"]
    explicit = grid.get("apply_to") == "all"
    for i, entry in enumerate(config["methods"]):
        own, mine = _own_calibration(entry["name"]), entry.get("calibration") or {}
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


def _check_hidden_on(config: dict) -> None:
    """`hidden_on: cpu` and a method entry's own `hidden_on: device` (minillm's per-method spelling
    of the same setting, suite.pipeline.hidden_on_setting) contradict each other."""
    for i, entry in enumerate(config["methods"]):
        own = entry["options"].get("hidden_on")
        if config["hidden_on"] == "cpu" and own not in (None, "cpu"):
            raise _Invalid(f"methods[{i}].options.hidden_on", f"{own!r} contradicts the grid's `hidden_on: cpu` "
                           "(one setting): give it once")


def _check_entry_models(config: dict) -> None:
    """A method entry's `models` names only models of the grid."""
    for i, entry in enumerate(config["methods"]):
        unknown = [m for m in entry.get("models") or [] if m not in config["models"]]
        if unknown:
            raise _Invalid(f"methods[{i}].models", f"{unknown[0]!r} is not one of the grid's models")


def _check_grid(config: dict) -> None:
    """The checks across keys, in this order, once every key is valid."""
    _check_unique(config)
    _check_entry_models(config)
    _check_calibration(config)
    _check_offload(config)
    _check_hidden_on(config)


def validate(data, source: str = "config") -> dict:
    """Check a parsed config (a dict) and return it with defaults filled (plain dicts).

    Raises UserError: one line `SOURCE: path: message` (module docstring)."""
    try:
        if not isinstance(data, dict):
            raise _Invalid("", f"expected a mapping at the top level, got {type(data).__name__}")
        config = GridConfig.model_validate(data).to_dict()
        _check_grid(config)
        return config
    except pydantic.ValidationError as exc:
        raise UserError(f"{source}: {_line(exc)}") from None
    except _Invalid as exc:
        raise UserError(f"{source}: {exc.where}: {exc.message}" if exc.where else f"{source}: {exc.message}") from None


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


def expand_cells(config: dict) -> list[dict]:
    """Dense row first per model, then methods x ratios x seeds, in config order; each cell also
    carries `grid` (`grid_identity`), which `suite run` checks an existing results file against."""
    shared = {key: config[key] for key in ("evaluation", "device", "dtype")}
    grid_calib = {k: config["calibration"][k] for k in CALIBRATION_KEYS}
    shared.update({key: config[key] for key in RUNTIME_KEYS if config.get(key) not in (None, "device")})
    shared["grid"] = grid_identity(config)
    if config.get("ratio_of", "all") != "all":
        shared["ratio_of"] = config["ratio_of"]  # in the cell key (OPTIONAL_CELL_KEYS) only when not the default
    cells = []
    for model in config["models"]:
        if config["dense"]:
            cells.append({"model": model, "method": "dense", "label": "dense", "options": {},
                          "ratio": 0.0, "seed": config["seeds"][0], "calibration": grid_calib, **shared})
        for entry in config["methods"]:
            if entry.get("models") is not None and model not in entry["models"]:
                continue
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
