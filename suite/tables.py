"""Results table: records -> one row per (model, method label, ratio) -> Markdown, LaTeX or CSV.

Conventions (the paper's Table 1 layout):
  - rows grouped by model (first-seen order), then by ratio; the dense row once, on top of its
    model; inside a ratio, methods in METHOD_ORDER (unknown methods after, in first-seen order);
  - perplexity: 2 decimals, lower is better; zero-shot: lm-eval's `acc` (not `acc_norm`) x 100,
    2 decimals; Average: mean of the shown tasks, only for a row that has all of them;
  - several seeds of one cell are averaged, and then each perplexity and task cell reads
    "mean ± s" (s: the sample standard deviation over the seeds; the Average column stays a mean);
    a single seed shows the value alone. When a cell is in the file more than once (a rerun), its
    last `ok` record wins over older ones and over errors;
  - accuracies carry lm-eval's standard error (`acc_stderr`, x 100; a several-seed cell: the
    error of the seeds' mean, sqrt(sum se_i^2) / n; Average: sqrt(sum se_t^2) / n_tasks over its
    tasks, the tasks taken as independent). `stderr="auto"` (the default) shows it as "acc ± se"
    when any record's evaluation had a question `limit`; "on"/"off" force it. A several-seed cell
    shows the seeds' spread instead (above);
  - best value of each (model, ratio) group with at least two rows in bold: `**x**` / `\\textbf{x}`;
    an accuracy (or Average) only when it is significantly ahead of the next best: lead >
    1.96 * sqrt(se_best^2 + se_next^2) (a two-sided 5 % z-test of the difference of two independent
    estimates; stricter than "outside the best's standard error", deliberately: with a 50-question
    limit one question is 2 points and each error ~7, so noise is never "best"). Without a
    recorded error (older records) every value equal to the best is bold. Perplexity has no error
    here and is bolded as before;
  - a caption line states the evaluation caps read from the records (`cell.evaluation`: window
    length, token cap, questions per task) and these conventions; LaTeX comes as a `table`
    environment with \\caption and \\label (`bare=True`: the `tabular` alone, caption as comments);
  - a cell recovered by LoRA (`recovery:` in the config) gives two rows, as the papers: "label
    w/o tune" (the pruned model) and "label w/ tune" (after recovery), see `split_recovered`;
  - a cell that only failed stays in the table as a row "label (failed)" with empty metrics, and
    its error is listed under the table (Markdown) or as `%` comments after it (LaTeX).
CSV holds the raw numbers (no rounding, no bold) plus `Error`, `Seeds` (the ok seeds averaged) and,
per perplexity and task column, `<column> std` (empty for a single seed).
The seed statistics are pandas' `groupby().agg`; the LaTeX `tabular` is pandas' `Styler.to_latex`
with booktabs rules; Markdown is tabulate's `github` format.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tabulate import tabulate

METHOD_ORDER = ["dense", "magnitude", "random", "wanda-sp", "flap", "llm-pruner", "minillm", "bonsai"]
FORWARD_MARK = "†"  # after a forward-only method's label (suite/methods.py FORWARD_ONLY)
PERPLEXITY = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
TASKS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
# Score mem: the process's peak while scoring (model, libraries and method); Score added: its rise
# over the phase's start, what the method itself needs above the loaded model (suite/measure.py)
COSTS = {"Score mem (MB)": ("peak_mb", "{:.1f}"), "Score added (MB)": ("peak_delta_mb", "{:.1f}"),
         "Score time (s)": ("seconds", "{:.2f}")}
MISSING = "–"
STD = " std"  # suffix of a metric's seed standard-deviation column
SE = " se"  # suffix of an accuracy's standard-error column (x 100)
TUNE = (" w/o tune", " w/ tune")  # row suffixes of a recovered cell (split_recovered)


def _identity(record: dict) -> tuple:
    ratio = record.get("ratio_target", record.get("ratio", 0.0)) or 0.0
    return record.get("model"), record.get("label") or record.get("method"), float(ratio), record.get("seed", 0)


def latest(records: list[dict]) -> list[dict]:
    """One record per cell (model, label, ratio, seed): the last ok one, else the last error."""
    chosen = {}
    for record in records:
        key = _identity(record)
        if key not in chosen or record.get("status", "ok") == "ok" or chosen[key].get("status", "ok") != "ok":
            chosen[key] = record
    return [chosen[key] for key in dict.fromkeys(_identity(r) for r in records)]


def split_recovered(records: list[dict]) -> list[dict]:
    """The papers' "w/o tune" / "w/ tune" rows: a recovered record (LoRA, suite/recovery.py) becomes
    two, "label w/o tune" with its `before_recovery` metrics and "label w/ tune" with its own; a
    failed recovered cell is its "w/ tune" row. Other records pass unchanged."""
    out = []
    for record in records:
        label = record.get("label") or record.get("method")
        if record.get("before_recovery") and record.get("status", "ok") == "ok":
            before = {k: v for k, v in record.items() if k not in ("recovery", "before_recovery")}
            out += [{**before, **record["before_recovery"], "label": label + TUNE[0]},
                    {**record, "label": label + TUNE[1]}]
        elif (record.get("cell") or {}).get("recovery"):
            out.append({**record, "label": label + TUNE[1]})
        else:
            out.append(record)
    return out


def _columns(records: list[dict]) -> tuple[list[str], list[str]]:
    """Perplexity corpora and tasks that have a value in at least one record, in the paper's order."""
    corpora = {c for r in records for c, v in (r.get("perplexity") or {}).items() if v is not None}
    tasks = {t for r in records for t, v in (r.get("zero_shot") or {}).items() if "acc" in v}
    order = lambda known, seen: [k for k in known if k in seen] + sorted(seen - set(known))
    return order(PERPLEXITY, corpora), order(TASKS, tasks)


