"""Markdown tables of results/notes/minillm.md from the records in results/zo/ (not part of the suite).

    python results/zo/tables.py ppl     # perplexity / scoring time / memory per method and ratio
    python results/zo/tables.py tune    # the tuning log (results/zo/tune.jsonl)
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROWS = [  # (record name, row label); ratios 0.2 and 0.5 side by side
    ("random", "random"), ("magnitude", "magnitude"), ("wanda-sp", "wanda-sp"), ("flap", "flap"),
    ("llm-pruner", "llm-pruner (backprop)"),
    ("minillm-weight-zo", "**minillm weight zo (paper)**"), ("minillm-weight-none", "minillm weight none"),
    ("minillm-weight-backprop", "minillm weight backprop"),
    ("minillm-mask-zo", "minillm mask zo"), ("minillm-mask-backprop", "minillm mask backprop"),
    ("minillm-layer-zo", "minillm layer zo"), ("minillm-layer-backprop", "minillm layer backprop"),
    ("minillm-fmsout-zo", "minillm fmsout zo"), ("minillm-fmsout-zo-seed1", "minillm fmsout zo, ZO seed 1"),
    ("minillm-fmsout-zo-seed2", "minillm fmsout zo, ZO seed 2"),
    ("minillm-fmsout-none", "minillm fmsout none"), ("minillm-fmsout-backprop", "minillm fmsout backprop"),
    ("minillm-fmsl2-zo", "minillm fmsl2 zo"), ("minillm-fmsl2-zo-seed1", "minillm fmsl2 zo, ZO seed 1"),
    ("minillm-fmsl2-none", "minillm fmsl2 none"),
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


if __name__ == "__main__":
    {"ppl": ppl_table, "tune": tune_table}[sys.argv[1] if len(sys.argv) > 1 else "ppl"]()
