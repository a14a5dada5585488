"""Tables (golden Markdown and LaTeX outputs) and the results figure, from a hand-made results file.

tests/data/results_small.jsonl: three models; dense rows; minillm (label `minillm_fo`, escaped in LaTeX)
listed before magnitude (the table reorders); a failed cell (random @ 50%); cells with two seeds
(averaged, shown as mean ± sample standard deviation); a cell whose error was followed by a successful
rerun (the rerun wins); a skipped task; and LLaMA-7B records matching suite/published.yaml: a dense
row, flap at 20 % of the decoder layers (two seeds; its calibration differs from the published one:
a protocol mismatch named in the caption), llm-pruner recovered (w/o and w/ tune rows).
To refresh the golden files after an intended change (the layout changed in issue 27: Achieved and
Seeds columns, costs out of the quality table, published rows, table*, CSV golden added):
    python -m suite table tests/data/results_small.jsonl --published --format md --out tests/data/results_small.md
    python -m suite table tests/data/results_small.jsonl --published --format latex --out tests/data/results_small.tex
    python -m suite table tests/data/results_small.jsonl --published --format csv --out tests/data/results_small.csv
"""
from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import pandas as pd
import pytest

from suite.cli import main
from suite.plots import DPI, make_figure
from suite.records import read_records
from suite.records import latest
from suite.tables import format_table, results_frame, to_csv, to_latex, to_markdown

DATA = Path(__file__).resolve().parent / "data"
RESULTS = DATA / "results_small.jsonl"


@pytest.fixture(scope="module")
def records():
    return read_records(RESULTS)


def test_markdown_matches_golden(records):
    assert to_markdown(records, published=True) == (DATA / "results_small.md").read_text()


def test_latex_matches_golden(records):
    text = to_latex(records, published=True)
    assert text == (DATA / "results_small.tex").read_text()
    assert "\\toprule" in text and "\\bottomrule" in text and "minillm\\_fo" in text and "20\\%" in text
    lines = text.splitlines()
    assert lines[0] == "\\begin{table*}[t]" and lines[-3] == "\\end{table*}"  # 11 columns: both text columns


def test_csv_matches_golden(records):
    assert to_csv(records, published=True) == (DATA / "results_small.csv").read_text()


def test_rows_grouped_dense_first_best_in_bold(records):
    frame = results_frame(records)
    llama = frame[frame["Model"] == "tiny-llama"]
    assert list(zip(llama["Method"], llama["Ratio"])) == [
        ("dense", 0.0), ("magnitude", 0.2), ("random", 0.2), ("minillm_fo", 0.2),
        ("magnitude", 0.5), ("random", 0.5), ("minillm_fo", 0.5)]
    opt_random = frame[(frame["Model"] == "tiny-opt") & (frame["Method"] == "random")].iloc[0]
    assert (opt_random["WikiText-2"], opt_random["PTB"], opt_random["PIQA"]) == (155.0, 225.0, 53.0)  # seed mean
    md = to_markdown(records).splitlines()
    assert "minillm_fo" in md[5] and "**130.00**" in md[5]  # lowest perplexity
    # best BoolQ 62 vs 58, each ± 5 (acc_stderr 0.05): 4 < 1.96 * hypot(5, 5), not significant, not bold
    assert " 62.00 " in md[5] and "**62.00**" not in md[5]
    # a tie (155.00 and the two seeds' mean 155.00): no lead, no bold; PTB 225 ± 7.07 (std / sqrt(2) = 5)
    # against 240 (one seed, no error): 15 > 1.96 * 5, bold
    assert "**" not in md[10] and "| 155.00 ± 7.07 |" in md[11] and "**225.00 ± 7.07**" in md[11]
    assert "**" not in md[2] and "**" not in md[9]  # dense rows are alone in their group


def _record(label, acc, se, limit=50, max_tokens=4096):
    return {"model": "m", "label": label, "method": label, "ratio_target": 0.5, "seed": 0, "status": "ok",
            "perplexity": {"wikitext2": 10.0}, "zero_shot": {"piqa": {"acc": acc, "acc_stderr": se}},
            "cell": {"grid": {"name": "demo", "config_hash": "x"},
                     "evaluation": {"seqlen": 128, "max_tokens": max_tokens, "limit": limit, "tasks": ["piqa"]}}}


