"""How alike are the kept groups of the §2 runs? (results/notes/minillm.md §2, the noise control)

    python scripts/minillm_plans.py [RUNS_DIR] [RECIPE]    # default /tmp/mruns fmsout (the §2 --out dirs)

For each ratio-0.5 run of the recipe with a ZO or |N(0,1)| gradient: the groups (heads and channels)
it alone keeps, kept by none of the others, and those it alone removes, kept by all the others; and how
many of each the backprop run keeps. A run whose "gradient" is noise-like sits inside the noise runs'
spread on every count. Jaccard overlaps of each kept set with the backprop and no-gradient runs' too.
"""
import json
import sys
from pathlib import Path


def kept(run: Path) -> set:
    plan = json.loads((run / "plan.json").read_text())
    out = set()
    for i, layer in enumerate(plan["layers"]):
        out |= {("head", i, h) for h in layer["heads"]} | {("channel", i, c) for c in layer["channels"]}
    return out


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def main(root: Path, recipe: str) -> None:
    runs = {p.name: kept(p) for p in sorted(root.glob(f"minillm-{recipe}-*-0.5"))
            if "-zo" in p.name or "-noise" in p.name}
    backprop, none = (kept(root / f"minillm-{recipe}-{k}-0.5") for k in ("backprop", "none"))
    print("| run | kept | alone keeps (backprop keeps) | alone removes (backprop keeps) | J(backprop) | J(none) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, mine in runs.items():
        others = [v for k, v in runs.items() if k != name]
        alone_kept, alone_removed = mine - set.union(*others), set.intersection(*others) - mine
        print(f"| {name} | {len(mine):,} | {len(alone_kept)} ({len(alone_kept & backprop)}) | "
              f"{len(alone_removed)} ({len(alone_removed & backprop)}) | {jaccard(mine, backprop):.3f} | "
              f"{jaccard(mine, none):.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/mruns"), sys.argv[2] if len(sys.argv) > 2 else "fmsout")
