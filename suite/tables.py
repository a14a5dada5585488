"""Results tables for a paper: records -> one row per (model, method label, ratio) -> Markdown, LaTeX or CSV.

Quality and cost are separate tables: `format_table` gives the quality table (perplexity, zero-shot
accuracy, their Average), `format_costs` (`suite table --costs`) every phase's memory and time.

Rows: grouped by model (first-seen order), then by ratio; the dense row once, on top of its model;
inside a ratio, methods in the registry's order (`suite.methods.method_order`; unknown methods after,
in first-seen order). A cell recovered by LoRA gives two rows, "label w/o tune" and "label w/ tune"
(`split_recovered`); a cell that only failed stays as "label (failed)" with its error under the table.
When a cell is in the file more than once (a rerun), its last `ok` record wins.

Columns: Ratio (the target) and Achieved (the measured fraction removed), both in the records'
convention (`ratio_of`: of all parameters, or of the decoder layers'; named in the caption); Params;
perplexity per corpus (lower is better); lm-eval's `acc` x 100 per task; Average (mean of the
tasks, only for a row that has all); Seeds (where a cell has several).

One uncertainty convention, stated in the caption: "±" is the sample standard deviation over seeds
where a cell has >= 2 seeds (every column, Average included: the std of the seeds' Averages), and
otherwise the standard error of the task (lm-eval's `acc_stderr` x 100; Average: sqrt(Σ se²) / n_tasks,
the tasks taken as independent; shown when an evaluation capped its questions or `stderr="on"`). A
single-seed perplexity has no uncertainty here.

Bold: the best of each (model, ratio) group of at least two rows, only when it leads the next best
by more than Z_BOLD x the standard error of the difference, sqrt(u_best² + u_next²), where u is the
uncertainty of each row's value as an estimate (seeds: std / sqrt(n); one seed: the task's standard
error): a two-sided 5 % z-test. Perplexity included; only where neither row has any uncertainty (single
seeds) is the best value bold on its value alone, and the caption says so.

Views: `relative=True` ("% of dense") shows every metric as a percentage of its model's dense row
(uncertainties scaled alike). `published=True` adds, under each reproduced row whose method, model,
ratio (and what it counts) and tuning match an entry of suite/published.yaml, a row "label (published)"
with the published values and the reproduction's difference from each in percent; the caption lists
the protocol differences that remain (window length, tokens, calibration).

LaTeX: booktabs rules (pandas' `Styler.to_latex`), a `table*` spanning both columns when the table
has more than `NARROW_COLUMNS` columns (else `table`), with caption and label (`bare=True`: the
`tabular` alone, caption as comments). Markdown is tabulate's `github` format. CSV holds the raw
numbers (no rounding, no bold) plus `Error`, `Seeds`, and per metric `<column> std` and `<column> se`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tabulate import tabulate

from suite.methods import method_order, zeroth_order
from suite.records import TUNE, latest
from suite.records import cell_identity as _identity

ZEROTH_ORDER_MARK = "†"  # after a zeroth-order method's label (suite/methods.py `Method.zeroth_order`)
PERPLEXITY = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
TASKS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
MISSING = "–"
STD = " std"  # suffix of a metric's seed standard-deviation column
SE = " se"  # suffix of a metric's standard-error column (x 100 for accuracies)
PUBLISHED = " (published)"  # suffix of a published row's label
NARROW_COLUMNS = 8  # more columns than this: a LaTeX table* (both text columns)
Z_BOLD = 1.96  # two-sided 5 % z-test of best minus next best
RATIO_WORDS = {"all": "all parameters (embeddings and output head included)",
               "layers": "the decoder layers' parameters"}


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


def ratio_of(record: dict) -> str:
    """What the record's ratio counts: "all" (the default, and every record before the key existed) or "layers"."""
    return record.get("ratio_of") or "all"


def _seed_values(record: dict, corpora: list[str], tasks: list[str]) -> dict:
    """One record's numbers under the table's column names (None: the record has no value)."""
    model, label, ratio, seed = _identity(record)
    ok = record.get("status", "ok") == "ok"
    get = (lambda value: value) if ok else (lambda value: None)  # a failed seed counts in no statistic
    achieved = record.get("ratio_achieved_layers") if ratio_of(record) == "layers" else record.get("ratio_achieved")
    row = {"Model": model, "Method": label, "_method": record.get("method", label), "Ratio": ratio,
           "_ratio_of": ratio_of(record), "_ok": ok, "_error": None if ok else f"seed {seed}: {record.get('error', 'failed')}",
           "Achieved": get(achieved), "Params": get((record.get("params") or {}).get("pruned"))}
    row |= {PERPLEXITY.get(c, c): get((record.get("perplexity") or {}).get(c)) for c in corpora}
    accs = {TASKS.get(t, t): get(_acc(record, t)) for t in tasks}
    row |= accs
    row["Average"] = (sum(accs.values()) / len(accs) if accs and None not in accs.values() else None)
    row |= {TASKS.get(t, t) + SE: get(_acc(record, t, "acc_stderr")) for t in tasks}
    return row


