"""Global sparsity as one truth: count locally, then ONE all-reduce.

Each rank counts the nonzeros of the elements it owns (see :mod:`dist_bregman.shards`),
writes all per-tensor ``(nonzero, total)`` pairs into one int64 buffer, and the buffer is
summed with a single collective. Every rank therefore holds the same integers, equal to the
counts of the unsharded model, and reads them back with one host synchronisation. That
needs every rank's buffer slots to be the same tensors: :func:`check_same_tensors` checks
it once at set-up, naming the ranks that differ, and :func:`measure_sparsity` on every
call, in its own buffer (:func:`reduce_counts` with ``agree=True``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dist_bregman import comm, kernels
from dist_bregman.compiling import eager
from dist_bregman.errors import RankDisagreementError, first_names
from dist_bregman.shards import LocalView, Placement, local_views, locate
from dist_bregman.shards.replicated import check_replicas
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
    """The (global) ranks whose local elements hold them (see
    :func:`dist_bregman.comm.rank_bit`)."""

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
        # x != 0 (NaN true, -0.0 false) as a cast, 1.5-3x faster than ne(0) on CPU; a copy
        # even of a bool tensor, so the in-place AND below never writes into ``values``.
        flags = values.to(torch.bool, copy=True)
    else:
        floor = kernels.floor_value(zero_tolerance, values.dtype)
        flags = values.abs().le(floor).logical_not_()
    if mask is not None:
        flags.logical_and_(mask.bool())
    return flags


def count_nonzero(
    values: torch.Tensor, mask: torch.Tensor | None, zero_tolerance: float = 0.0
) -> torch.Tensor:
    """Nonzeros of ``values * mask`` as a 0-d int64 tensor on ``values.device``, no sync."""
    return _sum_flags(nonzero_flags(values, mask, zero_tolerance))


def _sum_flags(flags: torch.Tensor) -> torch.Tensor:
    # On CPU count_nonzero of a bool tensor is a vectorised byte count, 12x faster than
    # summing the bytes into int64 (measured on 50 M flags); elsewhere the uint8 sum.
    if flags.is_cpu:
        return torch.count_nonzero(flags)
    return flags.view(torch.uint8).sum(dtype=torch.int64)


def zero_structures(flags: torch.Tensor) -> torch.Tensor:
    """``[zero_rows, zero_kernels]`` (int64, on ``flags.device``) of a nonzero-flags tensor.

    Rows are slices along dim 0 of tensors with ``ndim >= 2``; kernels are the ``(out, in)``
    slices of tensors with ``ndim >= 3`` (ConvNd weights). How many there are is known from
    the shape (:func:`structure_sizes`), so only the zero ones are counted on the device.
    """
    counts = []
    for groups, ndim in ((flags.shape[:1], 2), (flags.shape[:2], 3)):
        if flags.ndim < ndim:
            counts.append(torch.zeros((), dtype=torch.int64, device=flags.device))
            continue
        count, length = math.prod(groups), math.prod(flags.shape[ndim - 1 :])
        if length == 0:  # empty slices hold no nonzero: all of them are zero
            counts.append(torch.full((), count, dtype=torch.int64, device=flags.device))
            continue
        # Sizes spelled out: a shard with no rows (FSDP2, fewer rows than ranks) cannot
        # reshape to (0, -1). The byte max per slice is any(); on CPU 20x faster (measured
        # on 4000 x 4000 flags: 0.3 ms against 6.5 ms).
        alive = flags.reshape(count, length).view(torch.uint8).amax(dim=1).view(torch.bool)
        counts.append(count - _sum_flags(alive))
    return torch.stack(counts)


def structure_sizes(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, kernels)`` of a tensor of ``shape``, as :func:`zero_structures` counts them."""
    rows = shape[0] if len(shape) >= 2 else 0
    kernels = shape[0] * shape[1] if len(shape) >= 3 else 0
    return rows, kernels


