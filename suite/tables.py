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
  - best value of each (model, ratio) group with at least two rows in bold: `**x**` / `\\textbf{x}`;
  - a cell recovered by LoRA (`recovery:` in the config) gives two rows, as the papers: "label
    w/o tune" (the pruned model) and "label w/ tune" (after recovery), see `split_recovered`;
  - a cell that only failed stays in the table as a row "label (failed)" with empty metrics, and
    its error is listed under the table (Markdown) or as `%` comments after it (LaTeX).
CSV holds the raw numbers (no rounding, no bold) plus `Error`, `Seeds` (the ok seeds averaged) and,
per perplexity and task column, `<column> std` (empty for a single seed).
"""
from __future__ import annotations

import math
import statistics

import pandas as pd
from tabulate import tabulate

METHOD_ORDER = ["dense", "magnitude", "random", "wanda-sp", "flap", "llm-pruner", "minillm"]
PERPLEXITY = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
TASKS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
COSTS = {"Score mem (MB)": ("peak_mb", "{:.1f}"), "Score time (s)": ("seconds", "{:.2f}")}
MISSING = "–"
STD = " std"  # suffix of a metric's seed standard-deviation column
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


def results_frame(records: list[dict]) -> pd.DataFrame:
    """The table as numbers: one row per (model, label, ratio), seeds averaged, in display order."""
    records = split_recovered(latest(records))
    corpora, tasks = _columns(records)
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(_identity(record)[:3], []).append(record)
    rows = []
    for (model, label, ratio), members in groups.items():
        ok = [r for r in members if r.get("status", "ok") == "ok"]
        failed = [r for r in members if r not in ok]
        mean = lambda get: _mean([get(r) for r in ok])
        spread = {}
        row = {"Model": model, "Method": label, "_method": members[0].get("method", label), "Ratio": ratio,
               "Params": mean(lambda r: (r.get("params") or {}).get("pruned"))}
        seed_values = {PERPLEXITY.get(c, c): [(r.get("perplexity") or {}).get(c) for r in ok] for c in corpora}
        seed_values |= {TASKS.get(t, t): [_acc(r, t) for r in ok] for t in tasks}
        for column, values in seed_values.items():
            row[column], spread[column + STD] = _mean(values), _std(values)
        accs = [row[TASKS.get(t, t)] for t in tasks]
        row["Average"] = sum(accs) / len(accs) if accs and not any(math.isnan(a) for a in accs) else math.nan
        for column, (key, _) in COSTS.items():
            row[column] = mean(lambda r: ((r.get("phases") or {}).get("score") or {}).get(key))
        row["Error"] = "; ".join(f"seed {r.get('seed', 0)}: {r.get('error', 'failed')}" for r in failed)
        row["Seeds"] = len(ok)
        row.update(spread)
        row["_failed"] = not ok
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    models = _grid_order(frame["Model"], records, lambda r: r.get("model"))
    labels = _grid_order(frame["Method"], records, lambda r: _identity(r)[1])
    rank = lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
    frame["_order"] = [(models[model], ratio, rank(method), labels[label]) for model, ratio, method, label
                       in zip(frame["Model"], frame["Ratio"], frame["_method"], frame["Method"])]
    frame = frame.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    frame.attrs["lower_is_better"] = [PERPLEXITY.get(c, c) for c in corpora]
    return frame


def _acc(record: dict, task: str):
    value = (record.get("zero_shot") or {}).get(task) or {}
    return value["acc"] * 100 if "acc" in value else None


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def _std(values) -> float:
    """Sample standard deviation (n − 1) over the seeds that have the value; NaN below two."""
    values = [float(v) for v in values if v is not None]
    return statistics.stdev(values) if len(values) >= 2 else math.nan


# --------------------------------------------------------------------------- text cells
def _params(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _cells(frame: pd.DataFrame, bold) -> tuple[list[str], list[list[str]]]:
    """Header and text rows; `bold(text)` marks the best value of each (model, ratio) group."""
    metrics = [c for c in frame.columns if c not in ("Model", "Method", "Ratio", "Params", "Error", "Seeds")
               and not c.startswith("_") and not c.endswith(STD)]
    lower_better = frame.attrs["lower_is_better"]
    texts = pd.DataFrame(index=frame.index)
    texts["Model"] = frame["Model"]
    texts["Method"] = [m + " (failed)" if f else m for m, f in zip(frame["Method"], frame["_failed"])]
    texts["Ratio"] = [f"{r * 100:.0f}%" for r in frame["Ratio"]]
    texts["Params"] = [MISSING if math.isnan(p) else _params(p) for p in frame["Params"]]
    for column in metrics:
        fmt = COSTS[column][1] if column in COSTS else "{:.2f}"
        texts[column] = [MISSING if math.isnan(v) else fmt.format(v) for v in frame[column]]
        if column + STD in frame:  # several seeds: mean ± s
            texts[column] = [t if math.isnan(sd) else f"{t} ± {sd:.2f}"
                             for t, sd in zip(texts[column], frame[column + STD])]
        if column in COSTS:
            continue  # costs are reported, not ranked
        for _, group in frame.groupby(["Model", "Ratio"], sort=False):
            values = {i: round(v, 2) for i, v in group[column].items() if not math.isnan(v) and not math.isinf(v)}
            if len(group) < 2 or not values:
                continue
            best = (min if column in lower_better else max)(values.values())
            for i, v in values.items():
                if v == best:
                    texts.loc[i, column] = bold(texts.loc[i, column])
    return list(texts.columns), texts.values.tolist()


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
    return out.replace("~", "\\textasciitilde{}").replace("^", "\\textasciicircum{}").replace(MISSING, "--")


def to_markdown(records: list[dict]) -> str:
    frame = results_frame(records)
    if frame.empty:
        return "(no results)\n"
    header, rows = _cells(frame, lambda t: f"**{t}**")
    align = ["left", "left"] + ["right"] * (len(header) - 2)
    table = tabulate(rows, header, tablefmt="github", disable_numparse=True, colalign=align)
    notes = _notes(frame, records)
    return table + "\n" + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def to_latex(records: list[dict]) -> str:
    frame = results_frame(records)
    if frame.empty:
        return "% (no results)\n"
    header, rows = _cells(frame, lambda t: "\x00" + t + "\x01")
    cell = lambda t: _latex_escape(t).replace("\x00", "\\textbf{").replace("\x01", "}").replace("±", "$\\pm$")
    lines = ["\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", "\\toprule",
             " & ".join(cell(h) for h in header) + " \\\\", "\\midrule"]
    previous = None
    for (model, ratio), row in zip(zip(frame["Model"], frame["Ratio"]), rows):
        if previous is not None and previous != (model, ratio):
            lines.append("\\midrule")
        previous = (model, ratio)
        lines.append(" & ".join(cell(t) for t in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% {n}" for n in _notes(frame, records)]
    return "\n".join(lines) + "\n"


def to_csv(records: list[dict]) -> str:
    frame = results_frame(records)
    return frame.drop(columns=[c for c in frame.columns if c.startswith("_")]).round(6).to_csv(index=False)


FORMATS = {"md": to_markdown, "latex": to_latex, "csv": to_csv}


def format_table(records: list[dict], fmt: str = "md") -> str:
    return FORMATS[fmt](records)