def results_frame(records: list[dict]) -> pd.DataFrame:
    """The table as numbers: one row per (model, label, ratio), seeds averaged, in display order.

    Per cell (pandas `groupby().agg` over its ok seeds): the mean of each value (a seed without it
    is skipped; a NaN in a record makes the mean NaN), the sample std (n − 1; NaN below two seeds)
    of each perplexity, accuracy and Average (`<column> std`: the Average's is the std of the seeds'
    Averages), the standard error of the accuracies' and Average's mean (`_mean_se`, `<column> se`),
    `Seeds` (ok seeds), `Error` (the failed seeds' errors) and `_failed`.
    """
    records = split_recovered(latest(records))
    if not records:
        return pd.DataFrame()
    corpora, tasks = _columns(records)
    seeds = pd.DataFrame([_seed_values(r, corpora, tasks) for r in records], dtype=object)  # None stays None
    cells = {key: i for i, key in enumerate(dict.fromkeys(_identity(r)[:3] for r in records))}
    seeds["_cell"] = [cells[_identity(r)[:3]] for r in records]  # first-seen order
    ppl, accs = [PERPLEXITY.get(c, c) for c in corpora], [TASKS.get(t, t) for t in tasks]
    metrics = [*ppl, *accs, *(["Average"] if accs else [])]
    values = ["Achieved", "Params", *metrics]
    numbers = seeds[values + [a + SE for a in accs]].astype(float)  # None -> NaN, skipped by the statistics
    nan_in_record = seeds[values].apply(lambda column: column.map(lambda v: v is not None and math.isnan(v)))
    nan_in_record = nan_in_record.groupby(seeds["_cell"]).any()
    by_cell = numbers.groupby(seeds["_cell"])
    first = lambda s: s.iloc[0]
    frame = seeds.groupby("_cell").agg(
        Model=("Model", first), Method=("Method", first), _method=("_method", first),
        Ratio=("Ratio", lambda s: float(s.iloc[0])), _ratio_of=("_ratio_of", first),
        Error=("_error", lambda errors: "; ".join(errors.dropna())), Seeds=("_ok", lambda ok: int(ok.sum())))
    frame = frame.join(by_cell[values].mean().mask(nan_in_record))
    spread = by_cell[metrics].std().mask(nan_in_record[metrics]).add_suffix(STD)
    errors = numbers[[a + SE for a in accs]][seeds["_ok"]].groupby(seeds["_cell"]).agg(_mean_se)
    errors = errors.reindex(frame.index)  # a cell with no ok seed: NaN
    if accs:
        errors["Average" + SE] = (np.sqrt((errors ** 2).sum(axis=1, skipna=False)) / len(accs)).where(
            frame["Average"].notna())
    frame = frame.join(spread).join(errors)
    frame["_failed"] = frame["Seeds"] == 0
    frame = frame[["Model", "Method", "_method", "Ratio", "_ratio_of", "Achieved", "Params", *metrics, "Error",
                   "Seeds", *spread.columns, *errors.columns, "_failed"]].reset_index(drop=True)
    models = _grid_order(frame["Model"], records, lambda r: r.get("model"))
    labels = _grid_order(frame["Method"], records, lambda r: _identity(r)[1])
    order = method_order()
    rank = lambda m: order.index(m) if m in order else len(order)
    frame["_order"] = [(models[model], ratio, rank(method), labels[label]) for model, ratio, method, label
                       in zip(frame["Model"], frame["Ratio"], frame["_method"], frame["Method"])]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame["_published"] = False
    frame.attrs["lower_is_better"] = ppl
    frame.attrs["metrics"] = metrics
    return frame


def relative_to_dense(frame: pd.DataFrame) -> pd.DataFrame:
    """The "% of dense" view: every metric (and its std and se) as 100 x value / its model's dense
    value (the dense row: 100); a published row relative to the published dense row. A model
    without a dense row keeps NaN."""
    out = frame.copy()
    keys = list(zip(frame["Model"], frame["_published"]))
    dense = {key: i for i, key in reversed(list(enumerate(keys))) if frame["_method"].iloc[i] == "dense"}
    for column in frame.attrs["metrics"]:
        base = pd.Series([frame[column].iloc[dense[k]] if k in dense else math.nan for k in keys], index=frame.index)
        for name in (column, column + STD, column + SE):
            if name in out:
                out[name] = 100 * frame[name] / base
    return out


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


