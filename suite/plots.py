"""Results figure: one row of panels per model, against the pruning ratio, one legend outside them.

Per model (row), only the panels its records have values for (no empty panel):
  - perplexity per evaluated corpus (WikiText-2, PTB, C4; log scale) vs ratio, one line per method label,
    the model's dense value as a dashed grey line; error bars: the sample standard deviation over seeds
    where a ratio has several (each seed also a faint dot), none for a single seed;
  - zero-shot accuracy vs ratio: the mean of the recorded tasks' `acc` x 100 (`zero_shot_mean`, as the
    tables' Average); error bars: the seeds' standard deviation with several seeds, else the standard
    error of the mean accuracy from lm-eval's `acc_stderr` (sqrt(sum se^2) / tasks), the tables' convention;
  - scoring memory per method, one bar per ratio (not averaged over ratios): what scoring adds above the
    loaded model (`phases.score.peak_delta_mb`), the number above it the whole process's peak during
    scoring (`peak_mb`).
Each row has its own y axes (models differ by orders of magnitude in perplexity). Seeds are averaged
and only `ok` records are drawn (same rules as tables.py). The title names the evaluation caps and
what the ratio counts, read from the records.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from suite.methods import method_order  # noqa: E402
from suite.records import TUNE, latest  # noqa: E402
from suite.tables import split_recovered  # noqa: E402

CORPORA = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}
PANEL_SIZE = (4.3, 3.3)  # inches per panel
LEGEND_WIDTH = 2.6  # inches right of the panels
DPI = 100
RATIO_HATCHES = ["", "//", "..", "xx"]


def _rank(label: str) -> tuple:
    """Plot methods in the table's order; a label like "minillm-fo" sorts with its method."""
    order = method_order()
    base = next((m for m in order if label == m or label.startswith((m + "-", m + "_", m + " "))), None)
    return (order.index(base) if base else len(order), label)


def _ok(records: list[dict]) -> list[dict]:
    """The ok records; a recovered cell as two (`split_recovered`): "label w/o tune", "label w/ tune"."""
    return [r for r in split_recovered(latest(records)) if r.get("status", "ok") == "ok"]


def _key(record: dict) -> tuple:
    """(model, line label): a recovered cell's pruned value stays on its method's line, its recovered
    one gets its own "label w/ tune" line."""
    return record.get("model"), (record.get("label") or record.get("method")).removesuffix(TUNE[0])


def _ratio(record: dict) -> float:
    return float(record.get("ratio_target") or 0.0)


def _series(records: list[dict], value) -> dict:
    """{(model, label): {ratio: [value, ...]}} over ok records whose `value(record)` is finite."""
    series: dict = {}
    for r in _ok(records):
        v = value(r)
        if v is not None and math.isfinite(v):
            series.setdefault(_key(r), {}).setdefault(_ratio(r), []).append(v)
    return series


def _perplexity(corpus):
    return lambda r: (r.get("perplexity") or {}).get(corpus)


def _accuracy(r: dict):
    return None if r.get("zero_shot_mean") is None else 100 * r["zero_shot_mean"]


def _score_memory(records: list[dict]) -> dict:
    """{(model, label): {ratio: (mean MB added by scoring, mean process peak MB)}} over ok scored records.
    A recovered cell's "w/ tune" row is left out: its scoring is the "w/o tune" row's, not a second one."""
    memory: dict = {}
    for r in _ok(records):
        if (r.get("label") or "").endswith(TUNE[1]):
            continue
        score = (r.get("phases") or {}).get("score") or {}
        if score.get("peak_mb") is not None:
            added = score.get("peak_delta_mb", math.nan)
            memory.setdefault(_key(r), {}).setdefault(_ratio(r), []).append((added, score["peak_mb"]))
    return {key: {ratio: tuple(sum(col) / len(col) for col in zip(*values)) for ratio, values in by.items()}
            for key, by in memory.items()}


