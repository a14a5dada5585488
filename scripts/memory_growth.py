"""Score-phase peak vs calibration windows (issue 11, "how memory grows"): results/notes/memory-growth.md.

    PYTHONPATH=. MINILLM_DATA=... OMP_NUM_THREADS=1 python scripts/memory_growth.py [OUTDIR]

Runs `python -m suite prune --model smollm2-135m --method M --ratio 0.2 --nsamples N --seqlen 128`
for wanda-sp (sequential, the default) and flap at 8, 32 and 128 windows into OUTDIR/M-N (default
/tmp/i11m-growth; a directory that already has its pruning.json is not rerun), then prints one
markdown table: the score phase's VmHWM peak (`phases.score.peak_mb` of pruning.json, MiB), the fp32
weights (the model's parameter count × 4, from its meta-device shapes), their difference, and what
`suite/memory_model.py` predicts for the same cell. The llm-pruner and minillm rows are measurements
taken from results/notes/memory-backprop.md and results/notes/minillm-layerwise.md (same code),
not rerun here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from suite import memory_model as mm

MODEL, SEQLEN, RATIO = "smollm2-135m", 128, 0.2
RUN = [("wanda-sp", {}), ("flap", {})]
WINDOWS = (8, 32, 128)
# measured elsewhere (score peak MiB): (method, windows, options) -> (peak, source)
REUSED = {
    ("llm-pruner", 8, ""): (2257, "memory-backprop.md"),
    ("llm-pruner", 32, ""): (2283, "memory-backprop.md"),
    ("llm-pruner", 128, ""): (2307, "memory-backprop.md"),
    ("minillm", 8, "directions=16"): (1086.7, "minillm-layerwise.md"),
    ("minillm", 32, "directions=16"): (1278.3, "minillm-layerwise.md"),
    ("minillm", 128, "directions=2"): (1176.2, "minillm-layerwise.md"),
}


def run(out: Path, method: str, n: int) -> dict:
    where = out / f"{method}-{n}"
    if not (where / "pruning.json").is_file():
        cmd = [sys.executable, "-m", "suite", "prune", "--model", MODEL, "--method", method, "--ratio", str(RATIO),
               "--nsamples", str(n), "--seqlen", str(SEQLEN), "--out", str(where), "--force", "--quiet"]
        print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=os.environ)
    return json.loads((where / "pruning.json").read_text())["phases"]["score"]


def predicted(shapes, method: str, n: int, opts: dict) -> float:
    cell = {"model": MODEL, "method": method, "options": opts, "ratio": RATIO, "device": "cpu", "dtype": "float32",
            "calibration": {"nsamples": n, "seqlen": SEQLEN}, "evaluation": {"perplexity": [], "throughput": False}}
    return mm.predict(cell, shapes)["score"] / mm.MiB


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/i11m-growth")
    mm.CONSTANTS["minillm_layerwise"] = True
    shapes = mm.shapes(MODEL)
    weights = shapes.params * 4 / mm.MiB
    stream = SEQLEN * shapes.hidden * 4 / mm.MiB  # one hidden-state stream per window (MiB)
    rows = []
    for method, opts in RUN:
        for n in WINDOWS:
            phase = run(out, method, n)
            rows.append((method, "", n, phase["peak_mb"], "this note", phase["peak_delta_mb"], phase["seconds"], opts))
    for (method, n, opt), (peak, source) in REUSED.items():
        opts = dict([opt.split("=")]) if opt else {}
        rows.append((method, opt, n, peak, source, None, None, {k: int(v) for k, v in opts.items()}))
    print(f"weights: {shapes.params:,} parameters x 4 B = {weights:.1f} MiB; one stream: {stream:.3f} MiB per window\n")
    print("| method | options | windows | score peak MiB | weights MiB | peak − weights MiB | predicted peak MiB "
          "| predicted − weights MiB | error % | source |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for method, opt, n, peak, source, _, _, opts in rows:
        pred = predicted(shapes, method, n, opts)
        print(f"| {method} | {opt or 'default'} | {n} | {peak:,.0f} | {weights:.0f} | {peak - weights:,.0f} "
              f"| {pred:,.0f} | {pred - weights:,.0f} | {100 * (pred / peak - 1):+.1f} | {source} |")
    print("\nthis note's runs (peak_delta_mb, score seconds on busy shared cores):")
    for method, _, n, peak, source, delta, seconds, _ in rows:
        if delta is not None:
            print(f"  {method} {n}: peak_delta {delta} MiB, {seconds} s")


if __name__ == "__main__":
    main()
