"""The newer decoder families (Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3) on their tiny configs.

References are computed here from the models' raw configs and modules, not from the suite's
GroupSet/adapter code: the masked reference zeroes o_proj/down_proj inputs of the unsliced model;
Phi-3's fused layout is checked against the same weights unfused into a LLaMA (every method must
score both alike); the loss is the model's own `labels=` loss.
"""
import random

import pytest
import torch

from suite.pruning import loss as lm_loss
from suite.pruning.architectures import all_group_sets, decoder_and_head
from suite.pruning.plan import LayerPlan, Plan, apply_plan
from suite.pruning.saving import save_pruned
from suite.pruning.select import select
from suite.models import byte_tokenizer, load_model
from tests.reference import masked_logits, rel_err
from tests.tiny import token_ids

FAMILIES = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"]
KV_GROUPED = ["tiny-mistral", "tiny-qwen2", "tiny-gemma2", "tiny-phi3"]  # >= 2 kv heads: kv-group applies
CASES = [(n, "q-head") for n in FAMILIES] + [(n, "kv-group") for n in KV_GROUPED]


pytestmark = pytest.mark.usefixtures("one_thread")


def ids(n=2, seqlen=40, seed=0):
    """Longer than the tiny configs' 16-token sliding windows."""
    return token_ids(n, seqlen, seed)


def random_plan(model, rng, mode, untouched=1):
    """Non-uniform plan from the config's sizes: layer `untouched` keeps everything."""
    c = model.config
    nq, nkv, nch = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    per, layers = nq // nkv, []
    for i in range(c.num_hidden_layers):
        heads, kv, channels = list(range(nq)), list(range(nkv)), list(range(nch))
        if i != untouched:
            channels = sorted(rng.sample(range(nch), rng.randint(1, nch - 1)))
            if mode == "kv-group":
                kv = sorted(rng.sample(range(nkv), rng.randint(1, nkv - 1)))
                heads = [j * per + k for j in kv for k in range(per)]
            else:
                k = per - 1 if i % 2 == 0 else rng.randint(1, per - 1)
                heads = sorted(j * per + h for j in range(nkv) for h in rng.sample(range(per), k))
        layers.append(LayerPlan(heads=heads, channels=channels, kv_heads=kv))
    return Plan(arch=c.model_type, layers=layers, head_mode=mode)


# --------------------------------------------------------------------------- exact slicing
@pytest.mark.parametrize("name,mode", CASES)
def test_sliced_equals_masked(name, mode):
    model = load_model(name)
    plan = random_plan(model, random.Random(7), mode)
    x = ids()
    reference = masked_logits(model, plan, x)
    apply_plan(model, plan)
    with torch.no_grad():
        sliced = model(x).logits
    assert rel_err(sliced, reference) <= 1e-5
    # really sliced: every layer but 1 smaller, to the plan's sizes (read from the raw Linears)
    for i, (lp, layer) in enumerate(zip(plan.layers, model.model.layers)):
        hd = layer.self_attn.head_dim
        assert layer.self_attn.o_proj.in_features == len(lp.heads) * hd
        assert layer.mlp.down_proj.in_features == len(lp.channels)
        assert (i == 1) == (len(lp.channels) == model.config.intermediate_size)
    # control: the plan changes the logits (masking is not a no-op)
    with torch.no_grad():
        assert rel_err(load_model(name)(x).logits, reference) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_dropped_attention_and_empty_mlp_exact(name):
    """allow_empty: a layer with zero heads (its attention dropped) and one with zero channels."""
    model = load_model(name)
    plan = random_plan(model, random.Random(1), "q-head")
    plan.allow_empty = True
    plan.layers[2].heads, plan.layers[2].kv_heads = [], list(range(model.config.num_key_value_heads))
    plan.layers[3].channels = []
    x = ids(seed=8)
    reference = masked_logits(model, plan, x)
    apply_plan(model, plan)
    with torch.no_grad():
        assert rel_err(model(x).logits, reference) <= 1e-5