def _grid_order(names, records: list[dict], name_of) -> dict:
    """{name: sort key}: first by the smallest `cell_index` (the cell's place in its config's grid,
    recorded by `suite run`, so concurrent cells finishing out of order change nothing), then by
    order of appearance."""
    first = {}
    for record in records:
        if record.get("cell_index") is not None:
            name = name_of(record)
            first[name] = min(first.get(name, math.inf), record["cell_index"])
    return {name: (first.get(name, math.inf), i) for i, name in enumerate(dict.fromkeys(names))}


def _seed_values(record: dict, corpora: list[str], tasks: list[str]) -> dict:
    """One record's numbers under the table's column names (None: the record has no value)."""
    model, label, ratio, seed = _identity(record)
    ok = record.get("status", "ok") == "ok"
    get = (lambda value: value) if ok else (lambda value: None)  # a failed seed counts in no statistic
    row = {"Model": model, "Method": label, "_method": record.get("method", label), "Ratio": ratio, "_ok": ok,
           "_error": None if ok else f"seed {seed}: {record.get('error', 'failed')}",
           "Params": get((record.get("params") or {}).get("pruned"))}
    row |= {PERPLEXITY.get(c, c): get((record.get("perplexity") or {}).get(c)) for c in corpora}
    row |= {TASKS.get(t, t): get(_acc(record, t)) for t in tasks}
    row |= {TASKS.get(t, t) + SE: get(_acc(record, t, "acc_stderr")) for t in tasks}
    row |= {column: get(((record.get("phases") or {}).get("score") or {}).get(key)) for column, (key, _) in COSTS.items()}
    return row