# --------------------------------------------------------------------------- uncertainty and bold
def uncertainty(frame: pd.DataFrame, column: str, show_se: bool) -> pd.Series:
    """The "±" shown with each value of `column`: the seeds' sample std where a cell has >= 2 seeds,
    else (show_se) the task's standard error; NaN where there is none."""
    std = frame.get(column + STD, pd.Series(math.nan, index=frame.index))
    se = frame.get(column + SE, pd.Series(math.nan, index=frame.index))
    several = frame["Seeds"] >= 2
    return std.where(several, se if show_se else math.nan)


def estimate_error(frame: pd.DataFrame, column: str) -> pd.Series:
    """The standard error of each row's value as an estimate, for the bold test: std / sqrt(seeds)
    with >= 2 seeds, else the task's standard error (NaN: none, e.g. a single-seed perplexity)."""
    std = frame.get(column + STD, pd.Series(math.nan, index=frame.index))
    se = frame.get(column + SE, pd.Series(math.nan, index=frame.index))
    several = frame["Seeds"] >= 2
    return (std / np.sqrt(frame["Seeds"].clip(lower=1))).where(several, se)


def _best(values: dict, lower_better: bool, errors: dict) -> list:
    """Row indices to bold. Without any uncertainty on the best two (single-seed perplexity): every
    value equal to the best. Otherwise only a unique best ahead of the next best by more than
    Z_BOLD standard errors of the difference (a missing error counts as 0)."""
    order = sorted(values, key=values.get, reverse=not lower_better)
    best = [i for i in order if values[i] == values[order[0]]]
    if len(order) < 2:
        return best
    pair = [errors.get(i, math.nan) for i in order[:2]]
    if all(math.isnan(e) for e in pair):
        return best
    if len(best) > 1:
        return []
    spread = math.hypot(*(0.0 if math.isnan(e) else e for e in pair))
    return best if abs(values[order[0]] - values[order[1]]) > Z_BOLD * spread else []


