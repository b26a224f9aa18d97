"""Global sparsity as one truth: count locally, then ONE all-reduce.

Each rank counts the nonzeros of the elements it owns (see :mod:`dist_bregman.shards`),
writes all per-tensor ``(nonzero, total)`` pairs into one int64 buffer, and the buffer is
summed with a single collective. Every rank therefore holds the same integers, equal to the
counts of the unsharded model, and reads them back with one host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dist_bregman import comm, kernels
from dist_bregman.shards import LocalView, Placement, local_views, locate
from dist_bregman.targets import ParameterPairs


@dataclass(frozen=True, slots=True)
class SparsityReport:
    """Counts of the measured tensors, identical on every rank."""

    nonzero: int
    """Nonzero elements of the effective weights (``weight_orig * weight_mask`` if pruned)."""
    total: int
    """Elements measured, without shard padding and without counting replicas twice."""
    per_parameter: dict[str, tuple[int, int]]
    """Qualified name to ``(nonzero, total)``."""
    zero_rows: int = 0
    """All-zero rows (output neurons / filters) of the measured matrices, if counted."""
    rows: int = 0
    """Rows of the measured tensors with ``ndim >= 2``; 0 when structure was not counted."""
    zero_kernels: int = 0
    """All-zero ``(out, in)`` kernels of the measured ConvNd weights, if counted."""
    kernels: int = 0
    """Kernels of the measured ConvNd weights; 0 when none or not counted."""
    nonfinite: int = 0
    """NaN or infinite elements in the measured tensors (values, before the mask)."""
    nonfinite_ranks: tuple[int | str, ...] = ()
    """The ranks whose local elements hold them (see :func:`dist_bregman.comm.rank_bit`)."""

    @property
    def sparsity(self) -> float:
        """Fraction of measured elements that are zero, in [0, 1] (NaN for an empty set)."""
        if self.total == 0:
            return float("nan")
        return 1.0 - self.nonzero / self.total

    @property
    def node_sparsity(self) -> float | None:
        """Fraction of rows (neurons, filters) that are entirely zero, if counted."""
        return self.zero_rows / self.rows if self.rows else None

    @property
    def kernel_sparsity(self) -> float | None:
        """Fraction of ConvNd kernels that are entirely zero, if counted."""
        return self.zero_kernels / self.kernels if self.kernels else None


def nonzero_flags(
    values: torch.Tensor, mask: torch.Tensor | None, zero_tolerance: float = 0.0
) -> torch.Tensor:
    """Bool tensor: which elements of ``values * mask`` are nonzero.

    A pruned position (mask 0) is zero whatever ``values`` holds there. With a tolerance,
    ``|x| <= zero_tolerance`` counts as zero. NaN is never zero, with or without one.
    """
    if zero_tolerance == 0.0:
        flags = values.ne(0)
    else:
        floor = kernels.representable_floor(zero_tolerance, values.dtype).to(values.device)
        flags = values.abs().le(floor).logical_not_()
    if mask is not None:
        flags.logical_and_(mask.ne(0))
    return flags


def count_nonzero(
    values: torch.Tensor, mask: torch.Tensor | None, zero_tolerance: float = 0.0
) -> torch.Tensor:
    """Nonzeros of ``values * mask`` as a 0-d int64 tensor on ``values.device``, no sync."""
    return _sum_flags(nonzero_flags(values, mask, zero_tolerance))


def _sum_flags(flags: torch.Tensor) -> torch.Tensor:
    # Sum the bool bytes as uint8 into int64: avoids torch's slower bool reduction path.
    return flags.view(torch.uint8).sum(dtype=torch.int64)


def structure_counts(flags: torch.Tensor) -> torch.Tensor:
    """``[zero_rows, rows, zero_kernels, kernels]`` (int64) from a nonzero-flags tensor.

    Rows are slices along dim 0 of tensors with ``ndim >= 2``; kernels are the ``(out, in)``
    slices of tensors with ``ndim >= 3`` (ConvNd weights).
    """
    counts = [0, 0, 0, 0]
    parts = []
    if flags.ndim >= 2:
        alive = flags.reshape(flags.shape[0], -1).any(dim=1)
        parts.append((0, alive))
    if flags.ndim >= 3:
        alive = flags.reshape(flags.shape[0] * flags.shape[1], -1).any(dim=1)
        parts.append((2, alive))
    result = torch.tensor(counts, dtype=torch.int64, device=flags.device)
    for slot, alive in parts:
        result[slot] = alive.numel() - _sum_flags(alive)
        result[slot + 1] = alive.numel()
    return result


def reduce_counts(
    placements: Sequence[Placement],
    *,
    zero_tolerance: float = 0.0,
    group: comm.ProcessGroup = None,
    sync: bool = True,
    structure: bool = False,
    extra: Sequence[torch.Tensor] = (),
) -> tuple[SparsityReport, list[int]]:
    """Count the targets' elements and sum the counts over ``group`` with one collective.

    ``structure=True`` also counts all-zero rows and kernels (node and kernel sparsity) in
    the same pass and the same buffer. Non-finite elements are counted in the same pass too,
    with the ranks that hold them, so corrupt weights are seen by every rank at once.
    ``extra`` are 0-d integer tensors (flags such as "this rank saw a non-finite loss")
    that ride along in the same buffer and come back summed over ranks, so a check that
    every rank must agree on costs no extra collective. With ``sync=False`` nothing is
    communicated and each rank reports what it holds.
    """
    if not placements:
        raise ValueError("no tensors to measure: the parameter set is empty")
    world = comm.get_world_size(group)
    distributed = sync and world > 1
    if distributed:
        views = local_views(placements, comm.get_rank(group), world)
    else:
        views = [p.view() for p in placements]
    if structure:
        flat = [p.target.name for p, v in zip(placements, views, strict=True) if not v.rows_whole]
        if flat:
            raise ValueError(
                f"node/kernel sparsity needs whole rows on each rank, but {flat} are split "
                f"into flat shards (FSDP1 / ZeRO-3); allowed: element sparsity there, or "
                f"FSDP2 (fully_shard, Shard(0)) / DDP for group sparsity"
            )
    device = _device(placements, views)
    with torch.no_grad():
        buffer = _count_buffer(views, zero_tolerance, device, structure, extra, group)
    if distributed:
        buffer = comm.all_reduce_sum(buffer, group)
    numbers = buffer.tolist()  # the one host synchronisation
    n = len(placements)
    tail = 2 * n + (4 * n if structure else 0)  # then: non-finite count, rank bits, extra
    structured = [0, 0, 0, 0]
    if structure:
        structured = [sum(numbers[2 * n + slot :: 4][:n]) for slot in range(4)]
    per_parameter = {}
    for index, (placement, view) in enumerate(zip(placements, views, strict=True)):
        nonzero, total = numbers[index], numbers[n + index]
        if (distributed or world == 1) and total != view.global_numel:
            raise RuntimeError(
                f"{placement.target.name}: ranks counted {total} elements, but the tensor "
                f"has {view.global_numel}: shards or replicas were lost or counted twice"
            )
        per_parameter[placement.target.name] = (nonzero, total)
    report = SparsityReport(
        nonzero=sum(numbers[:n]),
        total=sum(numbers[n : 2 * n]),
        per_parameter=per_parameter,
        zero_rows=structured[0],
        rows=structured[1],
        zero_kernels=structured[2],
        kernels=structured[3],
        nonfinite=numbers[tail],
        nonfinite_ranks=tuple(comm.ranks_from_bits(numbers[tail + 1])),
    )
    return report, numbers[tail + 2 :]


def measure_sparsity(
    model: nn.Module,
    parameters_to_prune: ParameterPairs | None = None,
    *,
    zero_tolerance: float = 0.0,
    group: comm.ProcessGroup = None,
    sync: bool = True,
) -> SparsityReport:
    """The sparsity of ``model``'s prunable weights, the same number on every rank.

    ``parameters_to_prune=None`` measures what :class:`~dist_bregman.BregmanPruner`
    discovers: the ``weight`` of every Linear, ConvNd and Embedding module. ``model`` may be
    wrapped (DDP, FSDP1, FSDP2, a DeepSpeed engine's module). Under a process group this is
    a collective (every rank of ``group`` must call it), unless ``sync=False``.
    """
    if zero_tolerance < 0 or zero_tolerance != zero_tolerance:
        raise ValueError(f"zero_tolerance={zero_tolerance!r}: expected a number >= 0")
    placements = locate(model, parameters_to_prune)
    report, _ = reduce_counts(placements, zero_tolerance=zero_tolerance, group=group, sync=sync)
    return report


def _device(placements: Sequence[Placement], views: Sequence[LocalView]) -> torch.device:
    """Where to count: the first local values, else where the first parameter lives."""
    for view in views:
        if view.values is not None:
            return view.values.device
    return placements[0].target.values.device


def _count_buffer(
    views: Sequence[LocalView],
    zero_tolerance: float,
    device: torch.device,
    structure: bool,
    extra: Sequence[torch.Tensor],
    group: comm.ProcessGroup,
) -> torch.Tensor:
    """``[nonzero_0..n-1, total_0..n-1, (4 structure counts per view), non-finite count,
    non-finite rank bit, extra...]`` as one int64 tensor on ``device``. CPU tensors are
    counted by the one-pass kernel in a single call (:mod:`dist_bregman.kernels`); the
    rest, and structure counts, with torch ops."""
    n = len(views)
    owned = [i for i, view in enumerate(views) if view.values is not None]
    nonzero = torch.zeros(n, dtype=torch.int64, device=device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    shapes = torch.zeros(n, 4, dtype=torch.int64, device=device)
    fast = (
        []
        if structure
        else [
            i
            for i in owned
            if kernels.eligible(views[i].values, views[i].mask, zero_tolerance)  # type: ignore[arg-type]
        ]
    )
    if fast:
        counted = kernels.count_nonzero_many(
            [views[i].values for i in fast],  # type: ignore[misc]
            [views[i].mask for i in fast],
            zero_tolerance,
        )
        if counted is None:
            fast = []
        elif len(fast) == n:  # the common case: every tensor local and on CPU
            nonzero = counted[0].to(device)
            bad = counted[1].sum().to(device)
        else:
            nonzero[fast] = counted[0].to(device)
            bad = bad + counted[1].sum().to(device)
    counted_fast = set(fast)
    slow = [i for i in owned if i not in counted_fast]
    if slow:
        counts, structures = [], []
        for i in slow:
            values = views[i].values
            assert values is not None
            flags = nonzero_flags(values, views[i].mask, zero_tolerance)
            counts.append(_sum_flags(flags).to(device))
            bad = bad + _sum_flags(torch.isfinite(values).logical_not_()).to(device)
            if structure:
                structures.append(structure_counts(flags).to(device))
        nonzero[slow] = torch.stack(counts)
        if structure:
            shapes[slow] = torch.stack(structures)
    totals = torch.tensor([view.numel for view in views], dtype=torch.int64).to(device)
    parts = [nonzero, totals]
    if structure:
        parts.append(shapes.flatten())
    parts.append(torch.stack([bad, comm.rank_bit(bad > 0, group)]))
    if extra:
        parts.append(torch.stack([e.to(device=device, dtype=torch.int64) for e in extra]))
    return torch.cat(parts)