def results_frame(records: list[dict]) -> pd.DataFrame:
    """The table as numbers: one row per (model, label, ratio), seeds averaged, in display order.

    Per cell (pandas `groupby().agg` over its ok seeds): the mean of each value (a seed without it
    is skipped; a NaN in a record makes the mean NaN), the sample std (n − 1; NaN below two seeds)
    of each perplexity and accuracy (`<column> std`), the standard error of the accuracies' mean
    (`_mean_se`, `<column> se`), `Seeds` (ok seeds), `Error` (the failed seeds' errors) and `_failed`.
    """
    records = split_recovered(latest(records))
    if not records:
        return pd.DataFrame()
    corpora, tasks = _columns(records)
    seeds = pd.DataFrame([_seed_values(r, corpora, tasks) for r in records], dtype=object)  # None stays None
    cells = {key: i for i, key in enumerate(dict.fromkeys(_identity(r)[:3] for r in records))}
    seeds["_cell"] = [cells[_identity(r)[:3]] for r in records]  # first-seen order
    ppl, accs = [PERPLEXITY.get(c, c) for c in corpora], [TASKS.get(t, t) for t in tasks]
    values = ["Params", *ppl, *accs, *COSTS]
    numbers = seeds[values + [a + SE for a in accs]].astype(float)  # None -> NaN, skipped by the statistics
    nan_in_record = seeds[values].apply(lambda column: column.map(lambda v: v is not None and math.isnan(v)))
    nan_in_record = nan_in_record.groupby(seeds["_cell"]).any()
    by_cell = numbers.groupby(seeds["_cell"])
    frame = seeds.groupby("_cell").agg(
        Model=("Model", lambda s: s.iloc[0]), Method=("Method", lambda s: s.iloc[0]),
        _method=("_method", lambda s: s.iloc[0]), Ratio=("Ratio", lambda s: float(s.iloc[0])),
        Error=("_error", lambda errors: "; ".join(errors.dropna())), Seeds=("_ok", lambda ok: int(ok.sum())))
    frame = frame.join(by_cell[values].mean().mask(nan_in_record))
    spread = by_cell[ppl + accs].std().mask(nan_in_record[ppl + accs]).add_suffix(STD)
    errors = numbers[[a + SE for a in accs]][seeds["_ok"]].groupby(seeds["_cell"]).agg(_mean_se)
    errors = errors.reindex(frame.index)  # a cell with no ok seed: NaN
    frame["Average"] = frame[accs].mean(axis=1, skipna=False) if accs else math.nan
    errors["Average" + SE] = (np.sqrt((errors ** 2).sum(axis=1, skipna=False)) / len(accs)).where(
        frame["Average"].notna()) if accs else math.nan
    frame = frame.join(spread).join(errors)
    frame["_failed"] = frame["Seeds"] == 0
    frame = frame[["Model", "Method", "_method", "Ratio", "Params", *ppl, *accs, "Average", *COSTS, "Error", "Seeds",
                   *spread.columns, *errors.columns, "_failed"]].reset_index(drop=True)
    models = _grid_order(frame["Model"], records, lambda r: r.get("model"))
    labels = _grid_order(frame["Method"], records, lambda r: _identity(r)[1])
    rank = lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    frame["_order"] = [(models[model], ratio, rank(method), labels[label]) for model, ratio, method, label
                       in zip(frame["Model"], frame["Ratio"], frame["_method"], frame["Method"])]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame.attrs["lower_is_better"] = ppl
    return frame


def _acc(record: dict, task: str, metric: str = "acc"):
    value = (record.get("zero_shot") or {}).get(task) or {}
    return value[metric] * 100 if value.get(metric) is not None else None


