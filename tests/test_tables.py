"""Tables (golden Markdown and LaTeX outputs) and the results figure, from a hand-made results file.

tests/data/results_small.jsonl: two models; dense rows; minillm (label `minillm_fo`, escaped in LaTeX)
listed before magnitude (the table reorders); a failed cell (random @ 50%); a cell with two seeds
(averaged, shown as mean ± sample standard deviation); a cell whose error was followed by a successful rerun (the rerun wins); a skipped task.
To refresh the golden files after an intended change:
    python -m suite table tests/data/results_small.jsonl --format md --out tests/data/results_small.md
    python -m suite table tests/data/results_small.jsonl --format latex --out tests/data/results_small.tex
"""
from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import pandas as pd
import pytest

from suite.cli import main
from suite.plots import FIGSIZE, DPI, make_figure
from suite.records import read_records
from suite.tables import latest, results_frame, to_csv, to_latex, to_markdown

DATA = Path(__file__).resolve().parent / "data"
RESULTS = DATA / "results_small.jsonl"


@pytest.fixture(scope="module")
def records():
    return read_records(RESULTS)


def test_markdown_matches_golden(records):
    assert to_markdown(records) == (DATA / "results_small.md").read_text()


def test_latex_matches_golden(records):
    text = to_latex(records)
    assert text == (DATA / "results_small.tex").read_text()
    assert "\\toprule" in text and "\\bottomrule" in text and "minillm\\_fo" in text and "20\\%" in text


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
    assert md[10].count("**155.00**") == 1 and md[11].count("**155.00 ± 7.07**") == 1  # a tie: both bold
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
    shown = f"{(0.58 + lead) * 100:.2f} ± {se_a * 100:.1f}"  # a limit was set: acc ± standard error by default
    assert (f"**{shown}**" in line) == bold and shown in line


def test_caps_caption_stderr_switch_and_latex_table_environment():
    records = [_record("a", 0.6, 0.07), _record("b", 0.5, 0.07)]
    md = to_markdown(records)
    assert "the first 4,096 tokens" in md and "the first 50 questions" in md and "128-token windows" in md
    assert "60.00 ± 7.0" in md and "± 7.0" not in to_markdown(records, stderr="off")
    unlimited = [_record("a", 0.6, 0.07, limit=None, max_tokens=None), _record("b", 0.5, 0.07, limit=None)]
    assert "±" not in to_markdown(unlimited).split("\n\n")[0] and "60.00 ± 7.0" in to_markdown(unlimited, stderr="on")
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
    frame = results_frame(records)
    row = frame[(frame["Model"] == "tiny-opt") & (frame["Method"] == "random")].iloc[0]
    assert row["Seeds"] == 2
    assert row["WikiText-2 std"] == pytest.approx(statistics.stdev(wiki))
    assert row["PIQA std"] == pytest.approx(statistics.stdev(piqa))
    md = next(line for line in to_markdown(records).splitlines() if "tiny-opt" in line and "| random" in line)
    assert f"**{statistics.mean(wiki):.2f} ± {statistics.stdev(wiki):.2f}**" in md  # bold on the mean
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


def test_csv_holds_raw_numbers(records):
    frame = pd.read_csv(io.StringIO(to_csv(records)))
    assert len(frame) == 10
    assert list(frame.columns)[:5] == ["Model", "Method", "Ratio", "Params", "WikiText-2"]
    row = frame[(frame["Model"] == "tiny-llama") & (frame["Method"] == "magnitude") & (frame["Ratio"] == 0.2)].iloc[0]
    assert (row["WikiText-2"], row["Score time (s)"], row["Params"]) == (140.5, 1.234, 800000)
    assert frame["Error"].fillna("").str.contains("boom").sum() == 1


def test_forward_only_methods_are_marked(records):
    """minillm (and bonsai) carry the forward-only mark and the caption explains it; others do not."""
    md = to_markdown(records)
    assert "| minillm_fo† " in md and "| magnitude† " not in md and "†: forward-only" in md
    assert "minillm\\_fo$^\\dagger$" in to_latex(records)
    assert "†" not in to_markdown([r for r in records if r.get("method") != "minillm"])


def test_empty_results():
    assert to_markdown([]) == "(no results)\n"


