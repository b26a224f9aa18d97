"""Full copies on every rank: one process, DDP, ZeRO-1/2 module parameters."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Container, Sequence

from dist_bregman.shards.base import LocalView, Placement


class Replicated(Placement):
    """Every rank holds the whole tensor. Counted by one owner rank (see ``local_views``):
    summing replicas would multiply the count by the world size."""

    sharded = False

    @property
    def global_numel(self) -> int:
        return self.target.values.numel()

    def view(self, members: Container[int] | None = None) -> LocalView:
        values, mask = self.target.tensors()  # the parameter itself: counted under no_grad
        numel = values.numel()
        return LocalView(values, mask, numel, numel, True)


def balanced_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Assign each tensor to a rank so that every rank counts about the same bytes.

    Largest first onto the least-loaded rank (ties to the lower rank): deterministic, so
    every rank computes the same assignment from the same model without communicating.
    """
    return list(_balanced_owners(tuple(sizes), world_size))


@functools.lru_cache(maxsize=16)
def _balanced_owners(sizes: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    """Cached: the sizes of a model's tensors do not change between measurements."""
    loads = [(0, rank) for rank in range(world_size)]
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return tuple(owners)
