"""The method contract's helpers (suite/pruning/scoring.py): `standardise` against numpy."""
import numpy as np
import torch

from suite.pruning.scoring import standardise


def test_standardise_is_the_unbiased_z_score_in_the_input_dtype():
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(257, generator=gen, dtype=torch.float64) * 5 + 2
    a = x64.numpy()
    expected = (a - a.mean()) / a.std(ddof=1)  # numpy: an independent computation
    got = standardise(x64)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # flap's arithmetic (its metrics are float64) is kept to the bit
    assert torch.equal(got, (x64 - x64.mean()) / x64.std())
    # minillm's float32 scores: computed in float64, returned in float32
    x32 = x64.float()
    got32 = standardise(x32)
    a32 = x32.double().numpy()
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ((a32 - a32.mean()) / a32.std(ddof=1)).astype(np.float32),
                               rtol=0, atol=2e-7)
    constant = torch.full((5,), 3.0)  # std 0: zeros
    assert torch.equal(standardise(constant), torch.zeros_like(constant))
