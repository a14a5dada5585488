"""ShortGPT (baselines/shortgpt.py): Block Influence against an independent computation from
transformers' `output_hidden_states` (the authors' `compute_bi` input), and the layers it removes."""
import pytest
import torch

from baselines import shortgpt
from suite.models import byte_tokenizer, load_model
from suite.pruning.architectures import adapter_for
from suite.pipeline import prune
from suite.pruning.select import depth_budget
from tests.tiny import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def authors_bi(model, windows, angular=False):
    """ShortGPT's `compute_bi` over consecutive `hidden_states` (one window per forward, as its
    run_shortgpt.py), with `metrics.block_influence`'s arithmetic ([tokens, tokens] product, its
    diagonal over the norms' product, NaN -> 0.5), in float64."""
    n = model.config.num_hidden_layers
    bi = [0.0] * n
    with torch.no_grad():
        for window in windows:
            hs = model(window[None], output_hidden_states=True).hidden_states
            assert len(hs) == n + 1
            for i in range(n):
                x, y = hs[i][0].double(), hs[i + 1][0].double()
                sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
                sim = sim.diagonal().nan_to_num(nan=0.5)
                bi[i] += float((torch.arccos(sim) / torch.pi if angular else 1 - sim).sum())
    return bi


def with_random_final_norm(model):
    """`model` with its final norm's weight drawn at random: a tiny model's all-equal RMSNorm weight
    leaves every cosine unchanged, so the last layer's convention would go untested."""
    norm = adapter_for(model).tail(model)[0]
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(5)) + 0.5)
    return model


def options(**given):
    return {**shortgpt.OPTIONS, **given}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gemma2"])
def test_block_influence_equals_output_hidden_states_including_final_norm_last(name):
    model = with_random_final_norm(load_model(name).eval())
    windows = token_ids(3, 24, seed=1)
    budget = depth_budget(model, 0.3)
    scoring = shortgpt.score_layers(model, windows, budget, options(batch_size=2), seed=0)
    expected = authors_bi(model, windows)
    got = scoring.info["block_influence"]
    assert len(got) == model.config.num_hidden_layers
    for g, e in zip(got, expected):
        assert abs(g - e) <= 1e-6 * abs(e), (name, got, expected)
    assert [float(scoring.scores[(i, "layers")]) for i in range(len(got))] == got


def test_last_layer_raw_differs_from_final_norm_only_at_the_last_layer():
    model = with_random_final_norm(load_model("tiny-llama").eval())
    windows = token_ids(2, 16)
    budget = depth_budget(model, 0.3)
    norm = shortgpt.score_layers(model, windows, budget, options(), 0).info["block_influence"]
    raw = shortgpt.score_layers(model, windows, budget, options(last_layer="raw"), 0).info["block_influence"]
    assert raw[:-1] == norm[:-1]
    captured = []  # the last layer's raw output, independently of the layer pass
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        hs = [model(w[None], output_hidden_states=True).hidden_states[-2][0].double() for w in windows]
    handle.remove()
    expected = sum(float((1 - torch.nn.functional.cosine_similarity(x, y[0].double(), dim=-1, eps=0)).sum())
                   for x, y in zip(hs, captured))
    assert abs(raw[-1] - expected) <= 1e-6 * expected
    assert abs(raw[-1] - norm[-1]) > 1e-3 * norm[-1]


def test_angular_block_influence_is_arccos_over_pi():
    model = load_model("tiny-opt").eval()
    windows = token_ids(2, 16, seed=2)
    got = shortgpt.score_layers(model, windows, depth_budget(model, 0.3), options(angular=True), 0).info["block_influence"]
    expected = authors_bi(model, windows, angular=True)
    assert all(abs(g - e) <= 1e-6 * e for g, e in zip(got, expected))


def test_nan_similarity_reads_one_half():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    assert shortgpt.block_influence(x, y).tolist() == [0.5, 1.0]


@pytest.mark.parametrize("rule", ["nearest", "not_above"])
def test_pipeline_removes_the_n_lowest_block_influence_layers(rule):
    dense = load_model("tiny-llama")
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    total = sum(p.numel() for p in dense.parameters())  # tiny-llama ties no weights
    ratio = 1.6 * per_layer / total  # 1.6 layers' worth: nearest 2, not above 1
    count = {"nearest": 2, "not_above": 1}[rule]
    model = load_model("tiny-llama")
    outcome = prune(model, byte_tokenizer(), "shortgpt", ratio, calib={"nsamples": 2, "seqlen": 32}, depth_rule=rule)
    bi = outcome.scoring.info["block_influence"]
    lowest = sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:count])
    assert outcome.selection.plan.removed_layers == lowest
    assert model.config.num_hidden_layers == len(model.model.layers) == 4 - count
    assert outcome.params_dense - outcome.params_pruned == count * per_layer
