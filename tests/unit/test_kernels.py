"""The compiled CPU kernels give the torch path's numbers, edge cases included: counts
exactly, L1 sums to float64 rounding."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dist_bregman import kernels, measure_sparsity
from dist_bregman.sparsity import count_nonzero, nonzero_flags, zero_structures

SPECIALS = [0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf")]
SPECIALS += [1e-3, -1e-3, 2.5e-4, 7.0]


def _needs_kernel() -> None:
    if kernels.extension() is None:
        pytest.skip("no C++ compiler on this machine: the torch path is the only path")


def _tensor(dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(70_001, generator=generator, dtype=torch.float64) * 1e-3
    values[torch.rand(values.shape, generator=generator) < 0.4] = 0.0
    values[: len(SPECIALS)] = torch.tensor(SPECIALS, dtype=torch.float64)
    # The kernel looks for non-finite values range by range (2^16 elements): an Inf alone
    # in this tensor's last range.
    values[-2] = float("inf")
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("zero_tolerance", [0.0, 1e-3, 3.3e-4])
def test_kernel_matches_the_torch_path(dtype: torch.dtype, zero_tolerance: float) -> None:
    _needs_kernel()
    values = [_tensor(dtype, seed) for seed in range(3)] + [torch.zeros(0, dtype=dtype)]
    masks = [None, (torch.rand(70_001) < 0.7).to(dtype), None, None]
    expected = [
        int(count_nonzero(v, m, zero_tolerance)) for v, m in zip(values, masks, strict=True)
    ]
    counted = kernels.count_nonzero_many(values, masks, zero_tolerance)
    assert counted is not None
    if dtype == torch.bfloat16 and zero_tolerance > 0:  # the one documented fallback
        assert counted.tolist() == [[0] * 4] * 5  # left to torch ops, all of them
        return
    assert counted[4].tolist() == [1] * 4 and counted[0].tolist() == expected
    # Non-finite values (SPECIALS holds NaN and +-Inf) in the same pass, mask or not.
    assert counted[1].tolist() == [int((~torch.isfinite(v)).sum()) for v in values]
    assert sum(counted[1].tolist()) > 0


def _structured(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with whole zero rows, zero kernels, near-zero rows (for a tolerance),
    a NaN in an otherwise zero row and an Inf."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    values[torch.rand(shape, generator=generator) < 0.3] = 0.0
    rows = values.reshape(shape[0], -1)
    rows[::3] = 0.0
    rows[1::5] *= 1e-4  # below the tolerance: zero rows only with one
    if len(shape) >= 3:
        kernels_view = values.reshape(shape[0], shape[1], -1)
        kernels_view[:, ::2] = 0.0
        kernels_view[2::4, 1] *= 1e-4
    rows[0, -1] = float("nan")  # a NaN is not zero: row 0 is alive
    rows[-1, 0] = float("inf")
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("zero_tolerance", [0.0, 1e-3])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_counts_zero_rows_and_kernels_like_torch(
    dtype: torch.dtype, zero_tolerance: float, threads: int
) -> None:
    """Node/kernel sparsity in the same pass: rows never split between threads, rows
    longer than a thread's chunk (2^16 elements), 1-D tensors (no rows), 2-D (rows only),
    Conv1d/2d/3d shapes, masks, a tolerance, NaN/Inf."""
    _needs_kernel()
    shapes = [(7,), (33, 17), (5, 70_000), (16, 8, 3), (24, 6, 3, 3), (6, 4, 2, 3, 3), (1, 1)]
    values = [_structured(shape, dtype, seed) for seed, shape in enumerate(shapes)]
    generator = torch.Generator().manual_seed(99)
    masks: list[torch.Tensor | None] = [
        None if k % 2 else (torch.rand(v.shape, generator=generator) < 0.8).to(dtype)
        for k, v in enumerate(values)
    ]
    masks[2] = torch.ones_like(values[2])
    masks[2][3] = 0.0  # a pruned row: zero whatever its values
    expected = []
    for v, m in zip(values, masks, strict=True):
        flags = nonzero_flags(v, m, zero_tolerance)
        rows, kernels_ = zero_structures(flags).tolist()
        expected.append([int(flags.sum()), int((~torch.isfinite(v)).sum()), rows, kernels_])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        counted = kernels.count_nonzero_many(values, masks, zero_tolerance, structure=True)
    finally:
        torch.set_num_threads(before)
    assert counted is not None
    assert counted[:4].t().tolist() == expected and counted[4].tolist() == [1] * len(shapes)
    assert all(row[2] > 0 for row in expected[1:6])  # the structure was really exercised
    assert all(row[3] > 0 for row in expected[3:6])


def test_kernel_counts_on_torchs_threads() -> None:
    # Built without -fopenmp, ATen's parallel_for silently runs on one thread (it did, and
    # counting was 1.3-1.7x slower than one read of the bytes); kernels.py links OpenMP.
    _needs_kernel()
    module = kernels.extension()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert module.threads_used(1000) == 2
        torch.set_num_threads(1)
        assert module.threads_used(1000) == 1
    finally:
        torch.set_num_threads(before)


def test_the_kernel_leaves_what_it_cannot_read_to_the_caller() -> None:
    """Column 4 says which tensors the kernel counted; the others' columns are zero."""
    _needs_kernel()
    base = torch.randn(8, 9)
    base[0] = 0.0
    values: list[torch.Tensor | None] = [
        base.t(),  # not contiguous
        base,  # with a bool mask: element widths differ
        base.to(torch.int32),  # not a float
        None,  # nothing held here
        base,  # with a float mask
        base[:, :0],  # empty: counted, but not with structure
        base.to(torch.float8_e4m3fn),  # one byte
    ]
    masks = [None, torch.ones(8, 9, dtype=torch.bool), None, None, torch.ones(8, 9), None, None]
    counted = kernels.count_nonzero_many(values, masks, 0.0)
    assert counted is not None
    assert counted[4].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert counted[0].tolist() == [0, 0, 0, 0, 63, 0, 0]  # 72 less the zero row
    structured = kernels.count_nonzero_many(values, masks, 0.0, structure=True)
    assert structured is not None and structured[4].tolist() == [0, 0, 0, 0, 1, 0, 0]
    assert structured[2].tolist() == [0, 0, 0, 0, 1, 0, 0]  # the zero row, of the one counted
    masked = kernels.count_nonzero_many([base], [torch.ones(9, 8).t()], 0.0)  # mask not contiguous
    assert masked is not None and masked.tolist() == [[0]] * 5


