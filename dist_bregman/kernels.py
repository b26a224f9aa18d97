"""The CPU kernels, compiled on first use: counting nonzeros and summing ``|x|``, each one
pass and one call for all tensors.

Counting nonzeros with torch ops costs 3-5 times a plain read of the same bytes on CPU,
4-7 times with all-zero rows (the bool temporaries and their reductions are not
bandwidth-bound; ``benchmarks/results/measure_throughput_torch_ops.md``); the kernel in
``csrc/count_nonzero.cpp`` reads each word once (a 2^16-word range that holds a NaN or Inf
twice, to count them). It is built with ``torch.utils.cpp_extension`` the first time it
is needed (about 20 s on 2 cores, g++ and ninja; cached in ``TORCH_EXTENSIONS_DIR``, ranks
share the build through its lock). Without a compiler, or with
``DIST_BREGMAN_NO_EXTENSION=1``, counting falls back to torch ops: same numbers, slower
(``benchmarks/measure_throughput.py`` shows both). The same build sums
``|values * mask|`` for the L1 value the loss term reports (:func:`abs_sum_many`) and
writes that value's gradient in loss mode (:class:`AbsSumGradient`).
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dist_bregman.compiling import eager

SOURCE = Path(__file__).parent / "csrc" / "count_nonzero.cpp"
_PACK = {torch.float16: "e", torch.bfloat16: None, torch.float32: "f", torch.float64: "d"}
"""The float types the kernel reads, in its order (``float_index`` in the C++), with their
``struct`` codes (bfloat16 has none)."""


@functools.cache
def extension() -> Any | None:
    """The compiled module, or None (disabled, or the build failed: warned once)."""
    if os.environ.get("DIST_BREGMAN_NO_EXTENSION") == "1":
        return None
    failures = []
    try:  # it imports setuptools, which torch 2.10 required only on Python >= 3.12
        from torch.utils.cpp_extension import load
    except ImportError as error:
        failures.append(f"torch.utils.cpp_extension: {error}")
    else:
        built = _build(load, failures)
        if built is not None:
            return built
    warnings.warn(
        f"dist_bregman: the CPU counting kernel could not be built ({'; '.join(failures)}); "
        f"counting with torch ops instead (same numbers, slower)",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _build(load: Callable[..., Any], failures: list[str]) -> Any | None:
    """The kernel built by ``torch.utils.cpp_extension.load``, or None, each failed
    attempt's reason added to ``failures``.

    ATen's parallel_for is a header template: compiled without -fopenmp it runs the whole
    range on the calling thread (measured: 2 threads read no faster than 1). Linked with
    -fopenmp it joins the libgomp torch has already loaded (same soname), so it uses
    torch's pool and honours torch.set_num_threads. A compiler without OpenMP (Apple
    clang) still gets the kernel, single-threaded."""
    for flags in (["-O3", "-fopenmp"], ["-O3"]):
        try:
            return load(
                name="dist_bregman_count",
                sources=[str(SOURCE)],
                extra_cflags=flags,
                extra_ldflags=[f for f in flags if f == "-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # no compiler or headers: try plainer, then torch ops
            failures.append(f"{' '.join(flags)}: {type(error).__name__}: {error}")
    return None


def representable_floor(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` number not above ``value`` (>= 0). For a representable x,
    ``|x| <= value`` exactly when ``|x| <= representable_floor(value)``, so comparing in
    ``dtype`` against this is exact (against ``value`` rounded to nearest it is not)."""
    floor = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(floor) > value:
        floor = torch.nextafter(floor, torch.zeros((), dtype=dtype))
    return floor


@functools.lru_cache(maxsize=64)
def floor_value(value: float, dtype: torch.dtype) -> float:
    """:func:`representable_floor` as a Python float: exact in ``dtype``, so a comparison
    with a ``dtype`` tensor casts it without rounding, and no host tensor has to be copied
    to the device (a host synchronisation on CUDA)."""
    return float(representable_floor(value, dtype))


def tolerance_bits(dtype: torch.dtype, zero_tolerance: float) -> int:
    """Bit pattern of :func:`representable_floor` of the tolerance, as the kernel compares."""
    if zero_tolerance == 0.0:
        return 0
    code = _PACK[dtype]
    assert code is not None
    raw = struct.pack("<" + code, floor_value(zero_tolerance, dtype))
    return int.from_bytes(raw, "little")


