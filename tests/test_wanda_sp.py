"""Wanda-sp (baselines/wanda_sp.py): its group scores recomputed independently (tests/group_scores.py);
its fidelity to FLAP's sequential algorithm (`lib/prune.py::prune_wanda_sp`); the one-shot variant.

Fidelity: the reference below is its own plain-torch layer loop written from FLAP's description, not
the engine's layer pass (`suite.pruning.layerwise`) nor its statistics (`suite.pruning.activations`):

  - layer 0's inputs are the token embeddings of the calibration windows, with the model's own
    rotary table for positions 0..seqlen-1 and a causal additive mask (FLAP's Catcher captures the
    same from the model's forward);
  - for each layer in order: its windows are run one at a time (FLAP feeds one per forward) with
    hooks on o_proj and down_proj accumulating sum_tokens x_j^2; column score
    s_j = mean_i |W_ij| · sqrt(sum x_j^2), a head's score the sum of its head_dim columns;
    the layer's lowest-scoring heads (GQA q-head mode: the same number within every kv group) and
    channels are removed by zeroing their o_proj / down_proj input columns (exactly equal to
    removing them), and the layer's outputs are recomputed WITH the removal for the next layer
    (`inps, outs = outs, inps` after the second pass).

FLAP's per-layer count is int(ratio · n) of heads and channels; the suite's budget counts each
group's parameters over the whole model, so the reference takes the suite's per-layer counts
(`select.layer_scope_allocation`, shapes only).

The variant: `wanda-sp` is sequential by default; `sequential=false` is the one-shot variant, named as
such in grid labels, records (`variant`) and tables, and it keeps other layers' choices than the default.
"""
import copy

import pytest
import torch

from baselines import wanda_sp
from suite.config import expand_cells, load_config
from suite.data import calibration_windows
from suite.pipeline import outcome_record, prune
from suite.pruning.select import layer_scope_allocation
from suite.tables import results_frame
from tests.group_scores import CASES, close, output_inputs, output_weights, run, windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,mode", CASES)
def test_wanda_sp_scores(models, name, mode):
    model, ids = models(name), windows()
    xs = output_inputs(model, ids)
    want = {}
    for i, kind, count, width, w in output_weights(model, mode):
        x_norm = xs[(i, kind)].pow(2).sum(0).sqrt()                # ||X_j||_2 over all tokens
        s = (w.abs() * x_norm[None, :]).mean(0)                    # Wanda Eq. 1, mean over rows (FLAP)
        want[(i, kind)] = s.view(count, width).sum(1)
    close(run(wanda_sp, model, ids, mode).scores, want)


# ----------------------------------------------------------------------- fidelity to FLAP's sequential loop
RATIOS = (0.2, 0.5)