@pytest.mark.parametrize("lead, bold", [(0.20, True), (0.12, False)])
def test_accuracy_bold_only_when_significantly_ahead(lead, bold):
    import statistics

    se_a, se_b = 0.065, 0.071
    records = [_record("a", 0.58 + lead, se_a), _record("b", 0.58, se_b), _record("c", 0.50, 0.07)]
    z = (lead * 100) / (100 * statistics.fmean([se_a ** 2, se_b ** 2]) ** 0.5 * 2 ** 0.5)  # = lead / hypot(se_a, se_b)
    assert (z > 1.96) == bold  # the cases straddle the 5 % line
    line = next(l for l in to_markdown(records).splitlines() if l.startswith("| m ") and "| a " in l)
    shown = f"{(0.58 + lead) * 100:.2f} ± {se_a * 100:.2f}"  # a limit was set: acc ± standard error by default
    assert (f"**{shown}**" in line) == bold and shown in line


def test_caps_caption_stderr_switch_and_latex_table_environment():
    records = [_record("a", 0.6, 0.07), _record("b", 0.5, 0.07)]
    md = to_markdown(records)
    assert "the first 4,096 tokens" in md and "the first 50 questions" in md and "128-token windows" in md
    assert "60.00 ± 7.00" in md and "± 7.0" not in to_markdown(records, stderr="off")
    unlimited = [_record("a", 0.6, 0.07, limit=None, max_tokens=None), _record("b", 0.5, 0.07, limit=None)]
    assert "±" not in to_markdown(unlimited).split("\n\n")[0] and "60.00 ± 7.00" in to_markdown(unlimited, stderr="on")
    tex = to_latex(records).splitlines()
    assert tex[0] == "\\begin{table}[t]" and tex[-1] == "\\end{table}"
    assert any(l.startswith("\\caption{") and "first 50 questions" in l for l in tex) and "\\label{tab:demo}" in tex
    from suite.plots import title

    assert "m\n" in title(records) and "the first 4,096 tokens" in title(records) and "50 questions" in title(records)
    bare = to_latex(records, bare=True).splitlines()
    assert bare[0].startswith("\\begin{tabular}") and not any("\\begin{table}" in l for l in bare)


def test_several_seeds_show_mean_and_sample_std(records):
    import statistics

    seeds = [r for r in records if r["model"] == "tiny-opt" and r["label"] == "random"]
    assert len(seeds) == 2
    wiki = [r["perplexity"]["wikitext2"] for r in seeds]
    piqa = [r["zero_shot"]["piqa"]["acc"] * 100 for r in seeds]
    ptb = [r["perplexity"]["ptb"] for r in seeds]
    frame = results_frame(records)
    row = frame[(frame["Model"] == "tiny-opt") & (frame["Method"] == "random")].iloc[0]
    assert row["Seeds"] == 2
    assert row["WikiText-2 std"] == pytest.approx(statistics.stdev(wiki))
    assert row["PIQA std"] == pytest.approx(statistics.stdev(piqa))
    md = next(line for line in to_markdown(records).splitlines() if "tiny-opt" in line and "| random" in line)
    assert f"{statistics.mean(ptb):.2f} ± {statistics.stdev(ptb):.2f}**" in md  # bold on the mean
    assert f"{statistics.mean(wiki):.2f} ± {statistics.stdev(wiki):.2f}" in md
    assert f"{statistics.mean(piqa):.2f} ± {statistics.stdev(piqa):.2f}" in md
    assert "$\\pm$" in to_latex(records) and "±" not in to_latex(records)
    single = frame[(frame["Model"] == "tiny-opt") & (frame["Method"] == "magnitude")].iloc[0]
    assert single["Seeds"] == 1 and math.isnan(single["WikiText-2 std"])  # one seed: no spread shown
    assert "±" not in next(line for line in to_markdown(records).splitlines() if "| magnitude" in line)
    csv = pd.read_csv(io.StringIO(to_csv(records)))
    assert csv.loc[(csv["Model"] == "tiny-opt") & (csv["Method"] == "random"), "PTB std"].item() == pytest.approx(
        statistics.stdev([r["perplexity"]["ptb"] for r in seeds]))


