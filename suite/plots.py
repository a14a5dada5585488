"""Results figure: WikiText-2 perplexity vs pruning ratio (left) and scoring peak memory (right).

One line per method label (and model, when the file holds several), the dense model as a dashed
horizontal line; seeds are averaged and only `ok` records are drawn (same rules as tables.py). Where
a ratio has several seeds, each seed's perplexity is also drawn as a faint dot on the line's colour,
so the spread is visible beside the mean.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from suite.tables import METHOD_ORDER, TUNE, latest, split_recovered  # noqa: E402

CORPUS = "wikitext2"
FIGSIZE = (11, 4)
DPI = 100
MODEL_STYLES = ["-", ":", "-.", "--"]


def _rank(label: str) -> tuple:
    """Plot methods in the table's order; a label like "minillm-fo" sorts with its method."""
    base = next((m for m in METHOD_ORDER if label == m or label.startswith((m + "-", m + "_", m + " "))), None)
    return (METHOD_ORDER.index(base) if base else len(METHOD_ORDER), label)


def _series(records: list[dict]) -> dict:
    """{(model, label): {ratio: [wikitext2 ppl, ...]}} over ok records with a finite perplexity.
    A recovered cell: its pruned value on the method's line, its recovered one on "label w/ tune"."""
    series: dict = {}
    for r in split_recovered(latest(records)):
        ppl = (r.get("perplexity") or {}).get(CORPUS)
        if r.get("status", "ok") != "ok" or ppl is None or not math.isfinite(ppl):
            continue
        key = (r.get("model"), (r.get("label") or r.get("method")).removesuffix(TUNE[0]))
        series.setdefault(key, {}).setdefault(float(r.get("ratio_target") or 0.0), []).append(ppl)
    return series


def _score_memory(records: list[dict]) -> dict:
    """{(model, label): mean scoring peak MB} over ok records that scored (not dense)."""
    memory: dict = {}
    for r in latest(records):
        peak = ((r.get("phases") or {}).get("score") or {}).get("peak_mb")
        if r.get("status", "ok") == "ok" and peak is not None:
            memory.setdefault((r.get("model"), r.get("label") or r.get("method")), []).append(peak)
    return {key: sum(v) / len(v) for key, v in memory.items()}


def make_figure(records: list[dict]):
    """Returns (figure, (perplexity axes, memory axes))."""
    fig, (ax_ppl, ax_mem) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    series = _series(records)
    models = list(dict.fromkeys(model for model, _ in series))
    memory = dict(sorted(_score_memory(records).items(), key=lambda kv: (kv[0][0], _rank(kv[0][1]))))
    labels = sorted({label for _, label in [*series, *memory] if label != "dense"}, key=_rank)
    color = lambda label: "gray" if label == "dense" else f"C{labels.index(label) % 10}"
    name = lambda model, label: f"{label} ({model})" if len(models) > 1 else label
    for (model, label), by_ratio in sorted(series.items(), key=lambda kv: (models.index(kv[0][0]), _rank(kv[0][1]))):
        ratios = sorted(by_ratio)
        ppl = [sum(by_ratio[r]) / len(by_ratio[r]) for r in ratios]
        style = MODEL_STYLES[models.index(model) % len(MODEL_STYLES)]
        if label == "dense":
            ax_ppl.axhline(ppl[0], linestyle=(0, (4, 2 + 2 * models.index(model))), color=color(label),
                           label=name(model, label))
        else:
            ax_ppl.plot(ratios, ppl, marker="o", linestyle=style, color=color(label), label=name(model, label))
            several = [(r, v) for r in ratios if len(by_ratio[r]) > 1 for v in by_ratio[r]]
            if several:
                ax_ppl.scatter(*zip(*several), s=14, alpha=0.45, color=color(label), linewidths=0)
    if series:
        ax_ppl.set_yscale("log")
        ax_ppl.legend(fontsize="small")
    ax_ppl.set_xlabel("pruning ratio")
    ax_ppl.set_ylabel("WikiText-2 perplexity (log)")
    ax_ppl.set_title("Perplexity vs ratio")

    names = [name(model, label) for model, label in memory]
    ax_mem.bar(range(len(memory)), list(memory.values()), color=[color(label) for _, label in memory])
    ax_mem.set_xticks(range(len(memory)), names, rotation=30, ha="right", fontsize="small")
    ax_mem.set_ylabel("scoring peak memory (MB)")
    ax_mem.set_title("Scoring memory per method")
    fig.tight_layout()
    return fig, (ax_ppl, ax_mem)


def save_figure(records: list[dict], out) -> None:
    fig, _ = make_figure(records)
    fig.savefig(out)
    plt.close(fig)
