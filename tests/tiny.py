"""Set-up shared by the tests on seeded tiny models (`suite.models` tiny-*): their token ids.

The one-thread fixture they also share is `one_thread` in conftest.py (a module asks for it with
`pytestmark = pytest.mark.usefixtures("one_thread")`).
"""
import torch


def token_ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n, length] seeded token ids, drawn from the byte tokens 3..258 (`suite.models.byte_tokenizer`:
    ids 0..2 are <pad>, <s>, </s>)."""
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))