# --------------------------------------------------------------------------- text cells
def _params(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _ratio_text(frame: pd.DataFrame, column: str) -> list[str]:
    mixed = frame["_ratio_of"].nunique() > 1  # rows of both conventions: the layers' marked
    mark = lambda of: " L" if mixed and of == "layers" else ""
    digits = "{:.0f}" if column == "Ratio" else "{:.1f}"
    return [MISSING if math.isnan(v) else digits.format(v * 100) + "%" + mark(of)
            for v, of in zip(frame[column], frame["_ratio_of"])]


def _cells(frame: pd.DataFrame, show_se: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The text of every cell, and a same-shaped mask of the values to bold."""
    metrics = frame.attrs["metrics"]
    lower_better = frame.attrs["lower_is_better"]
    texts = pd.DataFrame(index=frame.index)
    texts["Model"] = frame["Model"]
    marked = zeroth_order()
    texts["Method"] = [m + (ZEROTH_ORDER_MARK if k in marked else "") + (" (failed)" if f else "")
                       for m, k, f in zip(frame["Method"], frame["_method"], frame["_failed"])]
    texts["Ratio"] = _ratio_text(frame, "Ratio")
    texts["Achieved"] = _ratio_text(frame, "Achieved")
    texts["Params"] = [MISSING if math.isnan(p) else _params(p) for p in frame["Params"]]
    bold = pd.DataFrame(False, index=frame.index, columns=[*texts.columns, *metrics])
    reproduced = frame[~frame["_published"]]
    for column in metrics:
        shown = uncertainty(frame, column, show_se)
        texts[column] = [MISSING if math.isnan(v) else f"{v:.2f}" + ("" if math.isnan(u) else f" ± {u:.2f}")
                         for v, u in zip(frame[column], shown)]
        if "_difference" in frame:  # a published row: the reproduction's difference from it
            texts[column] = [t if not p or math.isnan(d.get(column, math.nan)) else f"{t} ({d[column]:+.1f}%)"
                             for t, p, d in zip(texts[column], frame["_published"], frame["_difference"])]
        errors = estimate_error(frame, column)
        for _, group in reproduced.groupby(["Model", "Ratio", "_ratio_of"], sort=False):
            values = {i: round(v, 2) for i, v in group[column].items() if not math.isnan(v) and not math.isinf(v)}
            if len(group) < 2 or not values:
                continue
            for i in _best(values, column in lower_better, errors.to_dict()):
                bold.loc[i, column] = True
    if (frame["Seeds"] >= 2).any():
        texts["Seeds"] = ["" if p else str(n) for n, p in zip(frame["Seeds"], frame["_published"])]
        bold["Seeds"] = False
    return texts, bold[texts.columns]


def show_stderr(records: list[dict], stderr: str = "auto") -> bool:
    """"on" / "off", or "auto": on when any record's evaluation capped the questions (`limit`)."""
    if stderr not in ("auto", "on", "off"):
        raise ValueError(f"stderr must be auto, on or off, got {stderr!r}")
    if stderr != "auto":
        return stderr == "on"
    return any(((r.get("cell") or {}).get("evaluation") or {}).get("limit") for r in records)


def _evaluations(records: list[dict]) -> list[dict]:
    evals = [(r.get("cell") or {}).get("evaluation") for r in latest(records) if r.get("status", "ok") == "ok"]
    return [e for e in evals if e]


def caption(records: list[dict], show_se: bool, frame: pd.DataFrame | None = None, relative: bool = False) -> str:
    """One sentence per convention: what the ratio counts, the evaluation caps, ±, bold, the view,
    and (published rows) the protocol differences that remain."""
    frame = results_frame(records) if frame is None else frame
    evals = _evaluations(records)
    values = lambda key: sorted({e.get(key) for e in evals}, key=lambda v: (v is None, v or 0))
    count = lambda v, unit: f"all {unit}" if v is None else f"the first {v:,} {unit}"
    conventions = sorted(set(frame["_ratio_of"])) if len(frame) else ["all"]
    if len(conventions) == 1:
        parts = [f"Ratio: the fraction of {RATIO_WORDS[conventions[0]]} removed (target); Achieved: measured."]
    else:
        parts = [f"Ratio: the fraction of {RATIO_WORDS['all']} removed, or with L of {RATIO_WORDS['layers']} "
                 "(target); Achieved: measured, same convention."]
    if evals:
        windows = "/".join(str(v) for v in values("seqlen"))
        tokens = " or ".join(count(v, "tokens") for v in values("max_tokens"))
        parts.append(f"Perplexity on {windows}-token windows, {tokens} of each corpus (lower is better).")
        if any(e.get("tasks") for e in evals):
            questions = " or ".join("all" if v is None else f"the first {v:,}" for v in values("limit"))
            parts.append(f"Zero-shot: lm-eval acc x 100 on {questions} questions of each task.")
    else:
        parts.append("Evaluation caps not recorded.")
    if any(r.get("method") in zeroth_order() for r in records):
        parts.append(f"{ZEROTH_ORDER_MARK}: zeroth-order (the loss's response to pruning estimated from forward "
                     "passes alone, no backward).")
    if relative:
        parts.append("Every metric in % of its model's dense row.")
    several = bool(len(frame)) and (frame["Seeds"] >= 2).any()
    if several and show_se:
        parts.append("±: the sample standard deviation over seeds where a cell has 2 or more (Seeds), otherwise "
                     "the task's standard error (Average: sqrt(sum se^2) / tasks); a single-seed perplexity has none.")
    elif several:
        parts.append("±: the sample standard deviation over seeds (Seeds); single-seed cells show none.")
    elif show_se:
        parts.append("±: the task's standard error (Average: sqrt(sum se^2) / tasks); perplexity has none.")
    parts.append(f"Bold: best of its model and ratio, only if ahead of the next best by more than {Z_BOLD} x the "
                 "standard error of the difference (seeds: std / sqrt(n); one seed: the task's standard error)"
                 + ("; a single-seed perplexity: the lowest." if frame.attrs.get("lower_is_better") else "."))
    if len(frame) and frame["_published"].any():
        parts.append("(published): the source's value, in parentheses the reproduction's difference from it "
                     "(reproduced / published - 1, %).")
        parts += frame.attrs.get("protocol_notes", [])
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
    return out.replace("±", "$\\pm$").replace(ZEROTH_ORDER_MARK, "$^\\dagger$")


def display_frame(records: list[dict], relative: bool = False, published: bool = False) -> pd.DataFrame:
    """`results_frame`, in the "% of dense" view (`relative`), with published rows (`published`)."""
    frame = results_frame(records)
    if frame.empty:
        return frame
    if published:
        from suite.published import add_published

        frame = add_published(frame, records)
    if relative:
        frame = relative_to_dense(frame)
    return frame


def to_markdown(records: list[dict], stderr: str = "auto", relative: bool = False, published: bool = False) -> str:
    frame = display_frame(records, relative, published)
    if frame.empty:
        return "(no results)\n"
    show_se = show_stderr(records, stderr)
    texts, bold = _cells(frame, show_se)
    texts = texts.mask(bold, "**" + texts.astype(str) + "**")
    align = ["left", "left"] + ["right"] * (len(texts.columns) - 2)
    table = tabulate(texts.values.tolist(), list(texts.columns), tablefmt="github", disable_numparse=True,
                     colalign=align)
    notes = _notes(frame, records)
    return (table + "\n\n" + caption(records, show_se, frame, relative) + "\n"
            + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))


def _label(records: list[dict]) -> str:
    names = {((r.get("cell") or {}).get("grid") or {}).get("name") for r in records} - {None}
    return "tab:" + (names.pop() if len(names) == 1 else "results")


def to_latex(records: list[dict], stderr: str = "auto", bare: bool = False, relative: bool = False,
             published: bool = False) -> str:
    """A booktabs `table` (`table*` above NARROW_COLUMNS columns) with caption and label (`bare`:
    the `tabular` alone, caption as comments).

    The `tabular` is pandas' `Styler.to_latex` (booktabs rules, bold values `\\textbf` by the
    `textbf: --rwrap` style, cells escaped by `_latex_escape`), with a `\\midrule` between
    (model, ratio) groups; the environment (with `\\small`) is written around it here."""
    frame = display_frame(records, relative, published)
    if frame.empty:
        return "% (no results)\n"
    show_se = show_stderr(records, stderr)
    texts, bold = _cells(frame, show_se)
    styler = (texts.style.hide(axis="index").format(_latex_escape).format_index(_latex_escape, axis=1)
              .apply(lambda _: np.where(bold, "textbf: --rwrap;", ""), axis=None))
    lines = styler.to_latex(column_format="ll" + "r" * (len(texts.columns) - 2), hrules=True).splitlines()
    first_row = lines.index("\\midrule") + 1  # after the header
    groups = list(zip(frame["Model"], frame["Ratio"], frame["_ratio_of"]))
    for i in reversed(range(1, len(groups))):
        if groups[i] != groups[i - 1]:
            lines.insert(first_row + i, "\\midrule")
    text = _latex_escape(caption(records, show_se, frame, relative))
    if bare:
        lines += [f"% {text}"]
    else:
        env = "table*" if len(texts.columns) > NARROW_COLUMNS else "table"
        lines = ([f"\\begin{{{env}}}[t]", "\\centering", "\\small", f"\\caption{{{text}}}",
                  f"\\label{{{_label(records)}}}"] + lines + [f"\\end{{{env}}}"])
    lines += [f"% {n}" for n in _notes(frame, records)]
    return "\n".join(lines) + "\n"


def to_csv(records: list[dict], relative: bool = False, published: bool = False) -> str:
    frame = display_frame(records, relative, published)
    if not frame.empty:
        frame.insert(frame.columns.get_loc("Ratio") + 1, "Ratio of", frame["_ratio_of"])
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")]).round(6).to_csv(index=False)


def format_table(records: list[dict], fmt: str = "md", stderr: str = "auto", bare: bool = False,
                 costs: bool = False, relative: bool = False, published: bool = False) -> str:
    if costs:
        return format_costs(records, fmt)
    if fmt == "csv":
        return to_csv(records, relative, published)
    if fmt == "latex":
        return to_latex(records, stderr=stderr, bare=bare, relative=relative, published=published)
    return to_markdown(records, stderr=stderr, relative=relative, published=published)


# --------------------------------------------------------------------------- costs (`suite table --costs`)
PHASES = ("load", "calibrate", "score", "prune", "recover", "evaluate")
SPEED = {"Prefill x": "prefill_speedup", "Prefill ctl": "prefill_dense_control",
         "Decode x": "decode_speedup", "Decode ctl": "decode_dense_control",
         "Dense tok/s": "dense_tokens_per_s", "Pruned tok/s": "pruned_tokens_per_s"}


def costs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (model, label, ratio), seeds averaged, in the results table's order: every phase's
    peak memory (MB, of the device the cell ran on: `peak_source` says which) and time (s), what
    scoring adds above the loaded model (`score added MB`), then the
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
            if phase == "score":  # what scoring adds above the loaded model (suite/measure.py peak_delta_mb)
                out["score added MB"] = _mean([get(r, "peak_delta_mb") for r in members])
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
