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

from dist_bregman.export import _csr, _from_csr, export_sparse, load_sparse


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
