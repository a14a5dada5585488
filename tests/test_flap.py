"""FLAP (baselines/flap.py): its group scores recomputed independently (tests/group_scores.py), the bias
compensation, and `--opt variance=reference`.

`variance=reference` is FLAP's streaming fluctuation estimator (lib/layerwrapper.py,
BiasGPT.add_batch), checked against numbers computed by hand and against the plain formula
F_K = sum_{j>=2} (j-1)/(j(K-1)) · sum_t (x_{j,t} - m_j)^2 (m_j: mean of the first j window means)
evaluated in the test from hooks on an ordinary forward of each window."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import baselines.flap as flap
from suite.models import load_model
from suite.pruning.activations import StreamingVariance
from suite.pruning.architectures import all_group_sets
from suite.pruning.errors import UserError
from suite.pruning.plan import apply_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.pruning.scoring import checked_options
from suite.pruning.select import select
from tests.group_scores import CASES, TOL, arch, close, dims, output_inputs, output_weights, run, windows

pytestmark = pytest.mark.usefixtures("one_thread")


def flap_reference(model, ids, mode, head_power=2.0):
    xs = output_inputs(model, ids)
    want = {}
    for i, kind, count, width, w in output_weights(model, mode):
        s = torch.var(xs[(i, kind)], dim=0, unbiased=True) * w.pow(2).sum(0)
        if kind == "heads":
            s = s ** head_power
        z = (s - s.mean()) / s.std(unbiased=True)
        want[(i, kind)] = z.view(count, width).mean(1)
    return want, xs


@pytest.mark.parametrize("name,mode", CASES)
def test_flap_scores(models, name, mode):
    model, ids = models(name), windows()
    want, _ = flap_reference(model, ids, mode)
    scoring = run(flap, model, ids, mode)
    close(scoring.scores, want)
    assert flap.SELECTION["scope"] == "global" and scoring.compensate is not None
    assert run(flap, model, ids, mode, compensate=False).compensate is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-llama-gqa", "tiny-bloom"])
def test_flap_bias_compensation_keeps_output_at_mean(name, tmp_path):
    model, ids = load_model(name), windows()
    a = arch(model)
    _, xs = flap_reference(model, ids, "q-head")
    before = {}
    for i, layer in enumerate(a["layers"](model)):
        for kind, mod in (("heads", a["o"]), ("channels", a["down"])):
            lin = layer.get_submodule(mod)
            mean = xs[(i, kind)].mean(0)
            b = lin.bias.detach().double() if lin.bias is not None else 0
            before[(i, kind)] = (lin.weight.detach().double() @ mean + b, mean)
    scoring = run(flap, model, ids)
    # layer scope: every layer loses heads AND channels, so every projection is compensated
    selection = select(model, scoring.scores, 0.3, scope="layer")
    plan = selection.plan
    apply_plan(model, plan)
    scoring.compensate(model, plan)
    _, _, hd = dims(model)
    n_comp = 0
    for i, layer in enumerate(a["layers"](model)):
        lp = plan.layers[i]
        for kind, mod in (("heads", a["o"]), ("channels", a["down"])):
            lin = layer.get_submodule(mod)
            kept = torch.tensor(lp.channels) if kind == "channels" else \
                (torch.tensor(lp.heads)[:, None] * hd + torch.arange(hd)).reshape(-1)
            want, mean = before[(i, kind)]
            assert lin.bias is not None
            got = lin.weight.detach().double() @ mean[kept] + lin.bias.detach().double()
            err = (got - want).abs().max() / want.abs().max()
            assert err <= TOL, (i, kind, err)
            n_comp += 1
    assert scoring.info["compensated_modules"] == n_comp
    # the created biases survive save -> load_pruned
    with torch.no_grad():
        logits = model(ids[:2]).logits
    save_pruned(model, None, plan, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids[:2]).logits, logits, atol=1e-5)


def test_flap_uncompensated_leaves_no_bias(models):
    model, ids = load_model("tiny-llama"), windows()
    scoring = run(flap, model, ids, compensate=False)
    apply_plan(model, select(model, scoring.scores, 0.3, scope="layer").plan)
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
               for layer in model.model.layers)


# --------------------------------------------------------------------------- variance=reference
WINDOWS = torch.tensor([[[1.0, 5.0], [3.0, 5.0]], [[2.0, 1.0], [6.0, 3.0]], [[0.0, 2.0], [4.0, 2.0]]])


def test_streaming_variance_equals_the_three_window_example_by_hand():
    """Feature 0: window means 2, 4, 2 -> running means m1 = 2, m2 = 3, m3 = 8/3;
    S2 = (2-3)^2 + (6-3)^2 = 10, S3 = (0-8/3)^2 + (4-8/3)^2 = 80/9;
    F3 = 1/2 · (1/2 · 10 + 2/3 · 80/9) = 295/54 (window 1 discarded), while the unbiased token
    variance of 1,3,2,6,0,4 is 42/9.
    Feature 1: window means 5, 2, 2 -> m2 = 7/2, m3 = 3; S2 = (1-7/2)^2 + (3-7/2)^2 = 13/2,
    S3 = 1 + 1 = 2; F3 = 1/2 · (1/2 · 13/2 + 2/3 · 2) = 55/24."""
    expected = torch.tensor([float(Fraction(295, 54)), float(Fraction(55, 24))], dtype=torch.float64)
    one_by_one, batched = StreamingVariance(), StreamingVariance()
    for w in WINDOWS:
        one_by_one.add(w)                  # [seq, features]: one window, as FLAP's add_batch
    batched.add(WINDOWS)                   # [windows, seq, features]: split into windows in order
    for est in (one_by_one, batched):
        assert est.windows == 3
        torch.testing.assert_close(est.value, expected, rtol=1e-12, atol=0)
    token_var = WINDOWS.reshape(-1, 2).double().var(0)
    assert abs(float(token_var[0]) - 42 / 9) < 1e-12 and not torch.allclose(token_var, expected)


def test_streaming_variance_of_a_single_window_is_zero_as_flap():
    est = StreamingVariance()
    est.add(WINDOWS[:1])
    assert torch.equal(est.value, torch.zeros(2, dtype=torch.float64))


def _flap_formula(per_window: list[torch.Tensor]) -> torch.Tensor:
    """F_K from the unrolled formula, each window [tokens, features]."""
    k, total = len(per_window), 0.0
    means = [w.mean(0) for w in per_window]
    for j in range(1, k + 1):
        m_j = sum(means[:j]) / j
        if j >= 2:
            total = total + (j - 1) / (j * (k - 1)) * ((per_window[j - 1] - m_j) ** 2).sum(0)
    return total


def _standardise(x):
    return (x - x.mean()) / x.std()


def test_flap_reference_variance_scores_equal_the_formula():
    """tiny-llama, 4 windows: scores of `variance=reference` = standardised F_K·||W_:,j||^2 (heads:
    squared, then the mean per head), F_K from hooks on each window's ordinary forward; and they
    differ from `variance=exact`'s."""
    model = load_model("tiny-llama").eval()
    windows = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(3))
    sets = all_group_sets(model)
    options = checked_options(flap, {"variance": "reference", "compensate": False, "batch_size": 3})
    got = flap.score(model, windows, sets, options, seed=0).scores
    exact = flap.score(model, windows, sets, {**options, "variance": "exact"}, seed=0).scores
    inputs = {}
    handles = [gs.linear(gs.output).register_forward_pre_hook(
        lambda m, a, key=(gs.layer, gs.kind): inputs.setdefault(key, []).append(a[0][0].detach().double()))
        for gs in sets]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    for gs in sets:
        key = (gs.layer, gs.kind)
        metric = _flap_formula(inputs[key]) * gs.linear(gs.output).weight.double().pow(2).sum(0)
        if gs.kind == "heads":
            metric = metric ** 2
        expected = _standardise(metric).view(gs.count, -1).mean(1)
        torch.testing.assert_close(got[key].double(), expected, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(exact[key].double(), expected, rtol=1e-4, atol=1e-6), key


def test_unknown_variance_is_a_user_error():
    with pytest.raises(UserError, match="flap option variance='streaming': choose one of exact, reference"):
        checked_options(flap, {"variance": "streaming"})