def test_the_kernels_leave_tensors_whose_memory_is_not_there_to_the_caller() -> None:
    """A view of storage that was freed (FSDP1 frees the storage its flattened parameters'
    views point into) is contiguous CPU float32 of the right size: the kernels had read it
    (SIGSEGV). Also as a mask."""
    _needs_kernel()
    backing = torch.randn(144)
    freed = backing[:72].view(8, 9)
    backing.untyped_storage().resize_(0)
    whole = torch.randn(8, 9)
    values: list[torch.Tensor | None] = [freed, whole, whole]
    masks: list[torch.Tensor | None] = [None, freed, None]
    counted = kernels.count_nonzero_many(values, masks, 0.0)
    assert counted is not None and counted[4].tolist() == [0, 0, 1]
    summed = kernels.abs_sum_many(values, masks)
    assert summed is not None and summed[1].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_sum_is_the_float64_l1_of_values_times_mask(dtype: torch.dtype) -> None:
    _needs_kernel()
    generator = torch.Generator().manual_seed(0)
    # 70,001 elements: two 2^16 chunks, and a tail that is not a multiple of the 16 lanes.
    values = [torch.randn(70_001, generator=generator).to(dtype) for _ in range(3)]
    values += [torch.randn(5, 7, generator=generator).to(dtype), torch.zeros(0, dtype=dtype)]
    masks: list[torch.Tensor | None] = [None] * len(values)
    masks[1] = (torch.rand(70_001, generator=generator) < 0.5).to(dtype)
    masks[3] = torch.randn(5, 7, generator=generator).to(dtype)  # any factor, not only 0/1
    summed = kernels.abs_sum_many(values, masks)
    assert summed is not None and summed.dtype == torch.float64
    assert summed[1].tolist() == [1.0] * len(values)
    for total, v, m in zip(summed[0].tolist(), values, masks, strict=True):
        effective = v if m is None else v * m  # the product in the weights' own dtype
        assert total == pytest.approx(float(effective.double().abs().sum()), rel=1e-12, abs=0)
    assert summed[0, 4] == 0.0


