"""The whole flow in one place: load -> calibrate -> score groups -> select -> slice -> (recover) -> evaluate -> record.

`prune` is what `python -m suite prune` runs; `run_cell` is one cell of an experiment grid (the
runner calls it in a fresh subprocess). Every phase is timed and its peak memory recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from suite.pruning.architectures import adapter_for, all_group_sets
from suite.pruning.errors import UserError
from suite.pruning.layerwise import hidden_on as hidden_states_on
from suite.pruning.plan import PLAN_ATTRIBUTE, apply_plan, carried_plan, full_plan, plan_summary
from suite.pruning.scoring import Scoring, check_selection, checked_options, removes_layers, transforms
from suite.pruning.select import Selection, depth_budget, parse_layer_range, select, select_layers
from suite.measure import measure
from suite.methods import get_method
from suite.models import count_parameters
from suite.regression import kept_indices


RATIO_OF = {"all": "all parameters (embeddings and output head included)",
            "layers": "the decoder layers' parameters (embeddings, output head and final norm excluded)"}


def decoder_layer_parameters(model) -> int:
    """Parameters of the decoder layers (what `ratio_of: layers` takes its fraction of)."""
    return sum(p.numel() for layer in adapter_for(model).layers(model) for p in layer.parameters())


def budget_ratio(model, ratio: float, ratio_of: str = "all") -> float:
    """The fraction of ALL parameters the engine's budget (suite/pruning/select.py) removes for `ratio`
    under the convention `ratio_of` (RATIO_OF): "all" as given (LLM-Pruner, FLAP count all parameters);
    "layers": ratio x decoder-layer parameters / all parameters (Bonsai and most later papers count the
    decoder layers only; on a small model with a large vocabulary the two differ by a factor of 2 or
    more). UserError for an unknown convention."""
    if ratio_of not in RATIO_OF:
        raise UserError(f"ratio_of must be one of {', '.join(RATIO_OF)}, got {ratio_of!r}")
    if ratio_of == "all":
        return float(ratio)
    return float(ratio) * decoder_layer_parameters(model) / count_parameters(model)


@dataclass
class PruneOutcome:
    selection: Selection
    scoring: Scoring
    options: dict
    calibration: dict | None
    layer_range: list[int]  # the layers that may be pruned (recorded as selection.layers)
    scope: str
    phases: dict = field(default_factory=dict)
    params_dense: int = 0
    params_pruned: int = 0
    warnings: list = field(default_factory=list)
    round_to: int | None = None
    calibration_origin: dict | None = None
    ratio_of: str = "all"
    params_dense_layers: int = 0  # the dense decoder layers' parameters
    depth_rule: str | None = None  # methods that remove whole layers: the budget's rule (select.depth_budget)


def hidden_on_setting(given: dict | None, engine: str | None) -> str | None:
    """The one hidden-state placement of a run ("cpu" | "device" | None: not given, the device).

    `engine`: `--hidden-on` / a grid's `hidden_on:` (`layerwise.hidden_on`); a method may also take
    `hidden_on` as an option (minillm's per-method spelling of the same setting, in `given`). Both
    given and different is one UserError line; otherwise the one given wins."""
    own = (given or {}).get("hidden_on")
    if own is not None and engine is not None and own != engine:
        raise UserError(f"--opt hidden_on={own} contradicts --hidden-on {engine}: they are one setting, give it once")
    return engine if engine is not None else own


def is_sequential(method, options: dict) -> bool:
    """Whether the method prunes layer by layer (its `sequential(options)`; one-shot if absent)."""
    check = getattr(method, "sequential", None)
    return bool(check and check(options))


def prunes_itself(method) -> bool:
    """Whether the method chooses and slices its groups itself, in rounds (its `prune`; scoring.py)."""
    return callable(getattr(method, "prune", None))


METHOD_DEFAULT = "method default"


def calibration_origin(method, calib: dict | None) -> dict | None:
    """Where each calibration setting of a run comes from, for its record; None without calibration.

    {"corpus"|"nsamples"|"seqlen": origin, "method_source": the method's CALIBRATION["source"]}.
    origin: "method default" (the method's published value: a key not given, or given with the
    same value), else the label `calib["origin"]` has for the key (a grid cell's "method entry" /
    "grid (apply_to: all)", suite/config.py; `suite prune`'s "command line"), else "given".
    """
    if method.CALIBRATION is None:
        return None
    calib = calib or {}
    labels = calib.get("origin") or {}
    out = {}
    for key in ("corpus", "nsamples", "seqlen"):
        value = calib.get(key)
        same = value is None or value == method.CALIBRATION[key]
        out[key] = METHOD_DEFAULT if same else labels.get(key, "given")
    out["method_source"] = method.CALIBRATION.get("source")
    return out


def check_offloadable(model, method_name: str, options: dict | None = None) -> None:
    """UserError when `model` has offloaded weights (`load_model(offload=...)`) and the method with
    these options cannot score such a model yet (`suite.offload.offload_refusal`)."""
    from suite.pruning.layerwise import offloaded
    from suite.offload import refuse_method

    if offloaded(model):
        refuse_method(method_name, options)


def check_retransform(model, method_name: str) -> None:
    """UserError (one line) when `model` was transformed by a method whose checkpoint format holds no
    second kind of pruning: a residual-sliced model (`config.residual_widths`, suite/pruning/rotation.py)."""
    from suite.pruning.modeling_sliced import CONFIG_KEY

    if getattr(model.config, CONFIG_KEY, None) is not None:
        raise UserError(f"this model's residual stream was already rotated and sliced (slicegpt); pruning it again "
                        f"with {method_name} is not supported: prune the dense model")


def calibration_settings(method, calib: dict | None) -> dict | None:
    """The method's paper defaults, overridden by the user's (corpus, nsamples, seqlen).

    `calib` may also hold "origin" ({key: label}, for `calibration_origin`), which is not a setting.
    """
    if method.CALIBRATION is None:
        return None
    out = {k: method.CALIBRATION[k] for k in ("corpus", "nsamples", "seqlen")}
    out.update({k: v for k, v in (calib or {}).items() if v is not None and k in out})
    return out


def prune(model, tokenizer, method_name: str, ratio: float, seed: int = 0, options: dict | None = None,
          calib: dict | None = None, head_mode: str = "q-head", scope: str | None = None, layers=None,
          allow_empty: bool = False, device: str = "cpu",
          round_to: int | None = None, hidden_on: str | None = None, ratio_of: str = "all",
          depth_rule: str | None = None) -> PruneOutcome:
    """Score, select and slice `model` in place; returns the selection and measured phases.

    depth_rule: for a method that removes whole layers, how the ratio becomes a number of layers
    ("nearest" | "not_above"; None: "nearest"; `select.depth_budget`); refused for other methods.

    scope: the selection scope ("layer" | "global"; None: the method's); layers: the layer range
    (`parse_layer_range`'s forms; None: the method's SELECTION["layers"]). `hidden_on` ("cpu" | "device" | None = the device): where the layer-by-layer passes keep the
    calibration hidden states between layers (`layerwise.hidden_on`). `ratio_of`: what `ratio`
    is a fraction of (`RATIO_OF`, `budget_ratio`)."""
    if not 0.0 < float(ratio) < 1.0:
        raise UserError(f"ratio must be in (0, 1), got {ratio}")
    dense_layers = decoder_layer_parameters(model)
    ratio = budget_ratio(model, ratio, ratio_of)
    method = get_method(method_name)
    given, options = options, checked_options(method, options, scope)  # as the CLI and the grid config check them
    hidden_on = hidden_on_setting(given, hidden_on)
    if "hidden_on" in options:  # the method's own spelling: the record's options say where they were
        options["hidden_on"] = hidden_on or "device"
    check_offloadable(model, method_name, options)
    check_retransform(model, method_name)
    check_selection(method, method_name, scope, layers, head_mode, allow_empty, round_to, depth_rule)
    n_layers = len(adapter_for(model).layers(model))
    layer_range = parse_layer_range(layers if layers is not None else method.SELECTION.get("layers", "all"), n_layers)
    scope = scope or method.SELECTION.get("scope", "layer")
    if removes_layers(method):
        depth_rule = depth_rule or "nearest"  # the ratio as a number of layers, before calibrating
        budget = depth_budget(model, ratio, layer_range, depth_rule)
    settings = calibration_settings(method, calib)
    warnings = []
    if settings is not None:
        from suite.evaluate import check_window

        warnings = [w for w in [check_window(model, settings["seqlen"], "calibration seqlen")] if w]
    phases = {}
    windows = None
    if settings is not None:
        from suite.data import calibration_windows

        with measure(device) as phases["calibrate"]:
            windows = calibration_windows(tokenizer, settings["corpus"], settings["nsamples"],
                                          settings["seqlen"], seed=seed)
    dense = count_parameters(model)
    torch.manual_seed(seed)
    hidden = None if hidden_on in (None, "device") else hidden_on
    group_sets = all_group_sets(model, head_mode)
    if transforms(method):  # the method changes the model itself (suite/pruning/scoring.py `transform`)
        with measure(device) as phases["score"], hidden_states_on(hidden):
            done = method.transform(model, windows, ratio, options, seed, round_to)
        scoring = Scoring({}, info=done.info)
        selection = Selection(full_plan(model), done.target_removed, done.removed, dense)
        if carried_plan(model) is None:  # every head and channel kept: what a save writes as plan.json
            setattr(model, PLAN_ATTRIBUTE, selection.plan)
    elif removes_layers(method):  # whole layers: the budget (a number of layers) was fixed above
        with measure(device) as phases["score"], hidden_states_on(hidden):
            scoring = method.score_layers(model, windows, budget, options, seed)
    elif is_sequential(method, options):  # score, select and slice one layer at a time (suite/pruning/sequential.py)
        if scope != "layer":
            raise UserError(f"{method_name} with sequential=true prunes every layer to its own budget: "
                            f"scope {scope!r} needs --opt sequential=false")
        from suite.pruning.sequential import prune_sequentially

        with measure(device) as phases["score"], hidden_states_on(hidden):
            selection, scoring = prune_sequentially(model, windows, method, options, ratio, layer_range,
                                                    head_mode=head_mode, allow_empty=allow_empty, round_to=round_to,
                                                    batch_size=int(options.get("batch_size", 1)))
    elif prunes_itself(method):  # rounds of its own choosing, each sliced (suite/pruning/iterative.py)
        with measure(device) as phases["score"], hidden_states_on(hidden):
            selection, scoring = method.prune(model, windows, options, ratio, layers=layer_range, head_mode=head_mode,
                                              allow_empty=allow_empty, round_to=round_to, seed=seed)
    else:
        with measure(device) as phases["score"], hidden_states_on(hidden):
            scoring = method.score(model, windows, group_sets, options, seed)
    with measure(device) as phases["prune"]:
        if removes_layers(method):
            selection = select_layers(model, scoring.scores, budget)
            apply_plan(model, selection.plan)
        elif not (scoring.info.get("sequential") or transforms(method) or prunes_itself(method)):
            selection = select(model, scoring.scores, ratio, scope=scope, layers=layer_range, head_mode=head_mode,
                               allocation_weights=scoring.info.get("layer_weights"), allow_empty=allow_empty,
                               round_to=round_to)
            apply_plan(model, selection.plan)
        if dense - count_parameters(model) != selection.removed:
            raise AssertionError(f"budget bookkeeping: removed {dense - count_parameters(model)} "
                                 f"!= planned {selection.removed}")
        if scoring.compensate is not None:  # may add parameters (FLAP creates biases on LLaMA)
            scoring.compensate(model, selection.plan)
    pruned = count_parameters(model)
    return PruneOutcome(selection, scoring, options, settings, layer_range, scope, phases, dense, pruned,
                        warnings=warnings, round_to=round_to, calibration_origin=calibration_origin(method, calib),
                        ratio_of=ratio_of, params_dense_layers=dense_layers, depth_rule=depth_rule)


def outcome_record(outcome: PruneOutcome, ratio: float) -> dict:
    """The pruning part of a result record. `ratio_target` is in the convention `ratio_of`; both
    achieved fractions are recorded: of all parameters (`ratio_achieved`) and of the dense decoder
    layers' parameters (`ratio_achieved_layers`)."""
    sel = outcome.selection
    removed = outcome.params_dense - outcome.params_pruned
    return {
        "ratio_target": float(ratio),
        "ratio_of": outcome.ratio_of,
        "ratio_achieved": round(removed / outcome.params_dense, 6),
        "ratio_achieved_layers": round(removed / outcome.params_dense_layers, 6),
        "params": {"dense": outcome.params_dense, "pruned": outcome.params_pruned},
        "options": outcome.options,
        "calibration": outcome.calibration,
        "calibration_origin": outcome.calibration_origin,
        "selection": {"scope": outcome.scope, "layers": outcome.layer_range, "round_to": outcome.round_to,
                      "target_removed": sel.target_removed, "removed": sel.removed,
                      # depth pruning: the rule that turned the ratio into a number of layers, and which went
                      **({"depth_rule": outcome.depth_rule, "removed_layers": list(sel.plan.removed_layers)}
                         if outcome.depth_rule else {})},
        "plan_summary": plan_summary(sel.plan),
        "kept": kept_indices(sel.plan),  # the kept groups themselves, compactly (`suite check` compares them)
        "method_info": {k: v for k, v in outcome.scoring.info.items() if k != "layer_weights"},
        # a method with a sequential kind says which variant ran (default label: "NAME (one-shot)")
        **({"variant": "sequential" if outcome.scoring.info["sequential"] else "one-shot"}
           if "sequential" in outcome.scoring.info else {}),
        "phases": outcome.phases,
        **({"warnings": outcome.warnings} if outcome.warnings else {}),
    }


SPEED_PROBE = {"min_run_time": 0.1, "max_run_time": 0.5, "warmup": 2}  # per regime and model: ≤ 3 s a cell (CI runs ~30 cells); believable numbers: `suite bench-speed`
PROBE_NOTE = ("cheap probe, indicative only: torch.utils.benchmark adaptive_autorange (0.1-0.5 s) of prefill [batch, "
              "seqlen] and one decode step; dense twice before pruning, pruned once after evaluation, not interleaved "
              "(a control 0.8-1.2 on 2 CPU cores); believable speed-ups: `suite bench-speed` (suite/speed.py compare)")


def speed_record(dense: list[dict], pruned: dict) -> dict:
    """The record's `throughput`: prefill tokens/s (pruned, dense: the mean of the two dense medians' speeds),
    per regime the speed-up over dense and the dense/dense control (first dense run / second), the
    timings themselves (median and IQR, suite/speed.py `speed`), and what the probe is worth (`probe`,
    `interleaved: false`: the cheap cell probe, not `suite bench-speed`'s interleaved comparison)."""
    out = {}
    for regime in ("prefill", "decode"):
        d1, d2, p = (m[regime]["median_s"] for m in (*dense, pruned))
        out[f"{regime}_speedup"] = round(((d1 + d2) / 2) / p, 4)
        out[f"{regime}_dense_control"] = round(d2 / d1, 4)
    tokens = pruned["batch_size"] * pruned["seqlen"]
    dense_prefill = (dense[0]["prefill"]["median_s"] + dense[1]["prefill"]["median_s"]) / 2
    out.update(pruned_tokens_per_s=pruned["prefill"]["tokens_per_s"], dense_tokens_per_s=tokens / dense_prefill,
               probe=PROBE_NOTE, interleaved=False, timings={"dense": dense[0], "dense_again": dense[1], "pruned": pruned})
    return out


def _evaluate(model, tokenizer, ev: dict, quiet: bool) -> dict:
    """The metrics part of a record: perplexity per corpus, zero-shot per task, their mean accuracy."""
    from suite import evaluate

    out = {"perplexity": {corpus: evaluate.perplexity(model, tokenizer, corpus, seq_len=ev.get("seqlen", 128),
                                                      max_tokens=ev.get("max_tokens"), quiet=quiet)
                          for corpus in ev.get("perplexity", ["wikitext2", "ptb", "c4"])}}
    tasks = ev.get("tasks") or []
    zs = evaluate.zero_shot(model, tokenizer, tasks, limit=ev.get("limit"),
                            batch_size=ev.get("batch_size", 1), quiet=quiet) if tasks else {}
    out["zero_shot"] = {k: v for k, v in zs.items() if not k.startswith("_")}
    accs = [v["acc"] for v in out["zero_shot"].values() if "acc" in v]
    out["zero_shot_mean"] = sum(accs) / len(accs) if accs else None
    return out


def run_cell(cell: dict) -> dict:
    """One grid cell: load, (prune), (recover), evaluate. Returns the record (the runner adds
    provenance). A recovered cell's record holds the metrics before recovery in `before_recovery`,
    the recovery's settings, steps, tokens and losses in `recovery`, its cost in `phases.recover`."""
    from suite import evaluate
    from suite.data import eval_windows
    from suite.models import load_model, load_tokenizer, model_source

    device, dtype = cell.get("device", "cpu"), getattr(torch, cell.get("dtype", "float32"))
    quiet = cell.get("quiet", True)
    phases = {}
    with measure(device) as phases["load"]:
        model = load_model(cell["model"], dtype=dtype, device=device, offload=cell.get("offload"),
                           device_memory=cell.get("device_memory"))
        tokenizer = load_tokenizer(cell["model"])
    record = {"model": cell["model"], "method": cell["method"], "label": cell.get("label", cell["method"]),
              "seed": cell.get("seed", 0)}
    if (source := model_source(cell["model"])) is not None:  # a .gguf file: which one, by content
        record["model_source"] = source
    ev = cell.get("evaluation", {})
    warnings = [w for w in [evaluate.check_window(model, ev.get("seqlen", 128), "evaluation seqlen")] if w]
    bench = None
    if ev.get("throughput", True):  # dense twice (the dense/dense control), pruned once after (suite/speed.py)
        from suite.speed import speed

        bench = eval_windows(tokenizer, "wikitext2", ev.get("seqlen", 128), max_tokens=8 * ev.get("seqlen", 128))
        dense_speed = [speed(model, bench, **SPEED_PROBE) for _ in range(2)]
    if cell["method"] == "dense":
        n = count_parameters(model)
        record.update(ratio_target=0.0, ratio_of=cell.get("ratio_of", "all"), ratio_achieved=0.0,
                      ratio_achieved_layers=0.0, params={"dense": n, "pruned": n}, options={},
                      calibration=None, phases=phases)
    else:
        calib = dict(cell.get("calibration") or {})
        # where each given value came from (suite/config.py cell_calibration); a cell written before
        # issue 11 has none: its grid values then applied to every method
        calib["origin"] = cell.get("calibration_origin") or {k: "grid" for k, v in calib.items() if v is not None}
        options = dict(cell.get("options") or {})
        common = {k: options.pop(k) for k in ("head_mode", "scope", "layers", "allow_empty", "round_to", "depth_rule")
                  if k in options}
        outcome = prune(model, tokenizer, cell["method"], cell["ratio"], seed=cell.get("seed", 0),
                        options=options, calib=calib, device=device, hidden_on=cell.get("hidden_on"),
                        ratio_of=cell.get("ratio_of", "all"), **common)
        record.update(outcome_record(outcome, cell["ratio"]))
        warnings = record.pop("warnings", []) + warnings
        record["phases"] = {**phases, **outcome.phases}
    recovery = cell.get("recovery")
    if recovery:  # evaluate the pruned model, recover it (LoRA, merged), evaluate again
        with measure(device) as record["phases"]["evaluate_before_recovery"]:
            record["before_recovery"] = _evaluate(model, tokenizer, ev, quiet)
        from suite.recovery import recover

        with measure(device) as record["phases"]["recover"]:
            outcome = recover(model, tokenizer, recovery, seed=cell.get("seed", 0),
                              calibration=record.get("calibration"), device=device, quiet=quiet)
        model, record["recovery"] = outcome.model, outcome.info
    with measure(device) as record["phases"]["evaluate"]:
        record.update(_evaluate(model, tokenizer, ev, quiet))
    if bench is not None:
        record["throughput"] = speed_record(dense_speed, speed(model, bench, **SPEED_PROBE))
    if warnings:
        record["warnings"] = warnings
    record["torch_threads"] = torch.get_num_threads()  # the runner moves it into the provenance
    return record
