"""SliceGPT fidelity: the suite's `rotate_and_slice` against the authors' code run as-is, on SmolLM2-135M.

Three steps, each its own process (the authors' code needs transformers 4.41, the suite 5.x):

  # 1. the suite (its environment): calibration and evaluation windows, the dense weights, our slicing
  python scripts/slicegpt_fidelity.py ours   WORK --width 432 --nsamples 64 --seqlen 128 --eval-tokens 16384
  # 2. the authors' code (microsoft/TransformerCompression src/slicegpt, transformers==4.41.0 and its
  #    pins installed with `pip --target` OUTSIDE this repository), on the same windows and weights
  PYTHONPATH=SITE:CHECKOUT/src python scripts/slicegpt_fidelity.py theirs WORK --width 432
  # 3. the comparison: per PCA, the projector onto the kept directions; perplexities
  python scripts/slicegpt_fidelity.py compare WORK --out results/runs/slicegpt-fidelity-smollm2.jsonl
  # 1b/3b. the same with the embedding rows centred as the authors' fuse_modules does for every family
  python scripts/slicegpt_fidelity.py ours WORK --width 432 ... --centre-embeddings
  python scripts/slicegpt_fidelity.py compare WORK --centre-embeddings --out ...

Step 2 builds transformers-4.41's LlamaForCausalLM from the saved config and weights and calls the
authors' `replace_layers`, `fuse_modules` and `rotate_and_slice` (ConstSlicingScheduler(width),
final_orientation "pca") unchanged; `rotate.pca_calc` is wrapped only to record the bases it returns.
Their package imports `datasets` at the top of `data_utils.py` (2.18 pinned), which is not used here
(the windows come from step 1): a placeholder module stands in for it in that process. Perplexity:
exp of the mean next-token cross-entropy over the same WikiText-2 test windows, one function for both.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def nll_perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over [n, seqlen] windows (float64 accumulation)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows.split(batch):
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            total += float(loss.double())
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def ours(args) -> None:
    from safetensors.torch import save_file

    from suite.data import calibration_windows, eval_windows
    from suite.models import load_model, load_tokenizer
    from suite.pruning.rotation import rotate_and_slice

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    model = load_model("smollm2-135m", dtype=torch.float32).to(dtype).eval()  # the suite loads fp32 at most
    tokenizer = load_tokenizer("smollm2-135m")
    windows = calibration_windows(tokenizer, "c4", args.nsamples, args.seqlen, seed=0)
    evaluation = eval_windows(tokenizer, "wikitext2", args.seqlen, max_tokens=args.eval_tokens)
    c = model.config
    config = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_parameters["rope_theta"], "max_position_embeddings": c.max_position_embeddings,
              "tie_word_embeddings": c.tie_word_embeddings}
    (work / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, work / "dense.safetensors")
    save_file({"calibration": windows, "evaluation": evaluation}, work / "windows.safetensors")
    dense_ppl = nll_perplexity(model, evaluation) if not args.centre_embeddings else None
    done = rotate_and_slice(model, windows, args.width, keep_bases=True, centre_embeddings=args.centre_embeddings)
    tag = "-centred" if args.centre_embeddings else ""
    save_file({f"q{i}": q.contiguous() for i, q in enumerate(done.bases)}, work / f"ours{tag}-bases.safetensors")
    (work / f"ours{tag}.json").write_text(json.dumps({"dense_ppl": dense_ppl, "centre_embeddings": args.centre_embeddings, "sliced_ppl": nll_perplexity(model, evaluation),
                                                "width": args.width, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                                "eval_windows": list(evaluation.shape)}))


def theirs(args) -> None:
    import importlib.machinery
    import types

    from safetensors.torch import load_file, save_file

    placeholder = types.ModuleType("datasets")  # data_utils.py's top-level import; nothing of it runs here
    placeholder.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    placeholder.Dataset = placeholder.DatasetDict = object
    sys.modules.setdefault("datasets", placeholder)
    import transformers
    from slicegpt import layernorm_fusion, rotate
    from slicegpt.adapters.llama_adapter import LlamaModelAdapter
    from slicegpt.slicing_scheduler import ConstSlicingScheduler

    work = Path(args.work)
    config = json.loads((work / "config.json").read_text())
    dtype = getattr(torch, args.dtype)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, torch_dtype=dtype)).to(dtype).eval()
    state = load_file(work / "dense.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    windows = load_file(work / "windows.safetensors")
    dense_ppl = nll_perplexity(model, windows["evaluation"])
    adapter = LlamaModelAdapter(model)
    recorded = []
    original = rotate.pca_calc

    def recording(*a, **k):
        values, vectors = original(*a, **k)
        recorded.append(vectors.detach().cpu().clone())
        return values, vectors

    rotate.pca_calc = recording
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
    fused_ppl = nll_perplexity(model, windows["evaluation"])
    calibration = windows["calibration"]
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calibration.split(args.batch)]
    rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(args.width), final_orientation="pca")
    save_file({f"q{i}": q.contiguous() for i, q in enumerate(recorded)}, work / "theirs-bases.safetensors")
    (work / "theirs.json").write_text(json.dumps({
        "dense_ppl": dense_ppl, "fused_ppl": fused_ppl, "sliced_ppl": nll_perplexity(model, windows["evaluation"]),
        "transformers": transformers.__version__, "width": args.width}))


def compare(args) -> None:
    from safetensors.torch import load_file

    work = Path(args.work)
    tag = "-centred" if args.centre_embeddings else ""
    a, b = load_file(work / f"ours{tag}-bases.safetensors"), load_file(work / "theirs-bases.safetensors")
    mine, their = json.loads((work / f"ours{tag}.json").read_text()), json.loads((work / "theirs.json").read_text())
    width = mine["width"]
    errors = []
    for i in range(len(a)):
        p = a[f"q{i}"][:, :width].double()
        q = b[f"q{i}"][:, :width].double()
        P, R = p @ p.T, q @ q.T
        errors.append(float((P - R).norm() / R.norm()))
    record = {"subject": "slicegpt fidelity", "model": "smollm2-135m", "width": width, "dtype": args.dtype,
              "centre_embeddings": args.centre_embeddings,
              "slicing": round(1 - width / a["q0"].shape[0], 6), "calibration": {"corpus": "c4",
              "nsamples": mine["nsamples"], "seqlen": mine["seqlen"]}, "eval_windows": mine["eval_windows"],
              "bases": len(a), "projector_rel_frobenius_max": max(errors),
              "projector_rel_frobenius": [round(e, 8) for e in errors],
              "ppl": {"ours_dense": mine["dense_ppl"], "theirs_dense": their["dense_ppl"],
                      "theirs_fused": their["fused_ppl"], "ours_sliced": mine["sliced_ppl"],
                      "theirs_sliced": their["sliced_ppl"]},
              "ppl_sliced_rel_diff": abs(mine["sliced_ppl"] - their["sliced_ppl"]) / their["sliced_ppl"],
              "theirs_transformers": their["transformers"]}
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["ours", "theirs", "compare"])
    parser.add_argument("work", help="a scratch folder outside the repository")
    parser.add_argument("--width", type=int, default=432)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=16, help="their calibration batch (--cal-batch-size)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="ours/theirs: the model's dtype (float64: how much of a difference is fp32 rounding)")
    parser.add_argument("--centre-embeddings", action="store_true",
                        help="ours/compare: centre the embedding rows as the authors' fuse_modules does for every family")
    args = parser.parse_args()
    {"ours": ours, "theirs": theirs, "compare": compare}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