def _mean_se(errors: pd.Series) -> float:
    """Standard error of the mean of independent estimates with errors `errors`: sqrt(Σ se²) / n
    (NaN if any is missing or there is none)."""
    if errors.empty or errors.isna().any():
        return math.nan
    return math.sqrt((errors ** 2).sum()) / len(errors)


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------- text cells
def _params(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _cells(frame: pd.DataFrame, show_se: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The text of every cell, and a same-shaped mask of the best value of each (model, ratio) group."""
    metrics = [c for c in frame.columns if c not in ("Model", "Method", "Ratio", "Params", "Error", "Seeds")
               and not c.startswith("_") and not c.endswith((STD, SE))]
    lower_better = frame.attrs["lower_is_better"]
    texts = pd.DataFrame(index=frame.index)
    texts["Model"] = frame["Model"]
    from suite.methods import FORWARD_ONLY

    texts["Method"] = [m + (FORWARD_MARK if k in FORWARD_ONLY else "") + (" (failed)" if f else "")
                       for m, k, f in zip(frame["Method"], frame["_method"], frame["_failed"])]
    texts["Ratio"] = [f"{r * 100:.0f}%" for r in frame["Ratio"]]
    texts["Params"] = [MISSING if math.isnan(p) else _params(p) for p in frame["Params"]]
    bold = pd.DataFrame(False, index=frame.index, columns=["Model", "Method", "Ratio", "Params", *metrics])
    for column in metrics:
        fmt = COSTS[column][1] if column in COSTS else "{:.2f}"
        texts[column] = [MISSING if math.isnan(v) else fmt.format(v) for v in frame[column]]
        if column + STD in frame:  # several seeds: mean ± s
            texts[column] = [t if math.isnan(sd) else f"{t} ± {sd:.2f}"
                             for t, sd in zip(texts[column], frame[column + STD])]
        if show_se and column + SE in frame:  # one seed: acc ± its standard error
            texts[column] = [t if math.isnan(se) or "±" in t else f"{t} ± {se:.1f}"
                             for t, se in zip(texts[column], frame[column + SE])]
        if column in COSTS:
            continue  # costs are reported, not ranked
        for _, group in frame.groupby(["Model", "Ratio"], sort=False):
            values = {i: round(v, 2) for i, v in group[column].items() if not math.isnan(v) and not math.isinf(v)}
            if len(group) < 2 or not values:
                continue
            for i in _best(values, column in lower_better, frame[column + SE] if column + SE in frame else None):
                bold.loc[i, column] = True
    return texts, bold


Z_BOLD = 1.96  # two-sided 5 % z-test of best minus next best


def _best(values: dict, lower_better: bool, errors) -> list:
    """Row indices to bold: every value equal to the best; where the best has a standard error,
    only a unique best ahead of the next by more than Z_BOLD standard errors of the difference."""
    order = sorted(values, key=values.get, reverse=not lower_better)
    best = [i for i in order if values[i] == values[order[0]]]
    error = math.nan if errors is None else errors[order[0]]
    if math.isnan(error):
        return best
    if len(best) > 1 or len(order) < 2:
        return []
    runner_up = errors[order[1]]
    spread = math.hypot(error, 0.0 if math.isnan(runner_up) else runner_up)
    return best if abs(values[order[0]] - values[order[1]]) > Z_BOLD * spread else []


def show_stderr(records: list[dict], stderr: str = "auto") -> bool:
    """"on" / "off", or "auto": on when any record's evaluation capped the questions (`limit`)."""
    if stderr not in ("auto", "on", "off"):
        raise ValueError(f"stderr must be auto, on or off, got {stderr!r}")
    if stderr != "auto":
        return stderr == "on"
    return any(((r.get("cell") or {}).get("evaluation") or {}).get("limit") for r in records)


def caption(records: list[dict], show_se: bool) -> str:
    """One sentence per convention: the evaluation caps found in the records, ±, bold."""
    evals = [(r.get("cell") or {}).get("evaluation") for r in latest(records) if r.get("status", "ok") == "ok"]
    evals = [e for e in evals if e]
    values = lambda key: sorted({e.get(key) for e in evals}, key=lambda v: (v is None, v or 0))
    count = lambda v, unit: f"all {unit}" if v is None else f"the first {v:,} {unit}"
    parts = []
    if evals:
        windows = "/".join(str(v) for v in values("seqlen"))
        tokens = " or ".join(count(v, "tokens") for v in values("max_tokens"))
        parts.append(f"Perplexity on {windows}-token windows, {tokens} of each corpus (lower is better).")
        if any(e.get("tasks") for e in evals):
            questions = " or ".join("all" if v is None else f"the first {v:,}" for v in values("limit"))
            parts.append(f"Zero-shot: lm-eval acc x 100 on {questions} questions of each task.")
    else:
        parts.append("Evaluation caps not recorded.")
    from suite.methods import FORWARD_ONLY

    if any(r.get("method") in FORWARD_ONLY for r in records):
        parts.append(f"{FORWARD_MARK}: forward-only (the loss's response to pruning from forward passes, no backward).")
    if show_se:
        parts.append("± on an accuracy: its standard error; on a several-seed cell: the seeds' sample std.")
    parts.append("Score mem: the process's peak while scoring, loaded model included; Score added: what "
                 "scoring adds above it.")
    parts.append("Bold: best of its model and ratio; an accuracy only if significantly ahead of the next "
                 f"(lead > {Z_BOLD} x the standard error of the difference).")
    return " ".join(parts)


def _notes(frame: pd.DataFrame, records: list[dict]) -> list[str]:
    notes = [f"Failed: {r.Model} / {r.Method} @ {r.Ratio * 100:.0f}%: {r.Error}"
             for r in frame.itertuples() if r.Error]
    skipped = {(t, v["skipped"]) for r in latest(records) for t, v in (r.get("zero_shot") or {}).items()
               if isinstance(v, dict) and "skipped" in v}
    notes += [f"Skipped: {task}: {reason}" for task, reason in sorted(skipped)]
    return notes


# --------------------------------------------------------------------------- formats
def _latex_escape(text: str) -> str:
    out = text.replace("\\", "\\textbackslash{}")
    for char in "&%$#_{}":
        out = out.replace(char, "\\" + char)
    out = out.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}").replace(MISSING, "--")
    return out.replace("±", "$\\pm$").replace(FORWARD_MARK, "$^\\dagger$")


def to_markdown(records: list[dict], stderr: str = "auto") -> str:
    frame = results_frame(records)
    if frame.empty:
        return "(no results)\n"
    show_se = show_stderr(records, stderr)
    texts, bold = _cells(frame, show_se)
    texts = texts.mask(bold, "**" + texts.astype(str) + "**")
    align = ["left", "left"] + ["right"] * (len(texts.columns) - 2)
    table = tabulate(texts.values.tolist(), list(texts.columns), tablefmt="github", disable_numparse=True,
                     colalign=align)
    notes = _notes(frame, records)
    return (table + "\n\n" + caption(records, show_se) + "\n"
            + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))


