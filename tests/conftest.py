"""Test settings: the dataset mirror beside the project, unless the environment names another."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MINILLM_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (fp32, cached safetensors) and its tokenizer."""
    from suite.models import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module of tiny-model tests, restored after it. Tiny models gain
    nothing from more; on a loaded 2-core machine OpenMP's second thread spin-waits and a 4-layer
    forward goes from ~0.05 s to ~2 s. Used by `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """name -> the seeded tiny model `suite.models.load_model(name)`, loaded once per test module (for
    tests that only read it)."""
    from suite.models import load_model

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]
    return get
