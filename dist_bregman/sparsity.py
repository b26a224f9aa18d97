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

from dist_bregman import comm
from dist_bregman.shards import LocalView, local_views
from dist_bregman.targets import ParameterPairs, Target, resolve


@dataclass(frozen=True, slots=True)
class SparsityReport:
    """Counts of the measured tensors, identical on every rank."""

    nonzero: int
    """Nonzero elements of the effective weights (``weight_orig * weight_mask`` if pruned)."""
    total: int
    """Elements measured, without shard padding and without counting replicas twice."""
    per_parameter: dict[str, tuple[int, int]]
    """Qualified name to ``(nonzero, total)``."""

    @property
    def sparsity(self) -> float:
        """Fraction of measured elements that are zero, in [0, 1] (NaN for an empty set)."""
        if self.total == 0:
            return float("nan")
        return 1.0 - self.nonzero / self.total


def count_nonzero(
    values: torch.Tensor, mask: torch.Tensor | None, zero_tolerance: float = 0.0
) -> torch.Tensor:
    """Nonzeros of ``values * mask`` as a 0-d int64 tensor on ``values.device``, no sync.

    A pruned position (mask 0) is zero whatever ``values`` holds there. With a tolerance,
    ``|x| <= zero_tolerance`` counts as zero. NaN is never zero, with or without one.
    """
    if zero_tolerance == 0.0:
        nonzero = values.ne(0)
    else:
        nonzero = values.abs().le(zero_tolerance).logical_not_()
    if mask is not None:
        nonzero.logical_and_(mask.ne(0))
    # Sum the bool bytes as uint8 into int64: avoids torch's slower bool reduction path.
    return nonzero.view(torch.uint8).sum(dtype=torch.int64)


def reduce_counts(
    targets: Sequence[Target],
    *,
    zero_tolerance: float = 0.0,
    group: comm.ProcessGroup = None,
    sync: bool = True,
    extra: Sequence[torch.Tensor] = (),
) -> tuple[SparsityReport, list[int]]:
    """Count ``targets`` and sum the counts over ``group`` with one collective.

    ``extra`` are 0-d integer tensors (flags such as "this rank saw a non-finite loss")
    that ride along in the same buffer and come back summed over ranks, so a check that
    every rank must agree on costs no extra collective. With ``sync=False`` nothing is
    communicated and every tensor is counted locally.
    """
    if not targets:
        raise ValueError("no tensors to measure: the parameter set is empty")
    distributed = sync and comm.get_world_size(group) > 1
    rank = comm.get_rank(group) if distributed else 0
    world = comm.get_world_size(group) if distributed else 1
    views = local_views(targets, rank, world)
    device = targets[0].values.device
    buffer = _count_buffer(views, zero_tolerance, device, extra)
    if distributed:
        buffer = comm.all_reduce_sum(buffer, group)
    numbers = buffer.tolist()  # the one host synchronisation
    n = len(targets)
    per_parameter = {}
    for index, (target, view) in enumerate(zip(targets, views, strict=True)):
        nonzero, total = numbers[index], numbers[n + index]
        if total != view.global_numel:
            raise RuntimeError(
                f"{target.name}: ranks counted {total} elements, but the tensor has "
                f"{view.global_numel}: shards or replicas were lost or counted twice"
            )
        per_parameter[target.name] = (nonzero, total)
    report = SparsityReport(
        nonzero=sum(numbers[:n]), total=sum(numbers[n : 2 * n]), per_parameter=per_parameter
    )
    return report, numbers[2 * n :]


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
    discovers: the ``weight`` of every Linear, ConvNd and Embedding module. Under a process
    group this is a collective (every rank of ``group`` must call it), unless ``sync=False``.
    """
    if zero_tolerance < 0 or zero_tolerance != zero_tolerance:
        raise ValueError(f"zero_tolerance={zero_tolerance!r}: expected a number >= 0")
    targets = resolve(model, parameters_to_prune)
    report, _ = reduce_counts(targets, zero_tolerance=zero_tolerance, group=group, sync=sync)
    return report


def _count_buffer(
    views: Sequence[LocalView],
    zero_tolerance: float,
    device: torch.device,
    extra: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``[nonzero_0..n-1, total_0..n-1, extra...]`` as one int64 tensor on ``device``."""
    n = len(views)
    owned = [i for i, view in enumerate(views) if view.values is not None]
    nonzero = torch.zeros(n, dtype=torch.int64, device=device)
    if owned:
        counts = [
            count_nonzero(views[i].values, views[i].mask, zero_tolerance).to(device)  # type: ignore[arg-type]
            for i in owned
        ]
        nonzero[owned] = torch.stack(counts)
    totals = torch.tensor([view.numel for view in views], dtype=torch.int64).to(device)
    parts = [nonzero, totals]
    if extra:
        parts.append(torch.stack([e.to(device=device, dtype=torch.int64) for e in extra]))
    return torch.cat(parts)
