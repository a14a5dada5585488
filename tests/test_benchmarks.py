"""Throughput records (pytest-benchmark; `tox -e bench`, not part of the default run).

- perplexity evaluation vs a bare `model(input_ids)` loop over the same windows (goal: within 10%);
- scoring (wanda-sp statistics pass, minillm default) and slicing on the embedded SmolLM2-135M.
Results land in results/benchmarks.json (`--benchmark-json`); compare the `perplexity` and
`bare_forward` means for the 10% goal.
"""
import copy

import pytest
import torch

from suite.pruning.architectures import all_group_sets
from suite.pruning.plan import apply_plan
from suite.pruning.select import select
from suite.data import calibration_windows, eval_windows
from suite.evaluate import perplexity
from suite.methods import get_method

pytestmark = pytest.mark.benchmark
TOKENS = 4096


def test_perplexity(benchmark, smollm2):
    model, tok = smollm2
    eval_windows(tok, "wikitext2", 128, TOKENS)  # tokenise once outside the timing (cached)
    benchmark.pedantic(perplexity, args=(model, tok, "wikitext2"), kwargs=dict(max_tokens=TOKENS, quiet=True),
                       rounds=3, warmup_rounds=1)


def test_bare_forward(benchmark, smollm2):
    model, tok = smollm2
    windows = eval_windows(tok, "wikitext2", 128, TOKENS)

    def loop():
        with torch.inference_mode():
            for batch in windows.split(4):
                model(input_ids=batch, use_cache=False)

    benchmark.pedantic(loop, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("method", ["wanda-sp", "minillm"])
def test_scoring(benchmark, smollm2, method):
    model, tok = smollm2
    windows = calibration_windows(tok, "c4", 16, 128, seed=0)
    module = get_method(method)
    sets = all_group_sets(model)
    benchmark.pedantic(module.score, args=(model, windows, sets, dict(module.OPTIONS), 0), rounds=1)


def test_slicing(benchmark, smollm2):
    model, _ = smollm2
    g = torch.Generator().manual_seed(0)
    scores = {(gs.layer, gs.kind): torch.rand(gs.count, generator=g) for gs in all_group_sets(model)}
    plan = select(model, scores, 0.2).plan
    benchmark.pedantic(lambda m: apply_plan(m, plan), setup=lambda: ((copy.deepcopy(model),), {}), rounds=3)