def test_table_command(tmp_path, capsys):
    out = tmp_path / "t.tex"
    assert main(["table", str(RESULTS), "--format", "latex", "--out", str(out)]) == 0
    assert out.read_text() == (DATA / "results_small.tex").read_text()
    assert main(["table", str(RESULTS)]) == 0
    assert capsys.readouterr().out == (DATA / "results_small.md").read_text()
    assert main(["table", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jsonl'}: results file not found"


# --------------------------------------------------------------------------- plots
def test_figure_lines_match_records(records):
    fig, axes = make_figure(records)
    ax_ppl, ax_mem = axes["wikitext2"], axes["memory"]
    lines = {line.get_label(): line for line in ax_ppl.get_lines()}
    assert ax_ppl.get_yscale() == "log"
    assert list(lines["minillm_fo (tiny-llama)"].get_xdata()) == [0.2, 0.5]
    assert list(lines["minillm_fo (tiny-llama)"].get_ydata()) == [130.0, 400.0]
    assert list(lines["random (tiny-llama)"].get_ydata()) == [180.123]  # the 50% cell failed
    assert list(lines["random (tiny-opt)"].get_ydata()) == [155.0]  # mean of two seeds
    (seed_dots,) = ax_ppl.collections  # ... and each seed as a dot: only that cell has several
    assert sorted(map(tuple, seed_dots.get_offsets().tolist())) == [(0.2, 150.0), (0.2, 160.0)]
    dense = lines["dense (tiny-opt)"]
    assert set(dense.get_ydata()) == {90.0} and dense.get_linestyle() != "-"
    assert len(lines) == 7
    ptb = {line.get_label(): list(line.get_ydata()) for line in axes["ptb"].get_lines()}
    assert ptb["minillm_fo (tiny-llama)"] == [205.0, 700.0]
    acc = {line.get_label(): list(line.get_ydata()) for line in axes["accuracy"].get_lines()}
    ok = [r for r in latest(records) if r.get("status", "ok") == "ok"]
    expect = {(r["model"], r["label"], r["ratio_target"]): 100 * r["zero_shot_mean"] for r in ok
              if r["label"] == "magnitude" and r["model"] == "tiny-llama"}
    assert acc["magnitude (tiny-llama)"] == pytest.approx([expect[("tiny-llama", "magnitude", 0.2)],
                                                           expect[("tiny-llama", "magnitude", 0.5)]])
    # memory: one bar per (method, ratio), not averaged: what scoring added; the labels: process peaks
    scored = [r for r in ok if (r.get("phases") or {}).get("score")]
    bars = sorted(round(p.get_height(), 6) for p in ax_mem.patches)
    cells = {}
    for r in scored:
        cells.setdefault((r["model"], r["label"], r["ratio_target"]), []).append(r["phases"]["score"])
    added = lambda ps: sum(p.get("peak_delta_mb", 0.0) for p in ps) / len(ps)
    assert bars == sorted(round(added(ps), 6) for ps in cells.values())
    totals = sorted(float(t.get_text().replace(",", "")) for t in ax_mem.texts)
    assert totals == sorted(round(sum(p["peak_mb"] for p in ps) / len(ps)) for ps in cells.values())
    assert len(ax_mem.patches) == len(cells) > len({k[:2] for k in cells})  # several ratios: several bars
    assert "tiny-llama" in fig._suptitle.get_text()
    legend = fig.legends[0]  # outside the panels: to the right of every axes
    fig.canvas.draw()
    right = max(ax.get_position().x1 for ax in axes.values())
    assert legend.get_window_extent().x0 / fig.bbox.width >= right


def test_figure_one_ratio_no_ptb_several_models_stays_readable():
    """The README's smoke grid: one ratio, no PTB, three models. Ticks are the grid's ratios, a corpus
    no record evaluated says so instead of an empty frame, models differ by marker (one point per line
    shows no line style), and the memory axis starts at 0."""
    records = [{"model": m, "method": meth, "label": meth, "ratio_target": r, "status": "ok",
                "perplexity": {"wikitext2": ppl}, "zero_shot_mean": None,
                "phases": {"score": {"peak_mb": 600.0, "peak_delta_mb": 0.0, "seconds": 0.1}} if r else {}}
               for m, meth, r, ppl in [("tiny-a", "dense", 0.0, 50.0), ("tiny-a", "random", 0.2, 90.0),
                                       ("tiny-b", "dense", 0.0, 60.0), ("tiny-b", "random", 0.2, 80.0)]]
    fig, axes = make_figure(records)
    assert list(axes["wikitext2"].get_xticks()) == [0.2]
    assert [t.get_text() for t in axes["ptb"].texts] == ["not evaluated in these records"]
    markers = {line.get_label(): line.get_marker() for line in axes["wikitext2"].get_lines() if "random" in line.get_label()}
    assert len(set(markers.values())) == 2
    assert axes["memory"].get_ylim()[0] == 0 and axes["memory"].get_ylim()[1] >= 1


def test_plot_command_writes_png(tmp_path):
    out = tmp_path / "fig.png"
    assert main(["plot", str(RESULTS), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
