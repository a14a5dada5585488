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


def write_gguf(model, path) -> None:
    """Write a seeded tiny LLaMA (`suite.models` tiny-llama, tiny-llama-gqa) as an F32 .gguf file with
    the `gguf` package, laid out as llama.cpp's `convert_hf_to_gguf.py` lays out a LLaMA (tensor names
    `token_embd`, `blk.N.attn_q`..., q/k rows permuted for its rotary layout; the byte tokenizer as a
    "gpt2" vocabulary without merges), so transformers' GGUF reader gives back the model's exact weights."""
    import gguf
    import numpy as np

    from suite.models import byte_tokenizer

    def permute(w, heads):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    vocab = byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.get) + [f"<unused{i}>" for i in range(c.vocab_size - len(vocab))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in heads:
                w = permute(w, heads[gguf_name])
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
