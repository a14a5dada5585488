"""Results figure: four panels against the pruning ratio, one legend outside them, a title with the caps.

  - WikiText-2 and PTB perplexity (log scale) vs ratio: one line per method label (and model, when
    the file holds several), the dense model as a dashed horizontal line; where a ratio has several
    seeds each seed's value is also a faint dot beside the mean;
  - zero-shot accuracy vs ratio: the mean of the recorded tasks' `acc` x 100 (`zero_shot_mean`), as
    the tables' Average; dense dashed;
  - scoring memory per method, one bar per ratio (not averaged over ratios): the bar is what scoring
    adds above the loaded model (`phases.score.peak_delta_mb`, the rise of the peak RSS over the
    phase's start), the number above it the whole process's peak during scoring (`peak_mb`: model,
    interpreter, libraries and the method), labelled as such.

Seeds are averaged and only `ok` records are drawn (same rules as tables.py). The title names the
model(s) and the evaluation caps read from the records (`cell.evaluation`).
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from suite.methods import method_order  # noqa: E402
from suite.tables import TUNE, latest, split_recovered  # noqa: E402

CORPORA = {"wikitext2": "WikiText-2", "ptb": "PTB"}
FIGSIZE = (13, 8)
DPI = 100
MODEL_STYLES = ["-", ":", "-.", "--"]
MODEL_MARKERS = ["o", "s", "^", "D"]  # a single ratio shows no line style: models differ by marker too
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


def _draw_lines(ax, series: dict, models: list, color, name) -> None:
    for (model, label), by_ratio in sorted(series.items(), key=lambda kv: (models.index(kv[0][0]), _rank(kv[0][1]))):
        ratios = sorted(by_ratio)
        means = [sum(by_ratio[r]) / len(by_ratio[r]) for r in ratios]
        if label == "dense":
            ax.axhline(means[0], linestyle=(0, (4, 2 + 2 * models.index(model))), color=color(label),
                       label=name(model, label))
            continue
        style = MODEL_STYLES[models.index(model) % len(MODEL_STYLES)]
        marker = MODEL_MARKERS[models.index(model) % len(MODEL_MARKERS)]
        ax.plot(ratios, means, marker=marker, linestyle=style, color=color(label), label=name(model, label))
        several = [(r, v) for r in ratios if len(by_ratio[r]) > 1 for v in by_ratio[r]]
        if several:
            ax.scatter(*zip(*several), s=14, alpha=0.45, color=color(label), linewidths=0)


def _draw_memory(ax, memory: dict, color, name) -> None:
    keys = sorted(memory, key=lambda k: (k[0], _rank(k[1])))
    ratios = sorted({r for by in memory.values() for r in by})
    width = 0.8 / max(1, len(ratios))
    for j, ratio in enumerate(ratios):
        for i, key in enumerate(keys):
            if ratio not in memory[key]:
                continue
            added, total = memory[key][ratio]
            x = i + (j - (len(ratios) - 1) / 2) * width
            bar = ax.bar(x, 0.0 if math.isnan(added) else added, width * 0.95, color=color(key[1]),
                         hatch=RATIO_HATCHES[j % len(RATIO_HATCHES)], edgecolor="black", linewidth=0.4)
            ax.annotate(f"{total:,.0f}", (x, bar[0].get_height()), ha="center", va="bottom", fontsize=6,
                        rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(keys)), [name(*k) for k in keys], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("added by scoring (MB)")
    ax.set_title("Scoring memory above the loaded model (bars)\nnumbers: whole process peak (MB)", fontsize="medium")
    ax.margins(y=0.25)
    ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # bars start at 0 MB; an all-zero panel stays readable
    if ratios:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=RATIO_HATCHES[j % len(RATIO_HATCHES)],
                                 label=f"ratio {ratio:g}") for j, ratio in enumerate(ratios)],
                  fontsize="x-small", loc="upper left")


def make_figure(records: list[dict]):
    """Returns (figure, {"wikitext2", "ptb", "accuracy", "memory": axes})."""
    fig, grid = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI)
    axes = {"wikitext2": grid[0][0], "ptb": grid[0][1], "accuracy": grid[1][0], "memory": grid[1][1]}
    panels = {corpus: _series(records, _perplexity(corpus)) for corpus in CORPORA}
    panels["accuracy"] = _series(records, _accuracy)
    memory = _score_memory(records)
    keys = [k for series in panels.values() for k in series] + list(memory)
    models = list(dict.fromkeys(model for model, _ in keys))
    labels = sorted({label for _, label in keys if label != "dense"}, key=_rank)
    color = lambda label: "gray" if label == "dense" else f"C{labels.index(label) % 10}"
    name = lambda model, label: f"{label} ({model})" if len(models) > 1 else label
    ratios = sorted({r for series in panels.values() for (_, label), by in series.items() if label != "dense"
                     for r in by})
    for panel, series in panels.items():
        ax = axes[panel]
        if not any(label != "dense" for _, label in series):  # e.g. a grid without PTB or without tasks
            ax.text(0.5, 0.5, "not evaluated in these records", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        _draw_lines(ax, series, models, color, name)
        if ratios and any(label != "dense" for _, label in series):
            ax.set_xticks(ratios, [f"{r:g}" for r in ratios])  # the grid's ratios, however few
        ax.set_xlabel("pruning ratio (fraction of all parameters removed)")
        if panel in CORPORA:
            if any(label != "dense" for _, label in series):
                ax.set_yscale("log")
            ax.set_ylabel(f"{CORPORA[panel]} perplexity (log)")
            ax.set_title(f"{CORPORA[panel]} perplexity (lower is better)", fontsize="medium")
        else:
            ax.set_ylabel("mean zero-shot accuracy (%)")
            ax.set_title("Zero-shot accuracy (higher is better)", fontsize="medium")
    _draw_memory(axes["memory"], memory, color, name)
    handles = {}
    for panel in panels:  # one legend for all line panels, outside the data
        for handle, label in zip(*axes[panel].get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize="small", frameon=False)
    fig.suptitle(title(records), fontsize="medium")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig, axes


def save_figure(records: list[dict], out) -> None:
    fig, _ = make_figure(records)
    fig.savefig(out)
    plt.close(fig)
