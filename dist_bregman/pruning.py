"""Scheduled magnitude pruning, identical on every rank: the framework-free core.

:class:`~dist_bregman.SafeModelPruning` is the Lightning adapter. At each pruning event
the ``amount`` of the measured set is made zero: the smallest magnitudes (unstructured) or
the rows/filters with the smallest Ln norms (structured), over all tensors at once
(``use_global``) or per tensor. Natural zeros and zeros made by ``BregmanPruner`` count
toward the amount, because they are the smallest magnitudes.

Why it is safe under every strategy:

* the threshold is the exact k-th value over all ranks' shards (:mod:`.selection`), ties
  broken by global element order, so every rank's mask is the slice of the mask the
  unsharded model would get;
* masks are applied where the weights really live (module storage, DTensor shards, flat
  shards, ZeRO-3 partitions) and in the tensors the optimizer steps (fp32 masters), and
  re-applied after every optimizer step, so no step and no master copy brings a pruned
  weight back;
* no ``torch.nn.utils.prune`` re-parametrisation is added (it cannot be applied to an
  FSDP- or ZeRO-3-wrapped model): the weights stay plain tensors with exact zeros, so a
  checkpoint loads into a fresh, unpruned model as it is, and the masks are re-derived
  from those zeros on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dist_bregman import comm, logs
from dist_bregman.config import check_choice, check_int, check_number
from dist_bregman.holders import Holding, groups_key, holding
from dist_bregman.selection import Cut, keys_of, radix_select, select_mask
from dist_bregman.shards import Placement, place, refresh_copies
from dist_bregman.shards.base import LocalView
from dist_bregman.shards.dtensor import local_tensor
from dist_bregman.shards.replicated import balanced_owners
from dist_bregman.sparsity import (
    SparsityReport,
    check_same_tensors,
    nonzero_flags,
    reduce_counts,
)
from dist_bregman.targets import ParameterPairs, check_writable, left_out, resolve

Schedule = Literal["linear", "cubic"]


@dataclass(kw_only=True, slots=True)
class PruningConfig:
    """Settings of :class:`MagnitudePruner` (and ``SafeModelPruning``)."""

    amount: float = 0.5
    """Fraction of the measured set that is zero after a pruning event (the first one,
    when ``scheduled_pruning``), in [0, 1]."""
    scheduled_pruning: bool = False
    """Ramp from ``amount`` to ``final_amount`` over ``epochs_to_ramp`` units."""
    final_amount: float | None = None
    """Fraction reached at the end of the ramp; required with ``scheduled_pruning``."""
    epochs_to_ramp: int = 10
    """Length of the ramp, in ``prune_unit`` units (epochs by default)."""
    schedule: Schedule = "cubic"
    """``"linear"``, or ``"cubic"``: Zhu & Gupta (2017), ``s_t = s_f + (s_i - s_f)(1 - t/n)^3``,
    which prunes fast early, while the network can still recover, and gently late."""
    structured: bool = False
    """Prune whole slices along ``dim`` (rows/filters for ``dim=0``) ranked by Ln norm;
    ``amount`` stays a share of the elements (slices until their elements reach it)."""
    dim: int = 0
    """The dimension whose slices are units when ``structured``."""
    norm: float = 1.0
    """n of the Ln norm that ranks units when ``structured`` (1: L1, 2: L2)."""
    use_global: bool = True
    """One threshold over all measured tensors (False: ``amount`` of each tensor)."""
    prune_every: int = 1
    """Units between pruning events."""
    prune_unit: Literal["epoch", "step"] = "epoch"
    """Events at the end of every ``prune_every`` epochs, or after optimizer steps."""
    make_permanent_at_end: bool = True
    """At the end of fit stop enforcing masks: plain weights with the zeros in."""
    verbose: int = 0
    """0 silent, 1 one line per pruning event (rank 0)."""

    def __post_init__(self) -> None:
        check_number("amount", self.amount, low=0.0, high=1.0)
        if self.scheduled_pruning:
            if self.final_amount is None:
                raise ValueError(
                    "final_amount=None with scheduled_pruning=True: expected a number in "
                    "[amount, 1] (the fraction pruned at the end of the ramp)"
                )
            check_number("final_amount", self.final_amount, low=self.amount, high=1.0)
        elif self.final_amount is not None:
            check_number("final_amount", self.final_amount, low=0.0, high=1.0)
        check_int("epochs_to_ramp", self.epochs_to_ramp, low=0)
        check_choice("schedule", self.schedule, ("linear", "cubic"))
        check_choice("structured", self.structured, (True, False))
        check_int("dim", self.dim, low=0)
        check_number("norm", self.norm, low=0.0)
        if self.norm == 0.0:
            raise ValueError("norm=0.0: expected a number > 0 (the n of the Ln norm)")
        check_choice("use_global", self.use_global, (True, False))
        check_int("prune_every", self.prune_every, low=1)
        check_choice("prune_unit", self.prune_unit, ("epoch", "step"))
        check_choice("make_permanent_at_end", self.make_permanent_at_end, (True, False))
        check_choice("verbose", self.verbose, (0, 1))


def scheduled_amount(t: int, config: PruningConfig) -> float:
    """The amount for the event at unit ``t``: constant, or the ramp. ``t`` is the event's
    epoch index (``current_epoch``: 0 at the end of the first epoch) or its optimizer step,
    so with ``prune_every > 1`` or in steps the first event is already up the ramp."""
    if not config.scheduled_pruning:
        return config.amount
    assert config.final_amount is not None
    start, end, span = config.amount, config.final_amount, config.epochs_to_ramp
    progress = 1.0 if span == 0 else min(t / span, 1.0)
    if config.schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1.0 - progress) ** 3


@dataclass(frozen=True, slots=True)
class PruningEvent:
    """What one pruning event did."""

    amount: float
    """The scheduled fraction."""
    report: SparsityReport
    """Global counts of the measured set right after the event (identical on every rank)."""


class MagnitudePruner:
    """Masks for the measured tensors of one model, computed and kept identical on every
    rank. See the module docstring; :meth:`prune` and :meth:`attach` are collectives."""

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig | None = None,
        parameters_to_prune: ParameterPairs | None = None,
        *,
        group: comm.ProcessGroup = None,
    ) -> None:
        self.config = config if config is not None else PruningConfig()
        self.targets = resolve(model, parameters_to_prune)
        if parameters_to_prune is None and (missed := left_out(model, self.targets)):
            logs.warn0(missed, group)
        check_writable(self.targets, "a pruning mask")
        self.group = group
        self.masks: list[torch.Tensor | None] = []
        """Per placement, the local elements that are pruned (True), or None."""
        self.placements: list[Placement] = []
        self._holdings: list[Holding] = []
        self._handles: list[RemovableHandle] = []
        self._optimizers: tuple[Any, ...] = ()
        self._groups: tuple[tuple[int, int], ...] = ()
        self._checked = False
        """Whether every rank was found to measure these placements' tensors (at
        :meth:`attach`, else at the first :meth:`prune`; again after :meth:`bind`)."""
        self.bind(model)

    # ------------------------------------------------------------------ set-up
    def bind(self, model: nn.Module) -> None:
        """Read the layouts from ``model`` as wrapped for training (see ``SparsityController``)."""
        self.detach()
        self.placements = place(model, self.targets)
        self._checked = False
        self.masks = [None] * len(self.placements)
        for placement in self.placements:
            if self.config.structured and placement.sharded and self.config.dim != 0:
                raise ValueError(
                    f"structured=True, dim={self.config.dim}: {placement.target.name} is "
                    f"sharded over ranks, and slices along dim {self.config.dim} are not kept "
                    f"whole there; allowed: dim=0 under sharding (any dim under DDP)"
                )
            if self.config.structured and not placement.view().rows_whole:
                raise ValueError(
                    f"structured=True: {placement.target.name}'s rows are not whole on any "
                    f"rank ({placement.row_split}); allowed: structured=False there, or "
                    f"DDP / FSDP2 (Shard(0)) for structured pruning"
                )

    def attach(self, *optimizers: Any, check: bool = True) -> None:
        """Re-apply the masks after every step of these optimizers, in the tensors they step.
        ``check``: first check that every rank measures the same tensors (a collective,
        :func:`~dist_bregman.sparsity.check_same_tensors`); a caller that has checked the
        same set passes False."""
        if check:
            check_same_tensors(self.placements, self.group)
        self._checked = True
        self.detach()
        self._optimizers, self._groups = optimizers, groups_key(optimizers)
        for optimizer in optimizers:
            holds = holding(optimizer, self.placements)
            if holds.held:
                self._holdings.append(holds)
                hook = partial(self._after_step, holds)
                self._handles.append(holds.optimizer.register_step_post_hook(hook))

    def follow_groups(self) -> bool:
        """Attach again if the optimizers' param groups changed since :meth:`attach` (a
        finetuning callback unfreezing layers adds a group): without it the pruned weights
        of those layers grew back at their first steps. Returns whether it did."""
        if not self._optimizers or groups_key(self._optimizers) == self._groups:
            return False
        self.attach(*self._optimizers, check=False)  # the same tensors, other groups
        return True

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._holdings.clear()

    # ------------------------------------------------------------------ pruning
    def prune(self, amount: float) -> PruningEvent:
        """Make ``amount`` of the measured set zero (see the module docstring). A collective."""
        check_number("amount", amount, low=0.0, high=1.0)
        if not self._checked:  # unattached (magnitude_init_): stages would pick one cut
            check_same_tensors(self.placements, self.group)
            self._checked = True
        rank, world = comm.get_rank(self.group), comm.get_world_size(self.group)
        data = [p.local() for p in self.placements]
        counter = self._counters(rank, world)
        counted = [c == rank for c in counter]
        scores = [self._scores(view) for view in data]
        keys = [keys_of(score) for score in scores]
        groups = (
            [list(range(len(keys)))] if self.config.use_global else [[i] for i in range(len(keys))]
        )
        sizes = [self._units(p) for p in self.placements]
        weights = [self._weight(p, units) for p, units in zip(self.placements, sizes, strict=True)]
        ks = [round(amount * sum(sizes[i] * weights[i] for i in group)) for group in groups]
        cuts = radix_select(
            [[keys[i] for i in group if counted[i]] for group in groups],
            ks,
            self._reduce,
            [[weights[i] for i in group if counted[i]] for group in groups],
        )
        cut_of = {i: cuts[g] for g, group in enumerate(groups) for i in group}
        ties_before, _ = self._ties_before(
            keys, weights, counted, groups, cut_of, counter, rank, world
        )
        for i, view in enumerate(data):
            units = select_mask(keys[i], cut_of[i], ties_before[i], weights[i])
            self.masks[i] = self._expand(units, view)
        self.enforce()
        report, _ = reduce_counts(self.placements, group=self.group)
        return PruningEvent(amount, report)

    def hold_zeros(self, free: tuple[int, int] = (0, 0), zero_tolerance: float = 0.0) -> int:
        """Hold every zero of the measured set but those whose place among the zeros, in
        global element order, is in ``[free[0], free[1])``; return how many zeros there are.

        A zero is ``|x| <= zero_tolerance`` of the effective weight, as the measurement
        counts it (held ones are made exactly zero). The order is the selection's tie
        order (tensors in order, then each tensor's shards in the order of the ranks that
        count them), so a range of places names the same elements on every rank, and a
        frozen support's state (see ``SparsityController``) is a count, not a mask. Where
        each shard is one run of the flattened tensor (one process, DDP, FSDP1, FSDP2 and
        HSDP with ``Shard(0)``, ZeRO) that is flattened order, the same in every such
        layout; a ``Shard(1)`` (row-wise tensor parallelism) or ``_StridedShard`` (FSDP2
        over TP) cuts the flattened order into pieces, so it may name other zeros there.
        A collective: one all-reduce of the zero counts (and :meth:`enforce`)."""
        rank, world = comm.get_rank(self.group), comm.get_world_size(self.group)
        data = [p.local() for p in self.placements]
        counter = self._counters(rank, world)
        counted = [c == rank for c in counter]
        zeros = [self._scores(view).reshape(-1) <= zero_tolerance for view in data]
        keys = [z.logical_not().to(torch.int64) for z in zeros]  # 0: a zero (the tie key)
        n = len(keys)
        before, totals = self._ties_before(
            keys,
            [1] * n,
            counted,
            [list(range(n))],
            dict.fromkeys(range(n), Cut(0, 0, 0)),
            counter,
            rank,
            world,
        )
        for i, (view, zero) in enumerate(zip(data, zeros, strict=True)):
            if view.values is None:
                self.masks[i] = None
                continue
            place = torch.cumsum(zero.to(torch.int64), 0).add_(before[i] - 1)
            freed = (place >= free[0]) & (place < free[1])
            self.masks[i] = (zero & ~freed).view(view.values.shape)
        self.enforce()
        return sum(totals)

    def _counters(self, rank: int, world: int) -> list[int]:
        """For each placement, the rank (in :attr:`group`) that counts it here. Every rank
        masks all it holds (replicas too), but each element enters a selection once: from
        that rank."""
        owners = balanced_owners([p.global_numel for p in self.placements], world)
        members = comm.group_members(self.group)
        counters = []
        for i, placement in enumerate(self.placements):
            if not placement.sharded:
                counters.append(owners[i])
                continue
            counter = placement.counter(members)
            counters.append(rank if counter is None else comm.group_rank(self.group, counter))
        return counters

    def _units(self, placement: Placement) -> int:
        """Units of a tensor: elements, or slices along ``dim`` when structured."""
        if not self.config.structured:
            return placement.global_numel
        return int(placement.target.values.shape[self.config.dim])

    def _weight(self, placement: Placement, units: int) -> int:
        """What one unit counts toward a global structured amount: its elements, so that
        ``amount`` is the share of the set's elements, whatever the slice lengths (ranked
        by slice count, pruning the long rows first could overshoot it by far). Units
        count one otherwise, as ``torch.nn.utils.prune``'s per-tensor amounts do (there,
        per tensor, a share of its slices is the same share of its elements)."""
        if not (self.config.structured and self.config.use_global) or units == 0:
            return 1
        return placement.global_numel // units

    def _scores(self, view: LocalView) -> torch.Tensor:
        """Per-unit magnitudes of the local effective weights (0 where a prune mask is 0)."""
        if view.values is None:
            return torch.zeros(0, dtype=torch.float64)
        values = view.values.to(torch.float64)
        if view.mask is not None:
            values = values * (view.mask != 0)
        if not self.config.structured:
            return values.abs()
        dim, n = self.config.dim, self.config.norm
        # Sizes spelled out, not -1: an FSDP2 shard may hold no rows, and (0, -1) is
        # ambiguous to reshape.
        per_unit = math.prod(size for axis, size in enumerate(values.shape) if axis != dim)
        units = values.movedim(dim, 0).reshape(values.shape[dim], per_unit)
        score = units.abs().pow(n).sum(dim=1).pow(1.0 / n)
        if self.config.use_global:  # comparable across layers: norm per element^(1/n)
            score = score / max(units.shape[1], 1) ** (1.0 / n)
        return score

    def _ties_before(
        self,
        keys: list[torch.Tensor],
        weights: list[int],
        counted: list[bool],
        groups: list[list[int]],
        cut_of: dict[int, Cut],
        counter: list[int],
        rank: int,
        world: int,
    ) -> tuple[list[int], list[int]]:
        """For each tensor, the weight of the ties that precede its local units in global
        order (tensors in order; within a tensor, shards in the order of the ranks that
        count them; a replica takes the place of the copy that is counted), and the weight
        of its ties over all ranks. One collective."""
        n = len(keys)
        mine = torch.zeros(world, n, dtype=torch.int64)
        for i in range(n):
            if counted[i] and cut_of[i].threshold >= 0:
                mine[rank, i] = int((keys[i] == cut_of[i].threshold).sum()) * weights[i]
        table = self._reduce(mine)
        totals = table.sum(dim=0).tolist()
        before = [0] * n
        for group in groups:
            running = 0
            for i in group:
                before[i] = running + int(table[: counter[i], i].sum())
                running += totals[i]
        return before, totals

    def _expand(self, units: torch.Tensor, view: LocalView) -> torch.Tensor | None:
        """A unit mask as an element mask shaped like the local values."""
        if view.values is None:
            return None
        if not self.config.structured:
            return units.view(view.values.shape)
        shape = [1] * view.values.ndim
        shape[self.config.dim] = -1
        return units.view(shape).expand_as(view.values).contiguous()

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_sum(tensor, self.group)

    # ------------------------------------------------------------------ enforcement
    def enforce(self) -> None:
        """Zero the pruned elements in the weights, in the optimizers' own tensors and in
        the copies forwards read (:func:`~dist_bregman.shards.refresh_copies`: a collective
        under ZeRO-3 with persistent parameters)."""
        with torch.no_grad():
            for placement, mask in zip(self.placements, self.masks, strict=True):
                view = placement.local()
                if mask is not None and view.values is not None:
                    view.values.masked_fill_(mask, 0)
            for holds in self._holdings:
                self._zero_held(list(holds.tensors.values()), holds)
            refresh_copies(self.placements, self.group)

    def _after_step(self, holds: Holding, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                self._zero_held(group["params"], holds)

    def _zero_held(self, params: list[torch.Tensor], holds: Holding) -> None:
        for p in params:
            for part in holds.parts.get(id(p), ()):
                mask = self.masks[part.index]
                if mask is None:
                    continue
                local = local_tensor(p)
                piece = local if part.region is None else local[part.region]
                flat = mask if part.local is None else mask.reshape(-1)[part.local]
                piece.masked_fill_(flat.view(piece.shape), 0)

    def derive_masks(self, zero_tolerance: float = 0.0) -> None:
        """Masks from the zeros in the weights (after a resume: pruned weights are zero in
        every checkpoint). A weight that is zero without being pruned becomes pruned, as
        the next pruning event would make it anyway. With a tolerance, ``|x| <=
        zero_tolerance`` counts as zero, as the measurement counts it, and such weights are
        made exactly zero (:meth:`enforce`, a collective under ZeRO-3)."""
        for i, placement in enumerate(self.placements):
            view = placement.local()
            if view.values is None:
                self.masks[i] = None
            else:
                self.masks[i] = nonzero_flags(view.values, None, zero_tolerance).logical_not_()
        if zero_tolerance > 0.0:
            self.enforce()

    def release(self) -> None:
        """Stop enforcing: the weights keep their zeros as plain tensors."""
        self.detach()
        self.masks = [None] * len(self.placements)

    @property
    def active(self) -> bool:
        """Whether masks are being enforced."""
        return any(mask is not None for mask in self.masks)