def test_failed_cell_is_a_row_with_a_note_and_reruns_win(records):
    frame = results_frame(records)
    failed = frame[frame["_failed"]]
    assert list(failed["Method"]) == ["random"] and math.isnan(failed.iloc[0]["WikiText-2"])
    md = to_markdown(records)
    assert "random (failed)" in md and "- Failed: tiny-llama / random @ 50%: seed 0: RuntimeError: boom" in md
    assert "MemoryError" not in md  # tiny-opt magnitude failed once, then its rerun succeeded
    error, ok = {"model": "m", "label": "x", "status": "error"}, {"model": "m", "label": "x", "status": "ok"}
    assert latest([error, ok]) == [ok] and latest([ok, error]) == [ok] and latest([error]) == [error]


def test_csv_holds_raw_numbers_and_costs_are_their_own_table(records):
    frame = pd.read_csv(io.StringIO(to_csv(records)))
    assert len(frame) == 14  # 10 tiny rows, LLaMA-7B: dense, flap, llm-pruner w/o and w/ tune
    assert list(frame.columns)[:6] == ["Model", "Method", "Ratio", "Ratio of", "Achieved", "Params"]
    row = frame[(frame["Model"] == "tiny-llama") & (frame["Method"] == "magnitude") & (frame["Ratio"] == 0.2)].iloc[0]
    assert (row["WikiText-2"], row["Params"]) == (140.5, 800000)
    assert frame["Error"].fillna("").str.contains("boom").sum() == 1
    assert not any("Score" in c or "MB" in c for c in frame.columns)  # quality only
    costs = pd.read_csv(io.StringIO(format_table(records, "csv", costs=True)))
    row = costs[(costs["Model"] == "tiny-llama") & (costs["Method"] == "magnitude") & (costs["Ratio"] == 0.2)].iloc[0]
    assert (row["score s"], row["score added MB"]) == (1.234, 45.5)


def test_zeroth_order_methods_are_marked(records):
    """The registry's zeroth-order methods (minillm, bonsai: the papers' "forward-only" ones) carry the
    mark and the caption explains it; the others do not."""
    from suite.methods import METHODS, zeroth_order

    assert zeroth_order() == {name for name in ("minillm", "bonsai") if name in METHODS}
    md = to_markdown(records)
    assert "| minillm_fo† " in md and "| magnitude† " not in md and "†: zeroth-order" in md
    assert "minillm\\_fo$^\\dagger$" in to_latex(records)
    assert "†" not in to_markdown([r for r in records if r.get("method") != "minillm"])


def test_empty_results():
    assert to_markdown([]) == "(no results)\n"


