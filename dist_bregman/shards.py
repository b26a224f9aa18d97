"""The part of each target tensor that this rank counts.

Every rank contributes counts for the elements it *owns*, and one all-reduce sums them, so
the result is the unsharded model's count on every rank. Ownership is the whole point:

* A replicated tensor (one process, DDP, ZeRO-1/2) is identical on every rank. Summing it
  over ranks would multiply the count by the world size, so each replica is owned by
  exactly one rank. Owners are spread over ranks, balanced by size, so a measurement under
  DDP reads each byte once in the whole job instead of once per rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dist_bregman.targets import Target


@dataclass(frozen=True, slots=True)
class LocalView:
    """What one rank counts of one target."""

    values: torch.Tensor | None
    """Local elements to count, or ``None`` when another rank counts them."""
    mask: torch.Tensor | None
    """Prune mask aligned with ``values`` (same shape), or ``None``."""
    numel: int
    """Elements this rank contributes to the global total (0 for a replica owned elsewhere)."""
    global_numel: int
    """Elements of the full, unsharded tensor: what the reduced total must equal."""


def balanced_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Assign each tensor to a rank so that every rank counts about the same bytes.

    Largest first onto the least-loaded rank (ties to the lower rank): deterministic, so
    every rank computes the same assignment from the same model without communicating.
    """
    loads = [(0, rank) for rank in range(world_size)]
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners


def local_views(targets: Sequence[Target], rank: int, world_size: int) -> list[LocalView]:
    """This rank's share of ``targets`` when every rank holds a full replica of each."""
    pairs = [t.tensors() for t in targets]
    owners = balanced_owners([values.numel() for values, _ in pairs], world_size)
    views = []
    for (values, mask), owner in zip(pairs, owners, strict=True):
        numel = values.numel()
        if owner == rank:
            views.append(LocalView(values, mask, numel, numel))
        else:
            views.append(LocalView(None, None, 0, numel))
    return views
