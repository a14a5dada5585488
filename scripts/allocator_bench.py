"""Score-phase time and peak RSS of one method under a given glibc allocator setting (a helper for
results/notes/harness.md, not part of the suite).

    python scripts/allocator_bench.py MODE METHOD [DIRECTIONS] >> results/runs/allocator-COMMIT.jsonl   # one JSON line

MODE: `default` (glibc's dynamic mmap threshold), `T<bytes>` (threshold pinned, as
`suite.measure.steady_allocator` does with 1 MB), `trim` (default threshold, `malloc_trim(0)` at
every phase start), or `T<bytes>+trim`. Each run is its own process on SmolLM2-135M at ratio 0.2
with the method's documented calibration, as a grid cell's score phase.
"""
import ctypes
import json
import sys

import suite.measure

mode, method = sys.argv[1], sys.argv[2]
directions = int(sys.argv[3]) if len(sys.argv) > 3 else 2
libc = ctypes.CDLL(None)
for part in mode.split("+"):
    if part.startswith("T"):  # before anything large is allocated
        assert suite.measure.steady_allocator(int(part[1:]))

if "trim" in mode:
    reset = suite.measure._reset_hwm

    def trimmed_reset():
        libc.malloc_trim(0)
        return reset()

    suite.measure._reset_hwm = trimmed_reset

from suite.models import load_model, load_tokenizer  # noqa: E402
from suite.pipeline import prune  # noqa: E402
from suite.records import provenance  # noqa: E402

model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
options = {"directions": directions} if method == "minillm" else {}
outcome = prune(model, tokenizer, method, 0.2, options=options)
print(json.dumps({"mode": mode, "method": method, "options": options, "score": outcome.phases["score"],
                  "calibrate_peak_mb": outcome.phases.get("calibrate", {}).get("peak_mb"),  # None: data-free
                  "provenance": provenance({"mode": mode, "method": method}, 0)}))
