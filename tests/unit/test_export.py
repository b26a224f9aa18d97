"""The exported CSR arrays equal torch's own ``to_sparse_csr`` and load back exactly; an
export of a wrapped model loads into a fresh plain one."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from dist_bregman.export import _csr, _from_csr, export_sparse, folded_state_dict, load_sparse
from tests.helpers.models import COMPUTED_WEIGHTS, compute_weight


@pytest.mark.parametrize("shape", [(), (7,), (1, 1), (6, 9), (4, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_csr_arrays_match_torch_and_round_trip(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    tensor = torch.randn(shape, generator=generator).to(dtype)
    tensor = tensor * (torch.rand(shape, generator=generator) < 0.4)  # natural zeros
    if tensor.numel() > 3:
        tensor.view(-1)[2] = math.nan  # kept, like any nonzero
    parts = _csr(tensor)
    matrix = tensor.reshape(tensor.shape[0], -1) if tensor.ndim else tensor.reshape(1, 1)
    with warnings.catch_warnings():  # torch's CSR is beta and says so: the reference only
        warnings.simplefilter("ignore")
        reference = matrix.to_sparse_csr()
    assert parts["crow_indices"].tolist() == reference.crow_indices().tolist()
    assert parts["col_indices"].tolist() == reference.col_indices().tolist()
    assert torch.equal(parts["values"].nan_to_num(), reference.values().nan_to_num())
    back = _from_csr(parts, list(tensor.shape))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.nan_to_num(), tensor.nan_to_num())


def _pruned_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[2].weight[:, :2] = 0.0  # natural zeros
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # a mask to fold in
    return model


@pytest.mark.parametrize("wrap", ["plain", "compile", "data_parallel"])
def test_export_of_a_wrapped_model_loads_into_a_fresh_plain_one(tmp_path: Path, wrap: str) -> None:
    model = _pruned_model()
    wrapped = {
        "plain": lambda m: m,
        "compile": torch.compile,  # OptimizedModule: keys under "_orig_mod." (not compiled here)
        "data_parallel": nn.DataParallel,  # keys under "module."
    }[wrap](model)
    layers = export_sparse(wrapped, tmp_path / "m.safetensors")
    assert [layer.name for layer in layers] == ["0.weight", "2.weight"]
    assert [layer.nonzero for layer in layers] == [24, 12]  # 48 - 24 masked, 18 - 6 natural
    fresh = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    fresh.load_state_dict(load_sparse(tmp_path / "m.safetensors"))  # strict: every key
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_export_refuses_a_measured_weight_missing_from_the_state_dict(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    weight = model[0].weight.detach().clone()
    del model[0]._parameters["weight"]
    model[0].weight = weight  # a plain attribute, as FSDP1 leaves it: measured, not saved
    with pytest.raises(ValueError, match=r"\['0.weight'\] are measured but not whole tensors"):
        export_sparse(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("kind", list(COMPUTED_WEIGHTS))
def test_a_computed_weight_is_exported_as_the_plain_weight_the_forward_uses(
    tmp_path: Path, kind: str
) -> None:
    """The file holds ``0.weight`` as computed (eval mode: no power iteration), not its
    originals: export raised 'not whole tensors in the state_dict'. The model's own buffers
    are left as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    compute_weight(model[0], kind)
    x = torch.randn(4, 6)
    for _ in range(3):  # spectral_norm's u, v move in training-mode forwards
        model(x)
    with torch.no_grad():
        model[2].weight[:, :3] = 0.0
    model.eval()
    expected = model(x)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    report = export_sparse(model, tmp_path / "m.safetensors")
    assert [(r.name, r.nonzero) for r in report] == [("0.weight", 48), ("2.weight", 15)]
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plain.load_state_dict(load_sparse(tmp_path / "m.safetensors"))  # strict: plain keys only
    assert torch.allclose(plain(x), expected, atol=1e-6)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_a_pruned_original_is_exported_as_the_sparse_weight_it_computes(tmp_path: Path) -> None:
    """Pruning weight_norm's direction (what the pruners ask for in place of the computed
    weight) exports the computed weight in CSR form, its zeros those of the mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.utils.parametrizations.weight_norm(model[0])
    pairs = [(model[0].parametrizations.weight, "original1"), (model[2], "weight")]
    prune.l1_unstructured(model[0].parametrizations.weight, "original1", amount=0.5)
    x = torch.randn(4, 6)
    expected = model(x)
    report = export_sparse(model, tmp_path / "m.pt", parameters_to_prune=pairs, file_format="torch")
    assert [(r.name, r.nonzero) for r in report] == [("0.weight", 24), ("2.weight", 24)]
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plain.load_state_dict(load_sparse(tmp_path / "m.pt"))
    assert torch.allclose(plain(x), expected, atol=1e-6)


def test_folded_state_dict_of_a_wrapped_model_is_keyed_as_the_plain_one() -> None:
    # It had kept DataParallel's (and DDP's) "module." prefix, unlike export_sparse.
    model = _pruned_model()
    folded = folded_state_dict(nn.DataParallel(model))
    plain = folded_state_dict(model)
    assert list(folded) == list(plain) and not any(k.endswith(("_orig", "_mask")) for k in plain)
    assert all(torch.equal(folded[k], plain[k]) for k in plain)
