"""LLM-Pruner (baselines/llm_pruner.py): its first- and second-order Taylor group importances recomputed
with `torch.autograd.grad` (tests/group_scores.py), its aggregations, batching, and default layers."""
from __future__ import annotations

import pytest

from baselines import llm_pruner
from suite.pruning.select import parse_layer_range
from tests.group_scores import CASES, close, run, taylor_reference, windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("importance", ["element1", "element2", "vector"])
def test_llm_pruner_matches_autograd(models, name, mode, importance):
    model, ids = models(name), windows(n=4, length=24)
    want = taylor_reference(model, ids, mode, importance, "sum")
    close(run(llm_pruner, model, ids, mode, importance=importance).scores, want)


@pytest.mark.parametrize("aggregation", ["mean", "max", "prod"])
def test_llm_pruner_aggregations(models, aggregation):
    for name in ("tiny-llama", "tiny-opt"):
        model, ids = models(name), windows(n=4, length=24)
        want = taylor_reference(model, ids, "q-head", "element1", aggregation)
        close(run(llm_pruner, model, ids, importance="element1", aggregation=aggregation).scores, want)


def test_llm_pruner_batching_and_cleanup(models):
    model, ids = models("tiny-llama"), windows(n=4, length=24)
    model.model.embed_tokens.weight.requires_grad_(False)
    try:
        one = run(llm_pruner, model, ids).scores
        two = run(llm_pruner, model, ids, batch_size=2).scores
        close(two, one)
        assert all(p.grad is None for p in model.parameters())
        assert not model.model.embed_tokens.weight.requires_grad
        assert all(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" not in n)
    finally:
        model.model.embed_tokens.weight.requires_grad_(True)


def test_llm_pruner_default_layers_match_reference():
    # LLM-Pruner prunes blocks 4..29 of LLaMA-7B's 32 (block_*_layer_start 4, end 30)
    assert parse_layer_range(llm_pruner.SELECTION["layers"], 32) == list(range(4, 30))
