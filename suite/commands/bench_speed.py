"""`python -m suite bench-speed --model DENSE --pruned DIR[,DIR...] [--runs 5]`: pruned-vs-dense speed.

Each run is one interleaved comparison (suite/speed.py `compare`): the dense model, every pruned
model and a second copy of the dense model (the control) timed in `--rounds` rotated rounds of
prefill and per-token decode blocks; the speed-ups and the dense/dense control are medians of the
per-round ratios, with their IQR. Prints per run and pruned model the speed-ups and the control
(the same for every pruned model of a run); `--json OUT` writes every timing. The control says how
far two timings of the same model drift apart on this machine at this moment: run it on idle cores.
"""
from __future__ import annotations

from suite.precision import add_dtype_argument

NAME = "bench-speed"
HELP = "pruned vs dense prefill and decode speed, with a dense/dense control (interleaved rounds)"


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the dense model (name, directory, .gguf or hub id)")
    parser.add_argument("--pruned", required=True, help="comma list of pruned directories (`suite prune --out`)")
    parser.add_argument("--runs", type=int, default=5, help="independent comparisons (default 5)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per run (default 8)")
    parser.add_argument("--block-s", type=float, default=0.5,
                        help="seconds a dense block of calls should take (>= 1 call; default 0.5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model and regime per run (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per prefill / decode step (default 4)")
    parser.add_argument("--seqlen", type=int, default=128, help="prefill length in tokens (default 128)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    add_dtype_argument(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="write every timing here (atomically)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "ffn_dim", "word_embed_proj_dim")


def base_mismatch(dense, pruned) -> str | None:
    """Why `pruned` was not pruned from `dense`, or None. A pruned model's config is its dense
    model's (suite/pruning/saving.py), so the dense shape fields must agree; pruning and LoRA recovery never
    touch the input embeddings, so they must be equal too (this catches another model of the same shapes).
    Depth: a model that lost whole layers has fewer; its plan (original numbering) has the dense count."""
    import torch

    from suite.pruning.plan import carried_plan

    plan = carried_plan(pruned)
    depth = len(plan.layers) if plan is not None else pruned.config.num_hidden_layers
    if depth != dense.config.num_hidden_layers:
        return f"its dense num_hidden_layers is {depth}, the dense model's {dense.config.num_hidden_layers}"
    for key in SHAPE_KEYS:
        mine, theirs = getattr(pruned.config, key, None), getattr(dense.config, key, None)
        if mine is not None and theirs is not None and mine != theirs:
            return f"its dense {key} is {mine}, the dense model's {theirs}"
    a, b = pruned.get_input_embeddings().weight, dense.get_input_embeddings().weight
    if a.shape != b.shape or not torch.equal(a, b):
        return "its input embeddings differ from the dense model's (pruning keeps them whole)"
    return None


def _recorded_base(path) -> str | None:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(path) / "pruning.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


def run(args) -> int:
    import copy

    import torch

    from suite.pruning.errors import UserError
    from suite.data import eval_windows
    from suite.models import load_model, load_tokenizer
    from suite.records import provenance, write_json_atomic
    from suite.speed import compare

    if min(args.runs, args.rounds, args.batch_size, args.threads or 1) < 1 or args.seqlen < 2 or args.block_s <= 0 \
            or args.warmup < 0:
        raise UserError("--runs, --rounds, --batch-size and --threads must be >= 1, --seqlen >= 2, "
                        "--block-s > 0, --warmup >= 0")
    pruned_dirs = [p.strip() for p in args.pruned.split(",") if p.strip()]
    if not pruned_dirs or len(set(pruned_dirs)) < len(pruned_dirs):
        raise UserError("--pruned: one or more distinct directories, comma separated")
    # Every timed model in freshly allocated memory (`copy.deepcopy`): a loaded model's untouched
    # tensors may still be pages of its memory-mapped safetensors file, a copy's are not. On idle
    # cores, with the loaded dense model timed against its copy, every decode control came out above 1
    # (+1.4 to +3.3 %, results/notes/precision.md 5.3).
    dense = copy.deepcopy(load_model(args.model, dtype=args.dtype, device=args.device))
    dense_again = copy.deepcopy(dense)  # the control: the dense weights in their own storage, like a pruned model
    pruned = {}
    for p in pruned_dirs:  # each checked against the dense model before anything is timed
        model = load_model(p, dtype=args.dtype, device=args.device)
        if why := base_mismatch(dense, model):
            raise UserError(f"--pruned {p} was not pruned from --model {args.model}: {why}"
                            + (f" (pruning.json names {base})" if (base := _recorded_base(p)) else ""))
        pruned[p] = copy.deepcopy(model)
    windows = eval_windows(load_tokenizer(args.model), "wikitext2", args.seqlen,
                           max_tokens=args.batch_size * args.seqlen)
    threads = args.threads or torch.get_num_threads()
    kw = dict(batch_size=args.batch_size, rounds=args.rounds, block_s=args.block_s, warmup=args.warmup,
              threads=threads, dense_again=dense_again)
    runs = []
    print(f"threads {threads}, {args.rounds} rounds per run; medians of per-round ratios (IQR)")
    print(f"{'pruned':<32} {'run':>3} {'prefill x':>15} {'control':>15} {'decode x':>15} {'control':>15}")
    cell = lambda r, key: f"{r[key]:.3f} ({r[key + '_iqr']:.3f})"  # noqa: E731
    for run_index in range(args.runs):
        r = compare(dense, pruned, windows, **kw)
        runs.append(r)
        for path, s in r["speedups"].items():
            print(f"{path[-32:]:<32} {run_index:>3} {cell(s, 'prefill_speedup'):>15} "
                  f"{cell(r, 'prefill_dense_control'):>15} {cell(s, 'decode_speedup'):>15} "
                  f"{cell(r, 'decode_dense_control'):>15}", flush=True)
    if args.json:
        from pathlib import Path

        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json_atomic(Path(args.json), {"kind": "bench-speed", "model": args.model, "pruned": pruned_dirs,
                                            "config": config, "runs": runs,
                                            "provenance": provenance(config=config, seed=0)})
        print(f"wrote {args.json}")
    return 0
