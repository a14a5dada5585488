"""Half precision (issue 16): fp32 rotary buffers, exact weights after MINI-LLM's scoring in every dtype
and from every source, exact gate perturbations, sliced == masked in bf16, the --dtype option."""
from __future__ import annotations

import pytest
import torch

from suite.models import load_model

HALF = (torch.bfloat16, torch.float16)


def _rotary_inv_freq(config) -> torch.Tensor:
    """θ_i = base^(-2i/d) in fp32, from the config alone (RoFormer Eq. 15; the default rope type)."""
    d = config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-dir")
    load_model("tiny-llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("source", ["tiny", "dir"])
def test_rotary_buffers_stay_fp32_and_logits_match_an_fp32_angle_reference(dtype, source, tiny_llama_dir):
    spec = "tiny-llama" if source == "tiny" else str(tiny_llama_dir)
    model = load_model(spec, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == dtype
    expected = _rotary_inv_freq(model.config)
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    # reference: the fp32 model cast wholesale (inv_freq too), then θ put back from the formula in fp32
    reference = load_model(spec, dtype=torch.float32).to(dtype=dtype)
    assert reference.model.rotary_emb.inv_freq.dtype == dtype  # the fault the fix avoids
    tokens = torch.randint(3, 259, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = reference(input_ids=tokens).logits
        reference.model.rotary_emb.inv_freq = expected.clone()
        want = reference(input_ids=tokens).logits
        got = model(input_ids=tokens).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, wrong)  # a bf16/fp16 θ shifts the angles: the test can fail
