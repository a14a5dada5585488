"""The offload measurement of results/notes/offload.md: a random-init LLaMA of ~1.1B parameters.

    python scripts/offload_1b.py build /tmp/llama-1b     # once: bf16 safetensors (~2.2 GB)
    /usr/bin/time -v python -m suite prune --model /tmp/llama-1b --method wanda-sp --ratio 0.2 \
        --nsamples 8 --seqlen 128 --dtype bfloat16 --offload disk --device-memory 1GB \
        --hidden-on cpu --out /tmp/llama-1b-wanda --quiet

Shape: TinyLlama-1.1B's (hidden 2048, 22 layers, intermediate 5632, 32 q / 4 kv heads, vocab
32000); weights N(0, 1/in_features) as the suite's tiny models, so heads and channels differ.
"""
from __future__ import annotations

import sys

import torch


def build(out: str) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from suite.models import byte_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, (1.0 / p.shape[1]) ** 0.5 if "embed" not in name else 1.0)
            else:
                p.fill_(1.0)  # norms (rotary inv_freq is not saved: rebuilt in fp32 at load)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="500MB")
    byte_tokenizer().save_pretrained(out)
    print(f"{n:,} parameters, {2 * n / 1e9:.2f} GB in bf16, saved to {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"]:
        build(sys.argv[2])
    else:
        sys.exit(__doc__)
