"""The exact k smallest elements of a set spread over ranks, as the unsharded set would give.

Magnitude pruning needs "the k smallest |w|" over tensors that no rank holds whole. Sorting
a gathered copy is out of the question for large models, and a sampled or approximate
threshold gives each rank (and each strategy) a slightly different mask. Instead:

* keys: ``|w|`` (or a row score) as float64, whose bit pattern, read as int64, orders
  nonnegative floats exactly (bf16/fp16/fp32 values embed in float64 exactly);
* radix select: 8 bits per round from the top, one all-reduce of a ``[groups, 256]``
  histogram per round, 8 rounds, gives the exact k-th key ``tau`` and the count below it;
* ties at ``tau`` are broken in global element order (tensor order, then flattened index),
  so the pruned set is a function of the values alone: with one more all-reduce of each
  rank's tie counts, every rank knows how many of its ties come first. (The caller orders
  a tensor's shards by rank: flattened order where each shard is one run of it, as under
  DDP, FSDP1, FSDP2 ``Shard(0)`` and ZeRO; under tensor parallelism's ``Shard(1)`` the
  shards' order instead, the same on every rank.)

A key may weigh more than one (a row of a matrix stands for its elements): then ``k`` is a
weight, and the selection is the shortest run of keys in (key, global order) whose weights
reach it. The keys of one tensor weigh the same, which keeps the tie rule a count.

``reduce`` sums an int64 tensor over ranks (the identity in one process). Pure torch
otherwise; :mod:`dist_bregman.comm` supplies the collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
DIGIT_BITS = 8
BINS = 1 << DIGIT_BITS


def keys_of(scores: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys of nonnegative scores (float64 bit patterns), flattened."""
    return scores.detach().to(torch.float64).abs().reshape(-1).view(torch.int64)


@dataclass(frozen=True, slots=True)
class Cut:
    """Where one group's k smallest keys end."""

    threshold: int
    """The key where the selection ends: the k-th smallest with unit weights (-1 when
    k == 0: nothing is selected)."""
    below: int
    """Weight of the keys strictly smaller than ``threshold`` (all selected)."""
    ties: int
    """Weight still to select among the keys equal to ``threshold``, the first ones in
    order (with unit weights: how many of them are selected)."""


def radix_select(
    keys: Sequence[Sequence[torch.Tensor]],
    ks: Sequence[int],
    reduce: Reduce,
    weights: Sequence[Sequence[int]] | None = None,
) -> list[Cut]:
    """For each group ``g`` (a list of local key tensors), where its ``ks[g]`` smallest keys
    over all ranks end; with ``weights`` (one per local tensor, for each of its keys), where
    the smallest keys whose weights sum to ``ks[g]`` or more end. Every rank must call this
    with the same group structure."""
    groups = len(keys)
    device = next((t.device for group in keys for t in group), torch.device("cpu"))
    prefix = [0] * groups
    below = [0] * groups
    need = list(ks)
    for shift in range(64 - DIGIT_BITS, -1, -DIGIT_BITS):
        histogram = torch.zeros(groups, BINS, dtype=torch.int64, device=device)
        for g, group in enumerate(keys):
            if need[g] <= 0:
                continue
            for t, local in enumerate(group):
                if shift < 64 - DIGIT_BITS:
                    local = local[
                        (local >> (shift + DIGIT_BITS)) == (prefix[g] >> (shift + DIGIT_BITS))
                    ]
                digits = (local >> shift) & (BINS - 1)
                weight = 1 if weights is None else weights[g][t]
                histogram[g] += torch.bincount(digits, minlength=BINS) * weight
        counts = reduce(histogram).tolist()
        for g in range(groups):
            if need[g] <= 0:
                continue
            running = 0
            for digit, count in enumerate(counts[g]):
                if running + count >= need[g]:
                    prefix[g] |= digit << shift
                    below[g] += running
                    need[g] -= running
                    break
                running += count
    return [
        Cut(-1, 0, 0) if ks[g] <= 0 else Cut(prefix[g], below[g], need[g]) for g in range(groups)
    ]


def select_mask(keys: torch.Tensor, cut: Cut, ties_before: int, weight: int = 1) -> torch.Tensor:
    """Which of ``keys`` (local, in global order, each weighing ``weight``) are among the
    selected: those below the threshold, and each tie whose predecessors among the ties
    (``ties_before``: their weight on earlier tensors and ranks) leave the cut's quota
    unfilled."""
    if cut.threshold < 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    chosen = keys < cut.threshold
    allowed = -((ties_before - cut.ties) // weight)  # ceil((ties - before) / weight)
    if allowed > 0:
        equal = keys == cut.threshold
        chosen |= equal & (torch.cumsum(equal.to(torch.int64), 0) <= allowed)
    return chosen