def check_same_tensors(placements: Sequence[Placement], group: comm.ProcessGroup = None) -> None:
    """Raise :class:`~dist_bregman.errors.RankDisagreementError` on every rank unless all
    ranks measure the same tensors (names and global sizes). One all-reduce of a
    ``[world, 3]`` int64 table (each rank's count, elements and a 48-bit digest in its own
    row) on the tensors' device, as a measurement's; once at set-up
    (``SparsityController.attach``, ``MagnitudePruner.attach``), not per measurement.

    :func:`reduce_counts` sums the ranks' buffers slot by slot. Where ranks hold different
    layers (pipeline parallelism's stages), two stages of equal shapes were summed as one
    and reported as the model (128 of 128 weights where there were 256), and stages of
    unequal ones died in the collective (gloo: SIGABRT). Stages keep their layers' names
    in the whole model (DeepSpeed's ``PipelineModule``, torchtitan), so names tell them
    apart. (Not ``all_gather_object``: under NCCL it runs on the current CUDA device, which
    a loop that never called ``torch.cuda.set_device`` leaves at 0 on every rank.)"""
    check_replicas(placements)
    world = comm.get_world_size(group)
    if world == 1:
        return
    device = placements[0].target.values.device if placements else torch.device("cpu")
    sizes = [p.global_numel for p in placements]
    table = torch.zeros(world, 3, dtype=torch.int64)
    table[comm.get_rank(group)] = torch.tensor(
        [len(placements), sum(sizes), _digest([p.target.name for p in placements], sizes)]
    )
    rows = comm.all_reduce_sum(table.to(device), group).tolist()
    ranks = [rank for rank, row in enumerate(rows) if row != rows[0]]
    if not ranks:  # (every rank reduced the same table: all return, or all raise)
        return
    named = [0, *ranks[:3]]
    shown = "; ".join(
        f"rank {name}: {rows[rank][0]} tensors, {rows[rank][1]} elements"
        for rank, name in zip(named, comm.global_ranks(group, named), strict=True)
    )
    first, *others = comm.global_ranks(group, [0, *ranks])
    raise RankDisagreementError(
        f"ranks {others} measure other tensors than rank {first} ({shown}; names and sizes "
        f"compared): {_SAME_TENSORS}"
    )


_SAME_TENSORS = (
    "one all-reduce sums every rank's counts tensor by tensor, so each rank must hold the "
    "whole model or its shard of every measured tensor (DDP, FSDP, ZeRO, tensor "
    "parallelism); pipeline stages holding different layers are not supported as one "
    "model; allowed: each stage measured within its own ranks (group=the process group of "
    "the ranks holding that stage: its data-parallel ranks, with tensor parallelism inside "
    "the stage its dp x tp ranks)"
)


DIGEST_WORDS = 3
"""16-bit words of the 48-bit parameter-set digest a checked measurement carries."""


def _digest(names: Sequence[str], sizes: Sequence[int]) -> int:
    """48 bits of a hash of the measured tensors' names and global sizes, equal on ranks
    that measure the same tensors (a fixed hash: Python's ``hash`` of a string differs
    between processes)."""
    described = "\0".join(names) + "\1" + ",".join(map(str, sizes))
    return int.from_bytes(hashlib.blake2b(described.encode(), digest_size=6).digest(), "big")


