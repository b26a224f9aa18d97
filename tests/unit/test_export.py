"""The exported CSR arrays equal torch's own ``to_sparse_csr`` and load back exactly."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dist_bregman.export import _csr, _from_csr


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
