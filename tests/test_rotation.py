"""suite/pruning/rotation.py: norm fusion, rotation and slicing of the residual stream (SliceGPT).

Invariances against the unmodified model's logits (fp32), the sliced model against an independent
reference (the rotated unsliced weights with the deleted directions zeroed), the parameter count
the budget predicts against the sliced model's, and the one-line refusals."""
import copy

import pytest
import torch

from suite.models import load_model
from suite.pruning.architectures import adapter_for
from suite.pruning.errors import UserError
from suite.pruning.layerwise import parameter_count
from suite.pruning.modeling_sliced import ResidualRMSNorm
from suite.pruning.rotation import (fuse, principal_basis, residual_layout, rotate_and_slice, sliced_parameters,
                                    width_for_ratio)
from tests.tiny import token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORTED = ["tiny-llama", "tiny-llama-gqa", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-opt"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", SUPPORTED)
def test_fusing_norms_leaves_logits_unchanged_and_every_norm_weightless(name):
    model = load_model(name).eval()
    ids = token_ids(2, 12, seed=1)
    before = _logits(model, ids)
    fuse(model)
    assert _rel(_logits(model, ids), before) <= 1e-4
    norms = [m for m in model.modules() if isinstance(m, ResidualRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_centring_embeddings_as_the_authors_code_subtracts_each_row_mean_in_an_rmsnorm_family():
    plain, centred = load_model("tiny-llama").eval(), load_model("tiny-llama").eval()
    fuse(plain)
    fuse(centred, centre_embeddings=True)
    w = plain.get_input_embeddings().weight.double()
    assert torch.allclose(centred.get_input_embeddings().weight.double(), w - w.mean(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(centred.get_output_embeddings().weight, plain.get_output_embeddings().weight)


@pytest.mark.parametrize("name", SUPPORTED)
def test_rotating_without_slicing_leaves_logits_unchanged(name):
    model = load_model(name).eval()
    ids = token_ids(2, 12, seed=1)
    before = _logits(model, ids)
    full = model.config.hidden_size
    done = rotate_and_slice(model, token_ids(3, 16, seed=2), full, keep_bases=True)
    assert done.widths == [full] * (2 * model.config.num_hidden_layers + 1)
    # a real rotation: the embedding's basis is no permutation of the identity
    assert done.bases[0].abs().max(dim=0).values.min() < 0.9
    assert _rel(_logits(model, ids), before) <= 1e-4


def _zero_deleted(model, widths, layout):
    """The reference: a rotated, unsliced model whose writers put nothing beyond each kept width."""
    with torch.no_grad():
        for path in layout.embeddings:
            model.get_submodule(path).weight[:, widths[0]:] = 0
        for i, layer in enumerate(model.get_submodule(layout.layers)):
            d_mid, d_out = widths[2 * i + 1], widths[2 * i + 2]
            for lin, shortcut, d in ((layer.get_submodule(layout.attention_output), layer.attn_shortcut_Q, d_mid),
                                     (layer.get_submodule(layout.mlp_output), layer.mlp_shortcut_Q, d_out)):
                lin.weight[d:] = 0
                if lin.bias is not None:
                    lin.bias[d:] = 0
                shortcut[:, d:] = 0
        model.get_output_embeddings().weight[:, widths[-1]:] = 0


@pytest.mark.parametrize("name,slice_head", [("tiny-llama-gqa", False), ("tiny-opt", False), ("tiny-phi3", True)])
def test_sliced_model_equals_rotated_unsliced_model_with_deleted_directions_zeroed(name, slice_head):
    dense = load_model(name).eval()
    ids, calib = token_ids(2, 12, seed=1), token_ids(3, 16, seed=2)
    full, width = dense.config.hidden_size, 96
    sliced = copy.deepcopy(dense)
    done = rotate_and_slice(sliced, calib, width, slice_head=slice_head, keep_bases=True)
    assert sliced.get_input_embeddings().weight.shape[1] == width
    assert sliced.get_output_embeddings().weight.shape[1] == (width if slice_head else full)
    reference = copy.deepcopy(dense)
    rotate_and_slice(reference, calib, full, bases=done.bases)
    _zero_deleted(reference, done.widths, adapter_for(dense).residual_layout)
    got, want = _logits(sliced, ids), _logits(reference, ids)
    assert _rel(got, want) <= 1e-5
    assert _rel(got, _logits(dense, ids)) > 1e-2  # slicing did delete something


def test_principal_basis_sorts_eigenvectors_by_decreasing_eigenvalue_of_the_damped_gram_matrix():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor(
        [1.0, 5.0, 0.1, 3.0, 2.0, 0.5], dtype=torch.float64)
    H = x.T @ x
    Q = principal_basis(H)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-10)
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    values = torch.diagonal(Q.T @ damped @ Q)
    assert torch.all(values[:-1] >= values[1:])
    assert torch.allclose(values, torch.linalg.eigvalsh(damped).flip(0), rtol=1e-10)
    assert Q[:, 0].abs().argmax().item() == 1  # the widest input direction first


@pytest.mark.parametrize("name,slice_head", [("tiny-llama-gqa", False), ("tiny-opt", True), ("tiny-qwen2", False)])
def test_predicted_parameter_count_equals_the_sliced_model(name, slice_head):
    model = load_model(name).eval()
    predicted = sliced_parameters(model, 72, slice_head)
    rotate_and_slice(model, token_ids(2, 8, seed=3), 72, slice_head=slice_head)
    assert parameter_count(model) == predicted


def test_width_for_ratio_is_the_nearest_multiple_of_round_to():
    model = load_model("tiny-llama").eval()
    dense = parameter_count(model)
    width, count = width_for_ratio(model, 0.3, round_to=16)
    assert width % 16 == 0 and count == sliced_parameters(model, width)
    target = 0.7 * dense
    for other in range(16, model.config.hidden_size + 1, 16):
        assert abs(sliced_parameters(model, other) - target) >= abs(count - target)


@pytest.mark.parametrize("name,reason", [("tiny-gemma2", "normalises each block's output"),
                                         ("tiny-gemma3", "normalises each block's output"),
                                         ("tiny-bloom", "adds the residual inside itself")])
def test_families_without_the_invariance_are_refused_in_one_line(name, reason):
    model = load_model(name).eval()
    with pytest.raises(UserError, match=reason) as err:
        rotate_and_slice(model, token_ids(2, 8), 32)
    assert "\n" not in str(err.value)


def test_a_sliced_model_is_not_sliced_again():
    model = load_model("tiny-llama").eval()
    rotate_and_slice(model, token_ids(2, 8), 128)
    with pytest.raises(UserError, match="already rotated and sliced"):
        rotate_and_slice(model, token_ids(2, 8), 64)