def test_table_command(tmp_path, capsys):
    out = tmp_path / "t.tex"
    assert main(["table", str(RESULTS), "--published", "--format", "latex", "--out", str(out)]) == 0
    assert out.read_text() == (DATA / "results_small.tex").read_text()
    assert main(["table", str(RESULTS), "--published"]) == 0
    assert capsys.readouterr().out == (DATA / "results_small.md").read_text()
    assert main(["table", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jsonl'}: results file not found"


def test_one_uncertainty_convention_average_included(records):
    """Two seeds: every ± is the seeds' sample std, the Average's the std of the seeds' Averages; one
    seed with a question limit: the task's standard error, the Average's sqrt(sum se^2) / tasks."""
    import statistics

    flap = [r for r in records if r["model"] == "huggyllama/llama-7b" and r["label"] == "flap"]
    averages = [100 * statistics.mean(v["acc"] for v in r["zero_shot"].values()) for r in flap]
    line = next(l for l in to_markdown(records).splitlines() if "llama-7b | flap " in l)
    assert f"{statistics.mean(averages):.2f} ± {statistics.stdev(averages):.2f}" in line
    single = [_record("a", 0.6, 0.07), _record("b", 0.5, 0.05)]
    single[0]["zero_shot"]["boolq"] = {"acc": 0.7, "acc_stderr": 0.04}
    row = next(l for l in to_markdown(single).splitlines() if l.startswith("| m ") and "| a " in l)
    assert f"65.00 ± {math.hypot(7, 4) / 2:.2f}" in row  # Average of PIQA 60 and BoolQ 70
    assert "±: the task's standard error (Average: sqrt(sum se^2) / tasks)" in to_markdown(single)


@pytest.mark.parametrize("seeds_b, bold", [((741 - 168 / 2 ** 0.5, 741 + 168 / 2 ** 0.5), False),
                                           ((600.0, 610.0), True)])
def test_perplexity_bold_only_when_the_seed_spread_allows(seeds_b, bold):
    """The issue's case: 741 ± 168 against 779 ± 20 (two seeds each) is no significant lead."""
    def record(label, ppl, seed):
        return {"model": "m", "label": label, "method": label, "ratio_target": 0.5, "seed": seed, "status": "ok",
                "perplexity": {"wikitext2": ppl}}
    b = [record("b", v, i) for i, v in enumerate(seeds_b)]
    a = [record("a", v, i) for i, v in enumerate((779 - 10 * 2 ** 0.5, 779 + 10 * 2 ** 0.5))]
    frame = results_frame(a + b)
    row_b = frame[frame["Method"] == "b"].iloc[0]
    se_a, se_b = 20 / 2 ** 0.5, row_b["WikiText-2 std"] / 2 ** 0.5  # standard errors of the seed means
    assert (abs(779 - row_b["WikiText-2"]) > 1.96 * math.hypot(se_a, se_b)) == bold
    line = next(l for l in to_markdown(a + b).splitlines() if l.startswith("| m ") and "| b " in l)
    assert ("**" in line) == bold


def test_relative_view_is_percent_of_the_models_dense_row(records):
    frame = results_frame(records)
    text = to_markdown(records, relative=True)
    assert "Every metric in % of its model's dense row." in text
    dense = frame[(frame["Model"] == "tiny-llama") & (frame["Method"] == "dense")].iloc[0]
    magnitude = frame[(frame["Model"] == "tiny-llama") & (frame["Method"] == "magnitude") & (frame["Ratio"] == 0.2)].iloc[0]
    lines = text.splitlines()
    assert lines[2].count(" 100.00 |") == 5
    assert f"{100 * magnitude['WikiText-2'] / dense['WikiText-2']:.2f}" in lines[3]
    assert f"{100 * magnitude['PIQA'] / dense['PIQA']:.2f}" in lines[3]


def test_published_rows_difference_and_remaining_protocol(records):
    from suite.published import load

    text = to_markdown(records, published=True)
    lines = text.splitlines()
    flap = [r for r in records if r["model"] == "huggyllama/llama-7b" and r["label"] == "flap"]
    mean = sum(r["perplexity"]["wikitext2"] for r in flap) / 2
    entry = next(e for e in load().entries if e.method == "flap" and e.ratio == 0.2)
    published = entry.metrics["wikitext2"]
    row = lines[lines.index(next(l for l in lines if "llama-7b | flap " in l)) + 1]
    assert "flap (published)" in row and f"{published:.2f} ({100 * (mean / published - 1):+.1f}%)" in row
    assert "calibration windows published 1024, measured 128" in text  # the protocol mismatch
    assert "published on the full test set, measured on the first 4,096 tokens" in text
    assert "of the decoder layers' parameters" in text and "FLAP README" in text
    header = [c.strip() for c in lines[0].split("|")]
    assert [c.strip() for c in row.split("|")][header.index("Average")] == "–"  # 7 published tasks, 2 here
    assert "magnitude (published)" not in text and "tiny-opt | dense (published)" not in text  # no entry: no row
    assert to_markdown(records) .count("(published)") == 0


def test_published_file_schema_every_entry_has_a_source():
    import pydantic

    from suite.published import Entry, load

    published = load()
    assert {"llm-pruner", "flap", "wanda-sp", "slicegpt", "bonsai", "shortgpt", "sleb", "minillm"} <= {
        e.method for e in published.entries}
    assert all(len(e.source) >= 10 for e in published.entries)
    for entry in published.entries:
        if entry.status == "reported":
            assert entry.protocol is not None and entry.metrics and (entry.ratio == 0 or entry.ratio_of)
    base = {"method": "x", "model": "LLaMA-7B", "ratio": 0.2, "ratio_of": "all", "metrics": {"wikitext2": 1.0},
            "protocol": {"context": 128, "tokens": "full test set", "calibration": None, "tuned": False}}
    Entry.model_validate({**base, "source": "a paper, Table 1"})
    for bad in ({**base}, {**base, "source": "a paper, Table 1", "metrics": {}},
                {**base, "source": "a paper, Table 1", "status": "not found"},
                {**base, "source": "a paper, Table 1", "ratio_of": None}):
        with pytest.raises(pydantic.ValidationError):
            Entry.model_validate(bad)


# --------------------------------------------------------------------------- plots
def _drawn(ax) -> dict:
    """{label: (x, y, error bar half-heights)} of an axes' error-bar series (an independent reading of
    what matplotlib drew: the data line and the bar segments)."""
    out = {}
    for container in ax.containers:
        if not hasattr(container, "has_yerr"):
            continue
        line, _, bars = container.lines
        halves = [] if not bars else [(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments()]
        out[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), halves)
    return out


def test_figure_one_row_per_model_with_error_bars(records):
    import statistics

    fig, axes = make_figure(records)
    assert {model for model, _ in axes} == {"tiny-llama", "tiny-opt", "huggyllama/llama-7b"}
    assert [p for m, p in axes if m == "tiny-llama"] == ["wikitext2", "ptb", "accuracy", "memory"]
    assert [p for m, p in axes if m == "huggyllama/llama-7b"] == ["wikitext2", "ptb", "accuracy"]  # no scoring phase
    for ax in fig.axes:  # no empty panel: every visible axes draws data
        assert not ax.get_visible() or ax.get_lines() or ax.patches or ax.collections
    wiki = _drawn(axes[("tiny-llama", "wikitext2")])
    assert axes[("tiny-llama", "wikitext2")].get_yscale() == "log"
    assert wiki["minillm_fo"][:2] == ([0.2, 0.5], [130.0, 400.0])
    assert wiki["random"][1] == [180.123]  # the 50% cell failed
    seeds = [r["perplexity"]["wikitext2"] for r in records if r["model"] == "tiny-opt" and r["label"] == "random"]
    x, y, halves = _drawn(axes[("tiny-opt", "wikitext2")])["random"]
    assert y == [statistics.mean(seeds)] and halves == pytest.approx([statistics.stdev(seeds)])
    (seed_dots,) = axes[("tiny-opt", "wikitext2")].collections[-1:]  # each seed as a dot beside the mean
    assert sorted(map(tuple, seed_dots.get_offsets().tolist())) == [(0.2, 150.0), (0.2, 160.0)]
    dense = [l for l in axes[("tiny-opt", "wikitext2")].get_lines() if l.get_label() == "dense"]
    assert len(dense) == 1 and set(dense[0].get_ydata()) == {90.0} and dense[0].get_linestyle() == "--"
    assert all(set(l.get_ydata()) != {90.0} for l in axes[("tiny-llama", "wikitext2")].get_lines())
    # accuracy: one seed -> the standard error of the mean accuracy, sqrt(sum se^2) / tasks
    acc = _drawn(axes[("tiny-llama", "accuracy")])["magnitude"]
    magnitude = next(r for r in records if r["model"] == "tiny-llama" and r["label"] == "magnitude")
    se = [v["acc_stderr"] * 100 for v in magnitude["zero_shot"].values()]
    assert acc[1][0] == pytest.approx(100 * magnitude["zero_shot_mean"])
    assert acc[2][0] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5 / 2)
    # memory: one bar per (method, ratio) of the row's model; labels: process peaks
    ok = [r for r in latest(records) if r.get("status", "ok") == "ok" and r["model"] == "tiny-llama"]
    scored = [r for r in ok if (r.get("phases") or {}).get("score")]
    bars = sorted(round(p.get_height(), 6) for p in axes[("tiny-llama", "memory")].patches)
    assert bars == sorted(r["phases"]["score"]["peak_delta_mb"] for r in scored)
    totals = sorted(float(t.get_text().replace(",", "")) for t in axes[("tiny-llama", "memory")].texts)
    assert totals == sorted(round(r["phases"]["score"]["peak_mb"]) for r in scored)
    legend = fig.legends[0]  # outside the panels: to the right of every axes
    fig.canvas.draw()
    right = max(ax.get_position().x1 for ax in axes.values())
    assert legend.get_window_extent().x0 / fig.bbox.width >= right
    assert "ratio (fraction of all parameters removed)" == axes[("tiny-opt", "ptb")].get_xlabel()


def test_figure_one_ratio_no_ptb_several_models_stays_readable():
    """The README's smoke grid: one ratio, no PTB, two models: no PTB panel at all, ticks are the grid's
    ratios, each model its own row and axis."""
    records = [{"model": m, "method": meth, "label": meth, "ratio_target": r, "status": "ok",
                "perplexity": {"wikitext2": ppl}, "zero_shot_mean": None,
                "phases": {"score": {"peak_mb": 600.0, "peak_delta_mb": 0.0, "seconds": 0.1}} if r else {}}
               for m, meth, r, ppl in [("tiny-a", "dense", 0.0, 50.0), ("tiny-a", "random", 0.2, 90.0),
                                       ("tiny-b", "dense", 0.0, 60.0), ("tiny-b", "random", 0.2, 80.0)]]
    fig, axes = make_figure(records)
    assert sorted(axes) == [("tiny-a", "memory"), ("tiny-a", "wikitext2"), ("tiny-b", "memory"), ("tiny-b", "wikitext2")]
    assert list(axes[("tiny-a", "wikitext2")].get_xticks()) == [0.2]
    assert axes[("tiny-a", "wikitext2")] is not axes[("tiny-b", "wikitext2")]
    assert axes[("tiny-b", "memory")].get_ylim()[0] == 0 and axes[("tiny-b", "memory")].get_ylim()[1] >= 1


def test_plot_command_writes_png(tmp_path):
    out = tmp_path / "fig.png"
    assert main(["plot", str(RESULTS), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    fig, _ = make_figure(read_records(RESULTS))
    assert (width, height) == (round(fig.get_figwidth() * DPI), round(fig.get_figheight() * DPI))


def test_a_nan_perplexity_among_seeds_makes_the_cell_nan_instead_of_failing():
    """tables' seed statistics are pandas' now: a seed whose perplexity is NaN (a diverged model; the
    records keep NaN) makes that cell's mean and std NaN, shown as '–', as one NaN seed does; the old
    statistics.stdev raised AttributeError on it. The other columns keep their seeds' statistics."""
    import math
    import statistics

    from suite.tables import results_frame, to_markdown

    base = {"model": "m", "method": "random", "label": "random", "ratio_target": 0.2, "status": "ok",
            "params": {"pruned": 10}, "zero_shot": {}}
    records = [{**base, "seed": 0, "perplexity": {"wikitext2": 10.0, "ptb": 20.0}},
               {**base, "seed": 1, "perplexity": {"wikitext2": float("nan"), "ptb": 26.0}},
               {**base, "seed": 2, "perplexity": {"wikitext2": 12.0, "ptb": None}}]
    row = results_frame(records).iloc[0]
    assert math.isnan(row["WikiText-2"]) and math.isnan(row["WikiText-2 std"]) and row["Seeds"] == 3
    assert row["PTB"] == pytest.approx(23.0) and row["PTB std"] == pytest.approx(statistics.stdev([20.0, 26.0]))
    line = next(line for line in to_markdown(records).splitlines() if line.startswith("| m "))
    assert "| – |" in line.replace(" ", "").replace("|–|", "| – |") and "23.00 ± 4.24" in line
