"""Set-up shared by the tests on seeded tiny models (`suite.models` tiny-*): their token ids, seeded
random scores and plans, a parameter count.

The one-thread fixture they also share is `one_thread` in conftest.py (a module asks for it with
`pytestmark = pytest.mark.usefixtures("one_thread")`).
"""
import torch

from suite.pruning.architectures import adapter_for, all_group_sets
from suite.pruning.plan import full_plan


def token_ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n, length] seeded token ids, drawn from the byte tokens 3..258 (`suite.models.byte_tokenizer`:
    ids 0..2 are <pad>, <s>, </s>)."""
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


def random_scores(model, head_mode="q-head", seed=0):
    """{(layer, kind): [count]} seeded uniform scores in [0, 1) for every group set of `model`."""
    g = torch.Generator().manual_seed(seed)
    return {(gs.layer, gs.kind): torch.rand(gs.count, generator=g) for gs in all_group_sets(model, head_mode)}


def numel(model) -> int:
    """Number of parameters of `model` (tied tensors once)."""
    return sum(p.numel() for p in model.parameters())


def random_plan(model, rng, untouched=1, kv_mode=False):
    """Non-uniform plan: layers keep different counts; layer `untouched` keeps everything."""
    plan = full_plan(model)
    adapter = adapter_for(model)
    for i, (lp, layer) in enumerate(zip(plan.layers, adapter.layers(model))):
        if i == untouched:
            continue
        nq, nkv, nch = adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer)
        lp.channels = sorted(rng.sample(range(nch), rng.randint(1, nch - 1)))
        if nkv == nq:
            lp.heads = sorted(rng.sample(range(nq), rng.randint(1, nq - 1)))
        elif kv_mode:  # whole kv groups
            per = nq // nkv
            lp.kv_heads = sorted(rng.sample(range(nkv), rng.randint(1, nkv - 1)))
            lp.heads = [j * per + k for j in lp.kv_heads for k in range(per)]
        else:  # same number of q heads from every kv group
            per = nq // nkv
            k = rng.randint(1, per - 1) if i % 2 else per - 1
            lp.heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), k))
    return plan
