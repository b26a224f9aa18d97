"""compiling.eager: the call runs outside any compiled graph, without Dynamo's warnings,
whether its first call is eager or inside a compiled function."""

from __future__ import annotations

import pytest
import torch

from dist_bregman import kernels
from dist_bregman.compiling import eager
from tests.helpers.dynamo import dynamo_warnings


@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_eager_keeps_an_untraceable_call_out_of_the_graph(first: str) -> None:
    if kernels.extension() is None:
        pytest.skip("needs the C++ kernel (no compiler here): the call it keeps out")
    traced: list[bool] = []

    @eager
    def l1(x: torch.Tensor) -> torch.Tensor:
        traced.append(torch.compiler.is_compiling())  # True only while Dynamo traces it
        sums = kernels.abs_sum_many([x], [None])  # a pybind call Dynamo cannot trace
        assert sums is not None
        return sums[0, 0].float()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (2 * x).sum() + l1(x)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager")
    x = torch.tensor([1.0, -2.0, 0.5])
    with dynamo_warnings() as warned:
        runs = [loss, compiled, compiled] if first == "eager" else [compiled, compiled, loss]
        values = [float(run(x)) for run in runs]
    assert values == [2 * (-0.5) + 3.5] * 3
    assert traced == [False] * 3
    assert warned == []