def _agreement_words(names: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """The digest's words ``f`` and their squares ``f*f``: summed over ``W`` ranks, every
    rank's ``f`` is the same exactly when ``W * sum(f*f) == sum(f)**2`` (equality in
    Cauchy-Schwarz), so a sum, the measurement's own collective, says whether ranks
    agree. In int64 the sums stay exact below 2**31 ranks."""
    digest = _digest(names, sizes)
    words = [(digest >> (16 * i)) & 0xFFFF for i in range(DIGEST_WORDS)]
    return words + [word * word for word in words]


def _agreed(summed: Sequence[int], world: int) -> bool:
    """Whether :func:`_agreement_words` summed over ``world`` ranks came from equal words."""
    sums, squares = summed[:DIGEST_WORDS], summed[DIGEST_WORDS:]
    return all(world * sq == s * s for s, sq in zip(sums, squares, strict=True))


def reduce_counts(
    placements: Sequence[Placement],
    *,
    zero_tolerance: float = 0.0,
    group: comm.ProcessGroup = None,
    sync: bool = True,
    structure: bool = False,
    extra: Sequence[torch.Tensor] = (),
    agree: bool = False,
) -> tuple[SparsityReport, list[int]]:
    """Count the targets' elements and sum the counts over ``group`` with one collective.

    ``structure=True`` also counts all-zero rows and kernels (node and kernel sparsity) in
    the same pass and the same buffer. Non-finite elements are counted in the same pass too,
    with the ranks that hold them, so corrupt weights are seen by every rank at once.
    ``extra`` are 0-d integer tensors (flags such as "this rank saw a non-finite loss")
    that ride along in the same buffer and come back summed over ranks, so a check that
    every rank must agree on costs no extra collective. ``agree=True`` checks in the same
    buffer that every rank measures the same tensors (names and global sizes), and raises
    :class:`~dist_bregman.errors.RankDisagreementError` on every rank where they do not,
    for callers that did not run :func:`check_same_tensors` (ranks summing other tensors
    slot by slot would report a model nobody holds). With ``sync=False`` nothing is
    communicated and each rank reports what it holds, copies of another rank's shard
    (HSDP) included.
    """
    if not placements:
        raise ValueError("no tensors to measure: the parameter set is empty")
    world = comm.get_world_size(group)
    distributed = sync and world > 1
    with torch.no_grad():  # (a DTensor's to_local is then its local tensor, no autograd op)
        views = local_views(placements, group) if distributed else [p.local() for p in placements]
    if structure:
        flat = [p.target.name for p, v in zip(placements, views, strict=True) if not v.rows_whole]
        if flat:
            raise ValueError(
                f"node/kernel sparsity needs whole rows on each rank, but {flat} are split "
                f"into flat shards (FSDP1 / ZeRO-3); allowed: element sparsity there, or "
                f"FSDP2 (fully_shard, Shard(0)) / DDP for group sparsity"
            )
    device = _device(placements, views)
    if device.type == "meta":
        raise ValueError(_on_meta(placements))
    names = [placement.target.name for placement in placements]
    expected = [view.global_numel for view in views]
    words = _agreement_words(names, expected) if distributed and agree else []
    with torch.no_grad():
        buffer = _count_buffer(views, zero_tolerance, device, structure, words, extra, group)
        if words:  # the same length on ranks that measure different numbers of tensors
            buffer = torch.nn.functional.pad(buffer, (0, _checked_length(buffer.numel())))
    if distributed:
        buffer = comm.all_reduce_sum(buffer, group)
    numbers = buffer.tolist()  # the one host synchronisation
    n = len(placements)
    if words:
        if not _agreed(numbers[: len(words)], world):
            raise RankDisagreementError(
                f"ranks do not all measure the same tensors (rank {comm.get_rank(group)}: "
                f"{n} tensors, {sum(expected)} elements; names and sizes compared within the "
                f"measurement's all-reduce): {_SAME_TENSORS}"
            )
        numbers = numbers[len(words) :]
    tail = 2 * n + (4 * n if structure else 0)  # then: non-finite count, rank bits, extra
    structured = [0, 0, 0, 0]
    if structure:
        structured = [sum(numbers[2 * n + slot :: 4][:n]) for slot in range(4)]
    nonzeros, totals = numbers[:n], numbers[n : 2 * n]
    # (whole lists compared: this runs at every measurement)
    if (distributed or world == 1) and totals != expected:
        i = next(i for i in range(n) if totals[i] != expected[i])
        members = comm.group_members(group)
        within = (
            ""
            if members is None
            else f" (measured within group= of global ranks "
            f"{first_names([str(r) for r in sorted(members)], 8)}, which must hold "
            f"every rank holding a part of these tensors: a pipeline stage's data-parallel "
            f"ranks, and with tensor parallelism inside the stage its dp x tp ranks)"
        )
        raise RuntimeError(
            f"{placements[i].target.name}: ranks counted {totals[i]} elements, but the "
            f"tensor has {expected[i]}: shards or replicas were lost or counted twice{within}"
        )
    report = SparsityReport(
        nonzero=sum(nonzeros),
        total=sum(totals),
        per_parameter=dict(zip(names, zip(nonzeros, totals, strict=True), strict=True)),
        zero_rows=structured[0],
        rows=structured[1],
        zero_kernels=structured[2],
        kernels=structured[3],
        nonfinite=numbers[tail],
        nonfinite_ranks=tuple(comm.ranks_from_bits(numbers[tail + 1], group)),
    )
    return report, numbers[tail + 2 : tail + 2 + len(extra)]


@eager
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
    discovers: the ``weight`` of every Linear, ConvNd and Embedding module, the input
    projections of every MultiheadAttention and the weight matrices of every RNN. ``model``
    may be wrapped (DDP, FSDP1, FSDP2, a DeepSpeed engine's module). Under a process group
    this is a collective (every rank of ``group`` must call it), unless ``sync=False``;
    ranks measuring other tensors than each other (pipeline stages) raise
    :class:`~dist_bregman.errors.RankDisagreementError` on every rank.
    """
    if zero_tolerance < 0 or zero_tolerance != zero_tolerance:
        raise ValueError(f"zero_tolerance={zero_tolerance!r}: expected a number >= 0")
    placements = locate(model, parameters_to_prune)
    report, _ = reduce_counts(
        placements, zero_tolerance=zero_tolerance, group=group, sync=sync, agree=True
    )
    return report


def _device(placements: Sequence[Placement], views: Sequence[LocalView]) -> torch.device:
    """Where to count: the first local values, else where the first parameter lives."""
    for view in views:
        if view.values is not None:
            return view.values.device
    return placements[0].target.values.device


def _on_meta(placements: Sequence[Placement]) -> str:
    """Why tensors on the meta device cannot be measured (torch had said "Cannot copy out
    of meta tensor; no data!")."""
    names = [p.target.name for p in placements if p.target.values.is_meta]
    shown = first_names(names, 3)
    return (
        f"{shown}: on the meta device (made under torch.device('meta') or an empty init, "
        f"not yet materialized), so there are no values to count; allowed: measure once "
        f"the weights exist (after module.to_empty(device=...) and their initialization, "
        f"or once Lightning's strategy has set the model up)"
    )


CHECKED_SLOTS = 1024
"""A measurement that checks in its own buffer that every rank measures the same tensors
(``agree=True``) pads that buffer with zeros to at least this many int64 slots (8 KiB),
then to a power of two: ranks measuring different numbers of tensors (pipeline stages
measured as one model) then still meet in the one all-reduce, its leading digest words
tell them apart, and every rank raises; buffers of different lengths had died in the
collective (gloo: SIGABRT on one rank, a read error on the other; NCCL does not check).
Up to ~500 tensors (~170 counting rows) every rank's buffer is this long; beyond, stages
whose buffers fall in different powers of two would still fail there. (At 2 ranks on
gloo, measure_sparsity of 4 tensors took the same time padded, within noise; 4,096 slots
had added ~0.3 ms to 0.6.)"""


def _checked_length(length: int) -> int:
    """The zeros that pad a checked buffer of ``length`` slots (see :data:`CHECKED_SLOTS`)."""
    return max(CHECKED_SLOTS, 1 << (length - 1).bit_length()) - length


def _count_buffer(
    views: Sequence[LocalView],
    zero_tolerance: float,
    device: torch.device,
    structure: bool,
    words: Sequence[int],
    extra: Sequence[torch.Tensor],
    group: comm.ProcessGroup,
) -> torch.Tensor:
    """``[words..., nonzero_0..n-1, total_0..n-1, ([zero_rows, rows, zero_kernels, kernels]
    per view), non-finite count, non-finite rank bit, extra...]`` as one int64 tensor on
    ``device`` (``words``: host integers, :func:`_agreement_words` or none; first, so that
    they sit in the same slots on ranks that measure different numbers of tensors).

    CPU tensors are counted by the one-pass kernel in a single call, zero rows and kernels
    included (:mod:`dist_bregman.kernels`); the rest with torch ops. Nothing here waits for
    the device: counts stay on it, and the numbers the host knows (sizes) reach it in one
    copy through :func:`~dist_bregman.comm.to_device`.
    """
    n = len(views)
    values = [view.values for view in views]
    counted = kernels.count_nonzero_many(
        values, [view.mask for view in views], zero_tolerance, structure
    )
    host = [[0] * n] * 5 if counted is None else counted.tolist()
    rest = [i for i in range(n) if not host[4][i] and values[i] is not None]
    sizes = [[view.numel for view in views]]
    if structure:
        shapes = [() if v is None else v.shape for v in values]
        sizes += [list(column) for column in zip(*map(structure_sizes, shapes), strict=True)]
    if not rest and device.type == "cpu":
        # All counts are host integers already (the kernel's, or none held here): the
        # buffer is laid out as a list and made a tensor once. The torch ops below, a
        # dozen on tiny tensors, took twice as long (measured at 150 tensors, the
        # kernel's own time aside: 0.23 against 0.12 ms).
        numbers = [*words, *host[0], *sizes[0]]
        if structure:
            per_view = zip(host[2], sizes[1], host[3], sizes[2], strict=True)
            numbers += [number for view in per_view for number in view]
        bad = sum(host[1])
        numbers += [bad, comm.own_bit(group) if bad else 0]
        numbers += [int(flag) for flag in extra]
        return torch.tensor(numbers, dtype=torch.int64)
    flat_sizes = [size for row in sizes for size in row]
    known = comm.to_device(torch.tensor(flat_sizes + list(words), dtype=torch.int64), device)
    if counted is not None and any(host[4]):  # its columns are zero where it did not count
        nonzero = comm.to_device(counted[0], device)
        bad = comm.to_device(counted[1].sum(), device)
        zeros = comm.to_device(counted[2:4].t(), device)
        if rest:  # accelerator tensors beside CPU ones
            more = _count_with_torch(views, rest, zero_tolerance, device, structure)
            nonzero, bad, zeros = nonzero + more[0], bad + more[1], zeros + more[2]
    else:  # accelerator tensors, no kernel, or nothing held here (all zero then)
        nonzero, bad, zeros = _count_with_torch(views, rest, zero_tolerance, device, structure)
    row = [known[i * n : (i + 1) * n] for i in range(len(sizes))]
    parts = [known[len(flat_sizes) :], nonzero, row[0]]
    if structure:
        parts.append(torch.stack([zeros[:, 0], row[1], zeros[:, 1], row[2]], dim=1).flatten())
    parts.append(torch.stack([bad, comm.rank_bit(bad > 0, group)]))
    if extra:
        flags = [comm.to_device(e.to(torch.int64), device) for e in extra]
        parts.append(torch.stack(flags))
    return torch.cat(parts)


TOGETHER_NUMEL = 1 << 20
"""Accelerator tensors up to this many elements are counted together (:func:`_count_together`);
larger ones one by one, where a launch is small beside the bytes read."""


def _count_with_torch(
    views: Sequence[LocalView],
    rest: Sequence[int],
    zero_tolerance: float,
    device: torch.device,
    structure: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-view nonzeros ``[n]``, the non-finite total (0-d) and zero rows/kernels
    ``[n, 2]`` of the views ``rest``, which the kernel did not count (accelerator tensors,
    no kernel); the other views count zero. Built from 0-d device tensors and stacked:
    indexing a CUDA tensor with host indices would copy them, and wait."""
    n = len(views)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    counts = [zero] * n
    structures = [torch.zeros(2, dtype=torch.int64, device=device)] * n
    bads = [zero]
    together = [
        i
        for i in rest
        if views[i].values.device.type != "cpu"  # type: ignore[union-attr]
        and 0 < views[i].values.numel() <= TOGETHER_NUMEL  # type: ignore[union-attr]
    ]
    grouped = set(together)
    one_by_one = [i for i in rest if i not in grouped]
    if together:
        counts_together, structures_together, bad = _count_together(
            [views[i].values for i in together],  # type: ignore[misc]
            [views[i].mask for i in together],
            zero_tolerance,
            structure,
        )
        for i, count in zip(together, counts_together, strict=True):
            counts[i] = comm.to_device(count, device)
        if structures_together is not None:
            for i, zeros in zip(together, structures_together, strict=True):
                structures[i] = comm.to_device(zeros, device)
        bads.append(comm.to_device(bad, device))
    for i in one_by_one:
        values, mask = views[i].values, views[i].mask
        assert values is not None
        values = _countable(values)
        flags = nonzero_flags(values, mask, zero_tolerance)
        counts[i] = comm.to_device(_sum_flags(flags), device)
        bads.append(comm.to_device(_count_nonfinite(values), device))
        if structure:
            structures[i] = comm.to_device(zero_structures(flags), device)
    return torch.stack(counts), torch.stack(bads).sum(), torch.stack(structures)


def _countable(values: torch.Tensor) -> torch.Tensor:
    """``values`` in a dtype torch can reduce: float8 (one byte) has no sum or abs
    kernels, and float16 holds every float8 value exactly (zeros, NaN and Inf included),
    so the counts are those of the float8 tensor."""
    return values.to(torch.float16) if values.element_size() == 1 else values


def _count_nonfinite(values: torch.Tensor) -> torch.Tensor:
    if values.is_cpu and bool(torch.isfinite(values.sum())):
        # A sum of finite numbers is finite unless it overflows: one read, no temporary (on
        # CPU the check costs no device wait), and the exact count only when it is not.
        return torch.zeros((), dtype=torch.int64)
    # x - x is 0 for every finite x and NaN for NaN and +-Inf: one elementwise kernel,
    # where isfinite() is four on CUDA.
    return torch.count_nonzero(values - values)


def _count_together(
    values: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    zero_tolerance: float,
    structure: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """Nonzeros of many small tensors (0-d each), their ``[zero_rows, zero_kernels]`` (with
    ``structure``, else None) and their non-finite total, in a few kernels per (device,
    dtype, mask dtype) group instead of several per tensor.

    On a GPU a count of a small tensor is all launch cost (measured on an H100: a
    600-tensor model took 7 times a per-tensor ``sum``). Each group is copied into one
    flat tensor (the bytes are few: only tensors up to :data:`TOGETHER_NUMEL` come here)
    and tested once; a running count of its nonzero flags gives the nonzeros of any slice
    as a difference of two entries. Tensors, rows and kernels are such slices; their
    bounds are computed on the host and reach the device in one copy.
    """
    values = [_countable(v) for v in values]
    groups: dict[tuple[object, ...], list[int]] = {}
    for k, (v, m) in enumerate(zip(values, masks, strict=True)):
        key = (v.device, v.dtype, None if m is None else m.dtype)
        groups.setdefault(key, []).append(k)
    counts: dict[int, torch.Tensor] = {}
    structures: dict[int, torch.Tensor] = {}
    bads = []
    for members in groups.values():
        flat = torch.cat([values[k].reshape(-1) for k in members])
        mask = None
        if masks[members[0]] is not None:
            mask = torch.cat([masks[k].reshape(-1) for k in members])  # type: ignore[union-attr]
        flags = nonzero_flags(flat, mask, zero_tolerance)
        # running[i]: the nonzeros among the first i elements (written after a leading 0).
        running = torch.empty(flat.numel() + 1, dtype=torch.int64, device=flat.device)
        running[:1].zero_()
        torch.cumsum(flags.view(torch.uint8), 0, out=running[1:])
        numels = torch.tensor([values[k].numel() for k in members], dtype=torch.int64)
        ends = numels.cumsum(0)
        offsets = ends - numels
        host = [offsets, ends]  # the tensors' bounds in flat
        if structure:
            shapes = [values[k].shape for k in members]
            host += [*_slices(numels, offsets, shapes, 1), *_slices(numels, offsets, shapes, 2)]
        bounds = list(comm.to_device(torch.cat(host), flat.device).split([len(h) for h in host]))
        per_tensor = running[bounds[1]] - running[bounds[0]]
        for k, count in zip(members, per_tensor.unbind(), strict=True):
            counts[k] = count
        if structure:
            zeros = torch.zeros(len(members), 2, dtype=torch.int64, device=flat.device)
            for column in range(2):  # rows, then kernels
                starts, stops, owners = bounds[2 + 3 * column : 5 + 3 * column]
                all_zero = (running[stops] - running[starts]).eq(0).to(torch.int64)
                zeros[:, column].index_add_(0, owners, all_zero)
            for k, zero in zip(members, zeros.unbind(), strict=True):
                structures[k] = zero
        bads.append(_count_nonfinite(flat))
    order = range(len(values))
    per_structure = [structures[k] for k in order] if structure else None
    return [counts[k] for k in order], per_structure, torch.stack(bads).sum()


def _slices(
    numels: torch.Tensor, offsets: torch.Tensor, shapes: Sequence[torch.Size], lead: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(starts, stops, owners)`` (host int64) of the slices along the first ``lead`` dims
    (1: rows, 2: ``(out, in)`` kernels) of tensors laid end to end at ``offsets``; tensors
    with ``lead`` dims or fewer have none. Vectorised: no Python loop over the slices."""
    slices = torch.tensor(
        [math.prod(shape[:lead]) if len(shape) > lead else 0 for shape in shapes],
        dtype=torch.int64,
    )
    length = numels // slices.clamp_min(1)
    owners = torch.repeat_interleave(torch.arange(len(shapes)), slices)
    first = (slices.cumsum(0) - slices)[owners]  # index of each owner's first slice
    index = torch.arange(len(owners)) - first  # the slice's place within its tensor
    starts = offsets[owners] + index * length[owners]
    return starts, starts + length[owners], owners