def _label(records: list[dict]) -> str:
    names = {((r.get("cell") or {}).get("grid") or {}).get("name") for r in records} - {None}
    return "tab:" + (names.pop() if len(names) == 1 else "results")


def to_latex(records: list[dict], stderr: str = "auto", bare: bool = False) -> str:
    """A booktabs `table` with caption and label (`bare`: the `tabular` alone, caption as comments).

    The `tabular` is pandas' `Styler.to_latex` (booktabs rules, best values `\\textbf` by the
    `textbf: --rwrap` style, cells escaped by `_latex_escape`), with a `\\midrule` between
    (model, ratio) groups; the `table` environment (with `\\small`) is written around it here."""
    frame = results_frame(records)
    if frame.empty:
        return "% (no results)\n"
    show_se = show_stderr(records, stderr)
    texts, bold = _cells(frame, show_se)
    styler = (texts.style.hide(axis="index").format(_latex_escape).format_index(_latex_escape, axis=1)
              .apply(lambda _: np.where(bold, "textbf: --rwrap;", ""), axis=None))
    lines = styler.to_latex(column_format="ll" + "r" * (len(texts.columns) - 2), hrules=True).splitlines()
    first_row = lines.index("\\midrule") + 1  # after the header
    groups = list(zip(frame["Model"], frame["Ratio"]))
    for i in reversed(range(1, len(groups))):
        if groups[i] != groups[i - 1]:
            lines.insert(first_row + i, "\\midrule")
    text = _latex_escape(caption(records, show_se))
    if bare:
        lines += [f"% {text}"]
    else:
        lines = (["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{text}}}",
                  f"\\label{{{_label(records)}}}"] + lines + ["\\end{table}"])
    lines += [f"% {n}" for n in _notes(frame, records)]
    return "\n".join(lines) + "\n"