@functools.lru_cache(maxsize=16)
def _tolerance_table(zero_tolerance: float) -> tuple[int, ...]:
    """The kernel's tolerance bits for float16, bfloat16, float32 and float64 (-1 for
    bfloat16 with a tolerance: no exact bits here, torch ops count those tensors)."""
    return tuple(
        -1 if zero_tolerance and _PACK[dtype] is None else tolerance_bits(dtype, zero_tolerance)
        for dtype in _PACK
    )


def count_nonzero_many(
    values: Sequence[torch.Tensor | None],
    masks: Sequence[torch.Tensor | None],
    zero_tolerance: float,
    structure: bool = False,
) -> torch.Tensor | None:
    """Int64 ``[5, n]`` (CPU) in one pass: per tensor, the nonzeros of ``values * mask``,
    the non-finite elements of ``values``, with ``structure`` the all-zero dim-0 rows
    (tensors with ``ndim >= 2``) and ``(out, in)`` kernels (``ndim >= 3``) of
    ``values * mask`` as :func:`~dist_bregman.sparsity.zero_structures` counts them, and 1
    where the tensor was counted; None without the kernel.

    The kernel counts contiguous CPU tensors of float16, bfloat16, float32 or float64
    whose mask is None or a contiguous CPU float tensor of the same size and element width
    (bfloat16 only without a tolerance; with ``structure`` not empty tensors). It decides
    that itself, in C++: checked here it cost about a microsecond a tensor, at every
    measurement. Its columns for the other tensors (and for None) are zero; the caller
    counts those with torch ops."""
    module = extension()
    if module is None:
        return None
    return module.count_nonzero_many(values, masks, _tolerance_table(zero_tolerance), structure)


def abs_sum_many(
    values: Sequence[torch.Tensor | None], masks: Sequence[torch.Tensor | None]
) -> torch.Tensor | None:
    """Float64 ``[2, n]`` (CPU) in one pass: per tensor, ``sum |values * mask|`` (the L1
    norm of the effective weight, summed in float64) and 1 where the tensor was summed;
    None without the kernel. It sums contiguous CPU float32 and float64 tensors whose mask
    is None or a contiguous CPU tensor of the same dtype and size; its columns for the
    others (and for None) are zero, for the caller to sum with torch ops. The sum does not
    depend on the thread count (fixed chunks, added in order)."""
    module = extension()
    if module is None:
        return None
    return module.abs_sum_many(values, masks)


class AbsSumGradient(torch.autograd.Function):
    """Gives ``total``, a value of ``sum_i w_i * sum |v_i * m_i|`` computed from
    :func:`abs_sum_many`'s sums, the gradient in the ``v_i`` that autograd would give it,
    bit for bit: ``w_i * sign(v_i * m_i) * m_i`` (0 at 0, as for ``abs``), each element
    written once by the kernel's ``abs_sum_gradient``. Autograd through ``v.abs().sum()``
    writes ``|v|`` in the forward pass and ``sgn(v)`` and the gradient in the backward (with
    a mask, ``v * m`` in both). Only where autograd records: ``apply`` costs about a
    microsecond per tensor. ``apply(total, weights, masks, *values)``, the ``v_i`` tensors
    :func:`abs_sum_many` summed."""

    @staticmethod
    def forward(
        ctx: Any,
        total: torch.Tensor,
        weights: list[float],
        masks: list[torch.Tensor | None],
        *values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.weights, ctx.masks = weights, masks
        ctx.save_for_backward(*values)
        return total.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = _abs_sum_gradient(ctx.saved_tensors, ctx.masks, ctx.weights, grad)
        return (None, None, None, *grads)


@eager  # a compiled step that calls backward() would trace into it
def _abs_sum_gradient(
    values: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    grad: torch.Tensor,
) -> list[torch.Tensor]:
    """:class:`AbsSumGradient`'s gradients, from the kernel that summed the values."""
    module = extension()
    assert module is not None  # the values were summed by it
    # grad is a host float32 number (total's): reading it does not sync a device.
    return list(module.abs_sum_gradient(values, masks, weights, float(grad)))