def test_phi3_fused_sections_follow_their_heads():
    """Slicing Phi-3's qkv_proj as if it were one [heads, 3, hd] block (the BLOOM layout) is wrong."""
    model = load_model("tiny-phi3")
    plan = random_plan(model, random.Random(3), "kv-group")
    x = ids(n=1)
    reference = masked_logits(model, plan, x)
    apply_plan(model, plan)
    qkv = model.model.layers[0].self_attn.qkv_proj
    kept_q = len(plan.layers[0].heads) * 32
    assert qkv.out_features == kept_q + 2 * len(plan.layers[0].kv_heads) * 32
    with torch.no_grad():  # swap the k and v sections of layer 0: the output must change
        k = qkv.weight[kept_q:].chunk(2)
        qkv.weight[kept_q:] = torch.cat([k[1], k[0]])
        assert rel_err(model(x).logits, reference) > 1e-3


# --------------------------------------------------------------------------- save, budget
def random_scores(model, head_mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(gs.layer, gs.kind): torch.rand(gs.count, generator=g) for gs in all_group_sets(model, head_mode)}


def numel(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,mode", CASES)
def test_save_reload_identical(tmp_path, name, mode):
    model = load_model(name)
    plan = random_plan(model, random.Random(5), mode)
    apply_plan(model, plan)
    out = save_pruned(model, byte_tokenizer(), plan, tmp_path / "pruned")
    files = {p.name for p in out.iterdir()}
    assert "plan.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files)
    again = load_model(str(out))
    x = ids(seed=4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert numel(again) == numel(model)


@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_budget(name, mode, ratio):
    model = load_model(name)
    dense = numel(model)
    sel = select(model, random_scores(model, mode), ratio, head_mode=mode)
    apply_plan(model, sel.plan)
    assert dense - numel(model) == sel.removed
    assert abs((dense - numel(model)) / dense - ratio) <= 0.01
    if mode == "kv-group" and ratio == 0.5:  # whole kv heads went (at 0.2 half the heads is too many)
        assert any(len(lp.kv_heads) < model.config.num_key_value_heads for lp in sel.plan.layers)


# --------------------------------------------------------------------------- methods
METHODS = {"random": {}, "magnitude": {}, "wanda-sp": {}, "flap": {}, "llm-pruner": {},
           "minillm": {"directions": 2}}


@pytest.mark.parametrize("name,mode", CASES)
def test_every_method_prunes(name, mode):
    from suite.pipeline import prune

    tok = byte_tokenizer()
    x = ids(n=1, seqlen=24, seed=9)
    for method, options in METHODS.items():
        model = load_model(name)
        dense = numel(model)
        outcome = prune(model, tok, method, 0.3, options=options, head_mode=mode,
                        calib={"nsamples": 2, "seqlen": 32})
        params = outcome.selection.removed
        assert abs(params / dense - 0.3) <= 0.01, method
        with torch.no_grad():
            logits = model(x).logits
        assert torch.isfinite(logits).all(), method
        plan = outcome.selection.plan
        if outcome.scope == "layer":  # every layer prunes heads and channels (global scope may keep heads)
            assert all(len(lp.heads) < model.config.num_attention_heads for lp in plan.layers[1:]), method
        for lp, layer in zip(plan.layers, model.model.layers):  # sliced to the plan
            assert layer.self_attn.o_proj.in_features == len(lp.heads) * layer.self_attn.head_dim, method
            assert layer.mlp.down_proj.in_features == len(lp.channels), method


def unfused_llama(phi3):
    """A LLaMA with Phi-3's weights, qkv_proj split into q/k/v_proj and gate_up_proj into gate/up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = phi3.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
                         hidden_act=c.hidden_act, tie_word_embeddings=False, pad_token_id=0)
    llama = LlamaForCausalLM(config).eval()
    state, q = {}, c.hidden_size  # q rows: heads x head_dim = hidden on tiny-phi3
    for key, value in phi3.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            kv = (value.shape[0] - q) // 2
            for part, w in zip("qkv", value.split([q, kv, kv])):
                state[key.replace("qkv_proj", f"{part}_proj")] = w
        elif key.endswith("gate_up_proj.weight"):
            gate, up = value.chunk(2)
            state[key.replace("gate_up_proj", "gate_proj")], state[key.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            state[key] = value
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize("mode", ["q-head", "kv-group"])
def test_phi3_scores_equal_the_unfused_llama(mode):
    """Each method scores a fused Phi-3 exactly like the same weights in LLaMA's separate Linears."""
    from suite.methods import get_method

    phi3 = load_model("tiny-phi3")
    llama = unfused_llama(phi3)
    x = ids(n=2, seqlen=24, seed=2)
    with torch.no_grad():
        assert rel_err(phi3(x).logits, llama(x).logits) <= 1e-5
    for method, options in [("magnitude", {}), ("wanda-sp", {}), ("flap", {}), ("llm-pruner", {}),
                            ("minillm", {"gradient": "backprop"}), ("minillm", {"gradient": "none"})]:
        scored = []
        for model in (phi3, llama):
            m = get_method(method)
            from suite.pruning.scoring import checked_options

            opts = checked_options(m, options)
            scored.append(m.score(model, x, all_group_sets(model, mode), opts, 0).scores)
        assert scored[0].keys() == scored[1].keys()
        for key in scored[0]:
            a, b = scored[0][key].double(), scored[1][key].double()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-12 + 1e-6 * b.abs().max()), (method, options, key)


# --------------------------------------------------------------------------- the loss MINI-LLM estimates
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("chunk", [lm_loss.LOSS_CHUNK_ELEMENTS, 3 * 512 + 5])  # default; uneven small chunks
def test_chunked_loss_equals_the_models_own_loss(name, chunk, monkeypatch):
    model = load_model(name)
    monkeypatch.setattr(lm_loss, "LOSS_CHUNK_ELEMENTS", chunk)
    x = ids(n=3, seqlen=24, seed=5)
    with torch.no_grad():
        own = model(input_ids=x, labels=x, use_cache=False).loss.item()
    assert decoder_and_head(model)[0] is not None  # the chunked path, not the full-logits fallback
    assert abs(lm_loss.calibration_loss(model, x, batch_size=2) - own) <= 1e-5 * own


def test_gemma2_loss_applies_the_final_soft_cap():
    """Control: without the cap the chunked loss would differ (the tiny cap of 3 bites)."""
    model = load_model("tiny-gemma2")
    x = ids(n=2, seqlen=24, seed=6)
    with torch.no_grad():
        own = model(input_ids=x, labels=x, use_cache=False).loss.item()
        hidden = model.model(input_ids=x, use_cache=False)[0][:, :-1]
        uncapped = torch.nn.functional.cross_entropy(
            model.lm_head(hidden).reshape(-1, model.config.vocab_size), x[:, 1:].reshape(-1)).item()
    assert abs(uncapped - own) > 1e-3 * own
    assert abs(lm_loss.calibration_loss(model, x) - own) <= 1e-5 * own


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
def test_statistics_pass_sees_the_models_own_inputs(name):
    """Embedding scaling and norms are inside the decoder: the statistics pass sees what the full
    model feeds its Linears (fused ones included)."""
    from suite.pruning.activations import input_stats

    model = load_model(name)
    sets = all_group_sets(model)
    x = ids(n=2, seqlen=16, seed=3)
    seen = {}
    handles = [gs.linear(m).register_forward_pre_hook(
        lambda mod, args, key=(gs.layer, m.name): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))
        for gs in sets for m in gs.members]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in handles:
        h.remove()
    stats = input_stats(model, x, sets, batch_size=2)
    assert set(stats) == set(seen)
    for key, inputs in seen.items():
        assert torch.allclose(stats[key].sum_sq, (inputs.double() ** 2).sum(0), rtol=1e-6)
