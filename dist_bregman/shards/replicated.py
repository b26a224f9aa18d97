"""Full copies on every rank: one process, DDP, ZeRO-1/2 module parameters."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from dist_bregman.shards.base import LocalView, Placement


class Replicated(Placement):
    """Every rank holds the whole tensor. Counted by one owner rank (see ``local_views``):
    summing replicas would multiply the count by the world size."""

    sharded = False

    @property
    def global_numel(self) -> int:
        return self.target.values.numel()

    def view(self) -> LocalView:
        values, mask = self.target.tensors()
        return LocalView(values.detach(), mask, values.numel(), values.numel(), rows_whole=True)


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