def _causal_mask(seqlen: int, dtype) -> torch.Tensor:
    mask = torch.full((seqlen, seqlen), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def _lowest(scores: torch.Tensor, n_remove: int, groups: int = 1) -> set[int]:
    """Indices of the n_remove lowest scores; with `groups` > 1, n_remove/groups within each block."""
    per, k = scores.numel() // groups, n_remove // groups
    out = set()
    for g in range(groups):
        order = sorted(range(per), key=lambda j: (float(scores[g * per + j]), j))
        out |= {g * per + j for j in order[:k]}
    return out


def flap_wanda_sp(model, windows: torch.Tensor, counts: dict) -> dict:
    """{layer: (kept heads, kept channels)} of FLAP's prune_wanda_sp loop on `model` (masked in place)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nkv, nheads = cfg.num_key_value_heads, cfg.num_attention_heads
    decoder = model.model
    seqlen = windows.shape[1]
    position_ids = torch.arange(seqlen)[None]
    kept = {}
    with torch.no_grad():
        inps = [decoder.embed_tokens(w[None]) for w in windows]
        rotary = decoder.rotary_emb(inps[0], position_ids)
        mask = _causal_mask(seqlen, inps[0].dtype)

        def run(layer):
            outs = []
            for x in inps:
                out = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary,
                            use_cache=False)
                outs.append(out[0] if isinstance(out, tuple) else out)
            return outs

        for i, layer in enumerate(decoder.layers):
            o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
            sq = {"o": torch.zeros(o_proj.in_features, dtype=torch.float64),
                  "down": torch.zeros(down.in_features, dtype=torch.float64)}

            def hook(name):
                def add(module, args):
                    x = args[0].double().reshape(-1, args[0].shape[-1])
                    sq[name] += (x * x).sum(0)
                return add

            handles = [o_proj.register_forward_pre_hook(hook("o")), down.register_forward_pre_hook(hook("down"))]
            run(layer)
            for h in handles:
                h.remove()
            heads = (o_proj.weight.double().abs() * sq["o"].sqrt()).mean(0).view(nheads, head_dim).sum(1)
            chans = (down.weight.double().abs() * sq["down"].sqrt()).mean(0)
            removed_heads = _lowest(heads, counts[(i, "heads")], groups=nkv if nkv < nheads else 1)
            removed_chans = _lowest(chans, counts[(i, "channels")])
            for h in removed_heads:
                o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            down.weight[:, sorted(removed_chans)] = 0
            kept[i] = ([h for h in range(nheads) if h not in removed_heads],
                       [c for c in range(down.in_features) if c not in removed_chans])
            inps = run(layer)          # the pruned layer's outputs feed layer i+1
    return kept


def assert_same_as_flap(model, tokenizer, nsamples: int, seqlen: int, ratios) -> None:
    """Every layer's kept heads and channels of `wanda-sp` (default: sequential) equal the reference
    loop's; the one-shot variant's differ somewhere (so the comparison can fail)."""
    windows = calibration_windows(tokenizer, "c4", nsamples, seqlen, seed=0)
    calib = {"nsamples": nsamples, "seqlen": seqlen}
    for ratio in ratios:
        budget = layer_scope_allocation(model, ratio, head_mode="q-head")
        assert sum(budget.counts.values()) > 0
        reference = flap_wanda_sp(copy.deepcopy(model), windows, budget.counts)
        suite = prune(copy.deepcopy(model), tokenizer, "wanda-sp", ratio, seed=0, calib=calib).selection.plan
        ours = {i: (sorted(lp.heads), sorted(lp.channels)) for i, lp in enumerate(suite.layers)}
        assert ours == reference, ratio
        one_shot = prune(copy.deepcopy(model), tokenizer, "wanda-sp", ratio, seed=0, calib=calib,
                         options={"sequential": False}).selection.plan
        differ = sum(sorted(lp.channels) != reference[i][1] for i, lp in enumerate(one_shot.layers))
        assert differ > 0, ratio


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-gqa"])
def test_wanda_sp_keeps_what_flaps_loop_keeps_on_tiny_llama(name):
    """The same check on the seeded tiny LLaMAs (MHA, GQA q-head), 8 windows of 32 tokens."""
    from suite.models import load_model, load_tokenizer

    assert_same_as_flap(load_model(name), load_tokenizer(name), 8, 32, (0.3,))


@pytest.mark.slow
@pytest.mark.fidelity  # ~70 min on busy shared cores: `tox -e fidelity`, not in CI (results/notes/layerwise.md)
def test_wanda_sp_keeps_what_flaps_sequential_loop_keeps(smollm2):
    """SmolLM2-135M, 128 x 128 C4 windows (the suite's sampler, seed 0), ratios 0.2 and 0.5."""
    model, tokenizer = smollm2
    assert_same_as_flap(model, tokenizer, 128, 128, RATIOS)


# --------------------------------------------------------------------------- the one-shot variant
VARIANT_GRID = """name: t
models: [tiny-llama]
methods: [wanda-sp, {name: wanda-sp, options: {sequential: false}}, {name: wanda-sp, label: mine, options: {sequential: false, batch_size: 2}}, flap]
ratios: [0.3]
"""


def test_grid_labels_name_the_one_shot_variant(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(VARIANT_GRID)
    config = load_config(path)
    assert [m["label"] for m in config["methods"]] == ["wanda-sp", "wanda-sp (one-shot)", "mine", "flap"]
    cells = [c for c in expand_cells(config) if c["method"] != "dense"]
    assert [c["label"] for c in cells] == ["wanda-sp", "wanda-sp (one-shot)", "mine", "flap"]


def test_records_and_table_name_the_variant():
    from suite.models import load_model, load_tokenizer

    tok = load_tokenizer("tiny-llama")
    records, plans = [], {}
    for label, options in (("wanda-sp", {}), ("wanda-sp (one-shot)", {"sequential": False})):
        outcome = prune(load_model("tiny-llama"), tok, "wanda-sp", 0.3, options=options,
                        calib={"nsamples": 4, "seqlen": 32})
        record = outcome_record(outcome, 0.3)
        assert record["variant"] == ("one-shot" if options else "sequential")
        assert record["method_info"]["sequential"] is not bool(options)
        plans[label] = [(lp.heads, lp.channels) for lp in outcome.selection.plan.layers]
        records.append({"model": "tiny-llama", "method": "wanda-sp", "label": label, "status": "ok",
                        "perplexity": {"wikitext2": 10.0}, **record})
    assert plans["wanda-sp"][0] == plans["wanda-sp (one-shot)"][0]   # layer 0: same dense inputs
    assert plans["wanda-sp"] != plans["wanda-sp (one-shot)"]         # later layers see the pruned ones
    assert list(results_frame(records)["Method"]) == ["wanda-sp", "wanda-sp (one-shot)"]


def test_sequential_refuses_global_scope():
    from suite.pruning.errors import UserError
    from suite.models import load_model, load_tokenizer

    with pytest.raises(UserError, match="needs --opt sequential=false"):
        prune(load_model("tiny-llama"), load_tokenizer("tiny-llama"), "wanda-sp", 0.3, scope="global",
              calib={"nsamples": 2, "seqlen": 16})