def title(records: list[dict]) -> str:
    """Model(s) and evaluation caps (tokens per corpus, questions per task) from the records."""
    ok = _ok(records)
    models = ", ".join(dict.fromkeys(str(r.get("model")) for r in ok)) or "no results"
    evals = [e for e in ((r.get("cell") or {}).get("evaluation") for r in ok) if e]
    caps = []
    if evals:
        tokens = sorted({e.get("max_tokens") for e in evals}, key=lambda v: (v is None, v or 0))
        caps.append("perplexity on " + " or ".join("all" if v is None else f"the first {v:,}" for v in tokens)
                    + f" tokens ({'/'.join(str(v) for v in sorted({e.get('seqlen') for e in evals}))}-token windows)")
        tasks = sorted({t for e in evals for t in (e.get("tasks") or [])})
        if tasks:
            limits = sorted({e.get("limit") for e in evals}, key=lambda v: (v is None, v or 0))
            caps.append("accuracy: mean of " + ", ".join(tasks) + " on "
                        + " or ".join("all" if v is None else f"{v:,}" for v in limits) + " questions each")
    return models + ("\n" + "; ".join(caps) if caps else "")


def _accuracy_error(r: dict):
    """The standard error of a record's mean accuracy (x 100): sqrt(sum se^2) / tasks, None without errors."""
    tasks = [v for v in (r.get("zero_shot") or {}).values() if isinstance(v, dict) and "acc" in v]
    if not tasks or any(v.get("acc_stderr") is None for v in tasks):
        return None
    return 100 * math.sqrt(sum(v["acc_stderr"] ** 2 for v in tasks)) / len(tasks)


def _statistics(values: list[float], errors: list) -> tuple[float, float]:
    """(mean, error bar): the seeds' sample std with several seeds, else the single seed's standard
    error (NaN when it has none)."""
    mean = sum(values) / len(values)
    if len(values) > 1:
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, math.nan if not errors or errors[0] is None else errors[0]


def _draw_lines(ax, series: dict, errors: dict, model: str, color) -> None:
    for label, by_ratio in sorted(series.items(), key=lambda kv: _rank(kv[0])):
        ratios = sorted(by_ratio)
        stats = [_statistics(by_ratio[r], (errors.get(label) or {}).get(r)) for r in ratios]
        means = [m for m, _ in stats]
        if label == "dense":
            ax.axhline(means[0], linestyle="--", color=color(label), label=label)
            continue
        bars = [0.0 if math.isnan(e) else e for _, e in stats]
        ax.errorbar(ratios, means, yerr=bars if any(bars) else None, marker="o", capsize=3, color=color(label),
                    label=label)
        several = [(r, v) for r in ratios if len(by_ratio[r]) > 1 for v in by_ratio[r]]
        if several:
            ax.scatter(*zip(*several), s=14, alpha=0.45, color=color(label), linewidths=0)


def _draw_memory(ax, memory: dict, color) -> None:
    keys = sorted(memory, key=_rank)
    ratios = sorted({r for by in memory.values() for r in by})
    width = 0.8 / max(1, len(ratios))
    for j, ratio in enumerate(ratios):
        for i, key in enumerate(keys):
            if ratio not in memory[key]:
                continue
            added, total = memory[key][ratio]
            x = i + (j - (len(ratios) - 1) / 2) * width
            bar = ax.bar(x, 0.0 if math.isnan(added) else added, width * 0.95, color=color(key),
                         hatch=RATIO_HATCHES[j % len(RATIO_HATCHES)], edgecolor="black", linewidth=0.4)
            ax.annotate(f"{total:,.0f}", (x, bar[0].get_height()), ha="center", va="bottom", fontsize=7,
                        rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("added by scoring (MB)")
    ax.set_title("Scoring memory (bars: added; numbers: peak MB)", fontsize="medium")
    ax.margins(y=0.3)
    ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # bars start at 0 MB; an all-zero panel stays readable
    if len(ratios) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=RATIO_HATCHES[j % len(RATIO_HATCHES)],
                                 label=f"ratio {ratio:g}") for j, ratio in enumerate(ratios)],
                  fontsize="x-small", loc="upper left")


def _ratio_words(records: list[dict]) -> str:
    kinds = {r.get("ratio_of") or "all" for r in _ok(records) if r.get("method") != "dense"}
    return {frozenset({"layers"}): "fraction of the decoder layers' parameters removed"}.get(
        frozenset(kinds), "fraction of all parameters removed" if kinds <= {"all"} else "fraction removed (mixed conventions)")