def to_csv(records: list[dict]) -> str:
    frame = results_frame(records)
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")]).round(6).to_csv(index=False)


def format_table(records: list[dict], fmt: str = "md", stderr: str = "auto", bare: bool = False,
                 costs: bool = False) -> str:
    if costs:
        return format_costs(records, fmt)
    if fmt == "csv":
        return to_csv(records)
    if fmt == "latex":
        return to_latex(records, stderr=stderr, bare=bare)
    return to_markdown(records, stderr=stderr)


# --------------------------------------------------------------------------- costs (`suite table --costs`)
PHASES = ("load", "calibrate", "score", "prune", "recover", "evaluate")
SPEED = {"Prefill x": "prefill_speedup", "Prefill ctl": "prefill_dense_control",
         "Decode x": "decode_speedup", "Decode ctl": "decode_dense_control",
         "Dense tok/s": "dense_tokens_per_s", "Pruned tok/s": "pruned_tokens_per_s"}


def costs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (model, label, ratio), seeds averaged, in the results table's order: every phase's
    peak memory (MB, of the device the cell ran on: `peak_source` says which) and time (s), then the
    record's `throughput`: speed-ups over dense and dense/dense controls (prefill, decode; suite/speed.py)
    and prefill tokens/s. A value a record does not hold is NaN."""
    order = results_frame(records)
    ok = [r for r in split_recovered(latest(records)) if r.get("status", "ok") == "ok"]  # rows as the table's
    rows = []
    for row in order.itertuples():
        members = [r for r in ok if _identity(r)[:3] == (row.Model, row.Method, row.Ratio)]
        out = {"Model": row.Model, "Method": row.Method, "Ratio": row.Ratio, "Device": ", ".join(sorted(
            {str((r.get("cell") or {}).get("device", "cpu")) for r in members})) or MISSING}
        phases = [p for p in PHASES if any(p in (r.get("phases") or {}) for r in ok)]
        for phase in phases:
            get = lambda r, key: ((r.get("phases") or {}).get(phase) or {}).get(key)
            out[f"{phase} MB"] = _mean([get(r, "peak_mb") for r in members])
            out[f"{phase} s"] = _mean([get(r, "seconds") for r in members])
        for column, key in SPEED.items():
            out[column] = _mean([(r.get("throughput") or {}).get(key) for r in members])
        rows.append(out)
    return pd.DataFrame(rows)


def format_costs(records: list[dict], fmt: str = "md") -> str:
    frame = costs_frame(records)
    if frame.empty:
        return "(no results)\n"
    if fmt == "csv":
        return frame.round(6).to_csv(index=False)
    text = frame.copy()
    text["Ratio"] = [f"{r * 100:.0f}%" for r in frame["Ratio"]]
    for column in frame.columns[4:]:
        fmt_value = "{:.3f}" if column in SPEED and "tok/s" not in column else "{:.1f}"
        text[column] = [MISSING if math.isnan(v) else fmt_value.format(v) for v in frame[column]]
    if fmt == "latex":
        return tabulate(text.values.tolist(), list(text.columns), tablefmt="latex_booktabs",
                        disable_numparse=True).replace(MISSING, "--") + "\n"
    return tabulate(text.values.tolist(), list(text.columns), tablefmt="github", disable_numparse=True) + "\n"