def test_abs_sum_keeps_nan_and_inf_and_ignores_the_thread_count() -> None:
    _needs_kernel()
    values = torch.randn(300_000, generator=torch.Generator().manual_seed(1))
    poisoned = [values.clone(), values.clone()]
    poisoned[0][123_456] = float("nan")
    poisoned[1][-1] = -float("inf")
    summed = kernels.abs_sum_many(poisoned, [None, None])
    assert summed is not None
    assert math.isnan(summed[0, 0]) and summed[0, 1] == float("inf")
    before = torch.get_num_threads()
    try:
        by_threads = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            by_threads.append(kernels.abs_sum_many([values], [None]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(by_threads[0], by_threads[1])  # bit for bit: chunks added in order


def test_abs_sum_leaves_what_it_cannot_read_to_the_caller() -> None:
    _needs_kernel()
    base = torch.randn(8, 9)
    values: list[torch.Tensor | None] = [
        base.t(),  # not contiguous
        base.to(torch.bfloat16),  # summed by torch ops
        base.to(torch.float16),
        None,
        base,  # a mask of another dtype
        base,  # a mask of another size
        base,  # a mask that is not contiguous
        base,
    ]
    masks = [None, None, None, None, torch.ones(8, 9, dtype=torch.float64), torch.ones(72, 2)]
    masks += [torch.ones(9, 8).t(), torch.ones(8, 9)]
    summed = kernels.abs_sum_many(values, masks)
    assert summed is not None
    assert summed[1].tolist() == [0.0] * 7 + [1.0]
    assert summed[0, :7].tolist() == [0.0] * 7
    assert float(summed[0, 7]) == pytest.approx(float(base.double().abs().sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_sum_gradient_is_autograds(dtype: torch.dtype) -> None:
    """Against ``sum w * |v * m|`` through autograd: the same gradient bit for bit (0 at
    exact zeros, -0.0 and NaN, masked elements 0, a mask of any factor, weights that float32
    rounds, a tensor of several chunks), the value to float rounding."""
    _needs_kernel()
    generator = torch.Generator().manual_seed(2)
    shapes = [(300, 7), (300, 7), (300, 7), (70_000, 3)]
    values = [torch.randn(*shape, generator=generator, dtype=dtype) for shape in shapes]
    values[0][:40] = 0.0  # the zeros a sparse model is made of
    values[0][40:45] = -0.0
    values[2][5, 3] = float("nan")
    mask = (torch.rand(300, 7, generator=generator) < 0.5).to(dtype)
    mask[::3] *= 2.5
    big_mask = (torch.rand(70_000, 3, generator=generator) < 0.3).to(dtype)
    masks: list[torch.Tensor | None] = [None, mask, None, big_mask]
    weights = [1.0, 0.3, 3.0, 1 / 7]
    leaves = [v.clone().requires_grad_() for v in values]
    sums = kernels.abs_sum_many(leaves, masks)
    assert sums is not None
    total = (sums[0] * torch.tensor(weights, dtype=torch.float64)).sum().float()
    fast = kernels.AbsSumGradient.apply(total, weights, masks, *leaves)
    (fast * 1.7).backward()  # an upstream gradient other than 1
    twins = [v.clone().requires_grad_() for v in values]
    slow = sum(
        w * (v if m is None else v * m).abs().sum().float()
        for v, m, w in zip(twins, masks, weights, strict=True)
    )
    (slow * 1.7).backward()
    assert fast.dtype == torch.float32
    assert float(fast.detach()) != float(fast.detach())  # the NaN reaches the value
    for leaf, twin in zip(leaves, twins, strict=True):
        assert leaf.grad.dtype == dtype
        assert torch.equal(leaf.grad.view(-1).view(torch.int8), twin.grad.view(-1).view(torch.int8))
    assert bool((leaves[0].grad[:45] == 0).all())
    finite = [v.nan_to_num(0.0) for v in values]
    sums = kernels.abs_sum_many(finite, masks)
    assert sums is not None
    expected = sum(
        w * float((v if m is None else v * m).double().abs().sum())
        for v, m, w in zip(finite, masks, weights, strict=True)
    )
    assert float((sums[0] * torch.tensor(weights, dtype=torch.float64)).sum()) == pytest.approx(
        expected, rel=1e-12
    )


def test_disabled_kernel_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_BREGMAN_NO_EXTENSION", "1")
    kernels.extension.cache_clear()
    try:
        assert kernels.count_nonzero_many([torch.ones(3)], [None], 0.0) is None
        assert kernels.abs_sum_many([torch.ones(3)], [None]) is None
    finally:
        monkeypatch.delenv("DIST_BREGMAN_NO_EXTENSION")
        kernels.extension.cache_clear()


def test_without_a_build_toolchain_counting_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.utils.cpp_extension imports setuptools, which torch 2.10 required only on
    Python 3.12+: where it is missing (a uv environment, say) the kernel is not built,
    and measuring says so once and counts with torch ops, as for a failed build."""
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", None)  # import fails
    kernels.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not be built \(torch.utils.cpp_ext"):
            assert kernels.count_nonzero_many([torch.ones(3)], [None], 0.0) is None
        layer = torch.nn.Linear(8, 4)
        with torch.no_grad():
            layer.weight[:, :3] = 0.0
        report = measure_sparsity(layer)  # the torch path, on the fallback
        assert (report.nonzero, report.total) == (20, 32)
    finally:
        monkeypatch.undo()
        kernels.extension.cache_clear()
