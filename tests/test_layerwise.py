"""The layer runner (suite/pruning/layerwise.py) equals a whole-model pass.

Reference, independent of the runner and of suite/pruning/activations.py: forward pre-hooks on every
group member's Linear during ONE ordinary `model(input_ids)` forward of all windows at once,
accumulating per input feature sum x and sum x^2 in float64. The runner's statistics
(`activations.input_stats`, layer by layer, micro-batches of 2 windows, the last one shorter)
must match within 1e-5 relative (max abs difference / max abs reference value, per tensor).
Also: logits through `LayerPass.finish` + the output head equal the model's logits, on every tiny
family; hidden states carried on "cpu" give the same.
"""
import pytest
import torch

from suite.pruning.activations import input_stats
from suite.pruning.architectures import all_group_sets, decoder_and_head
from suite.pruning.layerwise import LayerPass
from suite.models import TINY_MODELS, load_model

REL = 1e-5
NSAMPLES, SEQLEN, BATCH = 5, 24, 2   # micro-batches 2, 2, 1


def _windows(vocab: int, nsamples: int = NSAMPLES, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 259), (nsamples, seqlen), generator=g)


def _spread(model):
    """Seeded weights with unequal columns (default init makes layers near-identity)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.02)
    return model.eval()


def _opt(**overrides):
    """Seeded random OPT configs the tiny models do not cover: post-LN (`do_layer_norm_before=False`,
    OPT-350M's order) and project_in/out (`word_embed_proj_dim != hidden_size`, OPT-350M too)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    settings = dict(vocab_size=512, hidden_size=128, ffn_dim=256, num_hidden_layers=3, num_attention_heads=4,
                    word_embed_proj_dim=128, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0)
    config = OPTConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    return _spread(AutoModelForCausalLM.from_config(config))


MODELS = {
    "tiny-llama": lambda: load_model("tiny-llama"),
    "tiny-llama-gqa": lambda: load_model("tiny-llama-gqa"),
    "tiny-opt": lambda: load_model("tiny-opt"),
    "opt-post-ln": lambda: _opt(do_layer_norm_before=False),
    "opt-project-in-out": lambda: _opt(word_embed_proj_dim=64),
    "opt-post-ln-project": lambda: _opt(do_layer_norm_before=False, word_embed_proj_dim=64),
    "tiny-bloom": lambda: load_model("tiny-bloom"),
}


def whole_model_stats(model, windows, group_sets) -> dict:
    """{(layer, member): (n, sum, sum_sq)} from one whole-model forward with hooks on the Linears."""
    accs, handles = {}, []
    for gs in group_sets:
        for member in gs.members:
            key = (gs.layer, member.name)
            if key in accs:
                continue
            acc = accs[key] = [0, 0.0, 0.0]

            def hook(module, args, acc=acc):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + (x * x).sum(0)

            handles.append(gs.linear(member).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return accs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def assert_runner_matches(model, windows, batch_size=BATCH, hidden_device=None):
    group_sets = all_group_sets(model)
    reference = whole_model_stats(model, windows, group_sets)
    stats = input_stats(model, windows, group_sets, batch_size=batch_size, hidden_device=hidden_device)
    assert set(stats) == set(reference) and len(stats) >= 2 * len(group_sets)
    for key, (n, total, total_sq) in reference.items():
        st = stats[key]
        assert st.n == n == windows.numel(), key
        var = (total_sq - total * total / n) / (n - 1)   # unbiased variance from the reference sums
        for name, ours, ref in (("sum", st.sum, total), ("l2", st.l2, total_sq.sqrt()), ("var", st.var, var)):
            assert _rel(ours, ref) <= REL, (key, name, _rel(ours, ref))


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_by_layer_statistics_equal_a_whole_model_forward(name):
    model = MODELS[name]()
    windows = _windows(model.config.vocab_size)
    assert_runner_matches(model, windows)


def test_hidden_states_on_cpu_and_batch_sizes_give_the_same_statistics():
    """`hidden_device="cpu"`, one window per micro-batch, and all windows in one micro-batch agree
    with the whole-model reference (on a CPU-only machine "cpu" is also the compute device)."""
    model = load_model("tiny-llama-gqa")
    windows = _windows(model.config.vocab_size)
    for batch_size in (1, 3, NSAMPLES):
        assert_runner_matches(model, windows, batch_size=batch_size, hidden_device="cpu")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_finish_and_head_give_the_model_logits(name):
    model = load_model(name).eval()
    windows = _windows(model.config.vocab_size)
    _, head = decoder_and_head(model)
    for hidden_device in (None, "cpu"):
        lp = LayerPass(model, windows, batch_size=BATCH, hidden_device=hidden_device)
        assert [h.shape[0] for h in lp.hidden] == [2, 2, 1]
        for i in range(len(lp.layers)):
            with lp.resident(i):
                lp.advance(lp.forward(i))
        with torch.no_grad():
            logits = torch.cat([head(lp.finish(h)) for h in lp.hidden])
            expected = model(input_ids=windows, use_cache=False).logits
        assert logits.shape == expected.shape == (NSAMPLES, SEQLEN, model.config.vocab_size)
        assert _rel(logits, expected) <= REL, (name, hidden_device, _rel(logits, expected))


def test_finish_applies_opt_project_out():
    """OPT with project_out: the hidden size (128) differs from the head's input (64)."""
    model = _opt(word_embed_proj_dim=64)
    windows = _windows(model.config.vocab_size)
    lp = LayerPass(model, windows, batch_size=BATCH)
    assert lp.hidden[0].shape[-1] == 128
    for i in range(len(lp.layers)):
        lp.advance(lp.forward(i))
    with torch.no_grad():
        logits = torch.cat([model.get_output_embeddings()(lp.finish(h)) for h in lp.hidden])
        expected = model(input_ids=windows, use_cache=False).logits
    assert _rel(logits, expected) <= REL


@pytest.mark.slow
def test_smollm2_statistics_equal_a_whole_model_forward(smollm2):
    model, _ = smollm2
    windows = _windows(model.config.vocab_size, nsamples=3, seqlen=64, seed=1)
    assert_runner_matches(model, windows)