def panels(records: list[dict]) -> dict:
    """{model: [panel, ...]} in drawing order: the corpora, "accuracy" and "memory" that model has values for."""
    out = {}
    for r in _ok(records):
        have = out.setdefault(r.get("model"), set())
        have.update(c for c, v in (r.get("perplexity") or {}).items() if v is not None and math.isfinite(v))
        if _accuracy(r) is not None:
            have.add("accuracy")
        if ((r.get("phases") or {}).get("score") or {}).get("peak_mb") is not None:
            have.add("memory")
    order = [*CORPORA, "accuracy", "memory"]
    return {model: sorted(have, key=lambda p: order.index(p) if p in order else len(order)) for model, have in out.items()}


def make_figure(records: list[dict]):
    """Returns (figure, {(model, panel): axes}); panel: a corpus, "accuracy" or "memory"."""
    layout = panels(records) or {"no results": []}
    columns = max(1, max(len(p) for p in layout.values()))
    fig, grid = plt.subplots(len(layout), columns, squeeze=False, dpi=DPI,
                             figsize=(PANEL_SIZE[0] * columns + LEGEND_WIDTH, PANEL_SIZE[1] * len(layout) + 0.9))
    ok = _ok(records)
    labels = sorted({label for _, label in map(_key, ok) if label != "dense"}, key=_rank)
    color = lambda label: "gray" if label == "dense" else f"C{labels.index(label) % 10}"
    axes = {}
    for row, (model, names) in enumerate(layout.items()):
        mine = [r for r in records if r.get("model") == model]  # raw: _series and _score_memory split them
        ratios = sorted({_ratio(r) for r in _ok(mine) if r.get("method") != "dense"})
        for col in range(columns):
            ax = grid[row][col]
            if col >= len(names):
                ax.set_visible(False)  # this model has fewer panels than the widest row
                continue
            panel, axes[(model, names[col])] = names[col], ax
            if panel == "memory":
                _draw_memory(ax, {label: by for (_, label), by in _score_memory(mine).items()}, color)
            else:
                value = _accuracy if panel == "accuracy" else _perplexity(panel)
                series = {label: by for (_, label), by in _series(mine, value).items()}
                errors = {label: by for (_, label), by in _series_errors(mine, panel).items()}
                _draw_lines(ax, series, errors, model, color)
                if ratios:
                    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])  # the grid's ratios, however few
                ax.set_xlabel(f"ratio ({_ratio_words(mine)})", fontsize="small")
                if panel == "accuracy":
                    ax.set_ylabel("mean zero-shot accuracy (%)")
                    ax.set_title("Zero-shot accuracy (higher is better)", fontsize="medium")
                else:
                    if any(label != "dense" for label in series):
                        from matplotlib.ticker import FuncFormatter, NullFormatter

                        ax.set_yscale("log")
                        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 150, not 1.5 x 10^2
                        ax.yaxis.set_major_formatter(plain)
                        low, high = ax.get_ylim()
                        if high / low < 10:  # within a decade the minor ticks carry the numbers; wider, they would overlap
                            ax.yaxis.set_minor_formatter(plain)
                        else:
                            ax.yaxis.set_minor_formatter(NullFormatter())
                    ax.set_ylabel(f"{CORPORA.get(panel, panel)} perplexity (log)")
                    ax.set_title(f"{CORPORA.get(panel, panel)} perplexity (lower is better)", fontsize="medium")
            ax.set_title(f"{model}\n{ax.get_title()}", fontsize="medium")  # each row's model on each panel
    handles = {}
    for ax in axes.values():  # one legend for all line panels, outside the data
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("ratio "):
                handles.setdefault(label, handle)
    if handles:
        order = sorted(handles, key=_rank)
        fig.legend([handles[k] for k in order], order, loc="center right", fontsize="medium", frameon=False)
    fig.suptitle(title(records), fontsize="medium")
    width = fig.get_figwidth()
    fig.tight_layout(rect=(0, 0, 1 - LEGEND_WIDTH / width, 1))
    return fig, axes


def _series_errors(records: list[dict], panel: str) -> dict:
    """{(model, label): {ratio: [standard error, ...]}} per seed, for `_statistics` (accuracy only:
    perplexity records carry no standard error)."""
    out: dict = {}
    if panel != "accuracy":
        return out
    for r in _ok(records):
        if _accuracy(r) is not None:
            out.setdefault(_key(r), {}).setdefault(_ratio(r), []).append(_accuracy_error(r))
    return out


def save_figure(records: list[dict], out) -> None:
    fig, _ = make_figure(records)
    fig.savefig(out)
    plt.close(fig)
