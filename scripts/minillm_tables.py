"""Markdown tables of results/notes/minillm.md from the records in results/zo/ (not part of the suite).

    python scripts/minillm_tables.py ppl     # perplexity / scoring time / memory per method and ratio
    python scripts/minillm_tables.py tune    # the tuning log (results/zo/tune.jsonl)
    python scripts/minillm_tables.py control # ZO seeds against |N(0,1)| seeds, with an exact rank-sum test
"""
import json
import sys
from pathlib import Path

from scipy.stats import mannwhitneyu

HERE = Path(__file__).resolve().parents[1] / "results" / "zo"  # the records: results/zo/ppl/, tune.jsonl
ROWS = [  # (record name, row label); ratios 0.2 and 0.5 side by side
    ("random", "random"), ("magnitude", "magnitude"), ("wanda-sp", "wanda-sp"), ("flap", "flap"),
    ("llm-pruner", "llm-pruner (backprop)"),
    ("minillm-weight-zo", "**minillm weight zo (paper)**"), ("minillm-weight-none", "minillm weight none"),
    ("minillm-weight-backprop", "minillm weight backprop"),
    ("minillm-mask-zo", "minillm mask zo"), ("minillm-mask-backprop", "minillm mask backprop"),
    ("minillm-layer-zo", "minillm layer zo"), ("minillm-layer-backprop", "minillm layer backprop"),
    ("minillm-fmsout-zo", "minillm fmsout zo"), ("minillm-fmsout-zo-seed1", "minillm fmsout zo, ZO seed 1"),
    ("minillm-fmsout-zo-seed2", "minillm fmsout zo, ZO seed 2"),
    ("minillm-fmsout-none", "minillm fmsout none"),
    ("minillm-fmsout-noise", "minillm fmsout noise (N(0, 1); seeds 1–4: control table)"),
    ("minillm-fmsout-backprop", "minillm fmsout backprop"),
    ("minillm-fmsl2-zo", "minillm fmsl2 zo"), ("minillm-fmsl2-zo-seed1", "minillm fmsl2 zo, ZO seed 1"),
    ("minillm-fmsl2-zo-seed2", "minillm fmsl2 zo, ZO seed 2"),
    ("minillm-fmsl2-none", "minillm fmsl2 none"),
    ("minillm-fmsl2-noise", "minillm fmsl2 noise (N(0, 1); seeds 1–4: control table)"),
]


def load(name):
    ppl, rec = HERE / "ppl" / f"{name}.json", HERE / "ppl" / f"{name}.pruning.json"
    if not ppl.exists():
        return None
    out = {"ppl": json.loads(ppl.read_text())["perplexity"]}
    if rec.exists():
        r = json.loads(rec.read_text())
        out["score"] = r["phases"]["score"]
        out["achieved"] = r["params"]["pruned"] / r["params"]["dense"]
    return out


def fmt(x):
    return "–" if x is None else (f"{x:,.0f}" if x >= 1000 else f"{x:.2f}")


def ppl_table():
    dense = load("dense")["ppl"]
    print("| method | 0.2: WikiText-2 | PTB | score s | 0.5: WikiText-2 | PTB | score s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| dense | {fmt(dense['wikitext2'])} | {fmt(dense['ptb'])} | | | | |")
    for name, label in ROWS:
        cells = []
        for ratio in ("0.2", "0.5"):
            r = load(f"{name}-{ratio}")
            if r is None:
                cells += ["–"] * 3
                continue
            s = r.get("score")
            cells += [fmt(r["ppl"]["wikitext2"]), fmt(r["ppl"]["ptb"]),
                      f"{s['seconds']:.1f}" if s else "–"]
        if any(c != "–" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


def tune_table():
    rows = [json.loads(line) for line in open(HERE / "tune.jsonl")]
    print("| label | options (besides defaults) | n | scope | λ | ratio | PTB | C4 | heads kept | score s |")
    print("|---|---|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        o = " ".join(f"{k}={v}" for k, v in r["options"].items())
        if r["method"] != "minillm":
            o = f"method={r['method']}"
        lam = r.get("lam") if r.get("lam") is not None else "-"
        print(f'| {r["label"]} | {o} | {r["n"]} | {r["scope"]} | {lam} | {r["ratio"]} | {r["ptb"]:,.1f} | '
              f'{r["c4"]:,.1f} | {sum(r["heads"])} | {r["score_s"]} |')


def seeds(name, ratio):
    """Perplexities of every seed of a record name: NAME-R, NAME-seed1-R, NAME-seed2-R, ..."""
    found = [load(f"{name}-{ratio}")] + [load(f"{name}-seed{k}-{ratio}") for k in range(1, 10)]
    return [r["ppl"] for r in found if r is not None]


def control_table(ratio="0.5"):
    print("| recipe | gradient | seeds | WikiText-2 (each seed) | PTB (each seed) |")
    print("|---|---|---:|---|---|")
    tests = []
    for recipe in ("fmsout", "fmsl2"):
        runs = {kind: seeds(f"minillm-{recipe}-{kind}", ratio) for kind in ("zo", "noise", "none", "backprop")}
        for kind, found in runs.items():
            if found:
                cols = [", ".join(fmt(r[c]) for r in found) for c in ("wikitext2", "ptb")]
                print(f"| {recipe} | {kind} | {len(found)} | {cols[0]} | {cols[1]} |")
        if runs["zo"] and runs["noise"]:
            # exact one-sided rank-sum (Mann-Whitney) p: ZO ranking this low among ZO + noise by chance
            tests.append((recipe, *(mannwhitneyu([r[c] for r in runs["zo"]], [r[c] for r in runs["noise"]],
                                                 alternative="less", method="exact").pvalue
                                    for c in ("wikitext2", "ptb"))))
    for recipe, pw, pp in tests:
        print(f"\n{recipe}, ratio {ratio}: P(ZO seeds rank this low among ZO + noise seeds by chance) = "
              f"{pw:.3f} (WikiText-2), {pp:.3f} (PTB)")


if __name__ == "__main__":
    {"ppl": ppl_table, "tune": tune_table, "control": control_table}[sys.argv[1] if len(sys.argv) > 1 else "ppl"]()
