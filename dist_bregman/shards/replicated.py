"""Full copies on every rank: one process, DDP, ZeRO-1/2 module parameters."""

from __future__ import annotations

import functools
import heapq
import sys
from collections.abc import Container, Sequence

import torch
from torch import nn

from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.shards.dtensor import is_dtensor
from dist_bregman.shards.zero import is_zero3_param


class Replicated(Placement):
    """Every rank holds the whole tensor. Counted by one owner rank (see ``local_views``):
    summing replicas would multiply the count by the world size."""

    sharded = False

    @property
    def global_numel(self) -> int:
        return self.target.values.numel()

    def view(self, members: Container[int] | None = None) -> LocalView:
        values, mask = self.target.tensors()  # the parameter itself: counted under no_grad
        if type(values) is not nn.Parameter:  # computed, a plain attribute, or sharded since
            check_whole(self.target.name, values)
        numel = values.numel()
        return LocalView(values, mask, numel, numel, True)


def check_replicas(placements: Sequence[Placement]) -> None:
    """:func:`check_whole` for every whole replica among ``placements``, on every rank
    alike (each rank reads every replica here, so all raise together, before a
    collective): where layouts are relied on before any check (the set-up check of every
    attach; measurements across ranks that check in their own buffer). Other measurements
    read only the replicas they count, and check there only what is cheap: the type."""
    for placement in placements:
        if isinstance(placement, Replicated):
            check_whole(placement.target.name, placement.target.values)


def check_whole(name: str, values: torch.Tensor) -> None:
    """Raise unless ``values``, read for a tensor placed as a whole replica, still is one:
    not a DTensor (``fully_shard`` since), not a parameter FSDP1 flattened (it holds this
    rank's slice: counted as the whole tensor, a shard of equal size on every rank read as
    the model, silently), not a ZeRO-3 parameter (empty: counted as 0 of 0 elements), not
    a view of storage FSDP1 freed (torch's own ops crashed on it: SIGSEGV). Each happens
    when the model is wrapped after its layouts were read."""
    if getattr(values, "_fsdp_flattened", False):
        held = (
            "flattened by FSDP1 into a flat parameter (this rank's slice) of a unit outside "
            "the model given (also where a weight is shared across FSDP1 units, which FSDP1 "
            "does not support: keep tied modules in one unit)"
        )
    elif "deepspeed" in sys.modules and is_zero3_param(values):  # (two failed lookups else)
        held = "partitioned by DeepSpeed ZeRO-3 (empty outside its forward)"
    elif type(values) is nn.Parameter:  # (a registered one: never a freed view)
        return
    elif is_dtensor(values):
        held = "a DTensor (sharded by fully_shard or tensor parallelism)"
    elif values.numel() and not values.is_meta and values.untyped_storage().data_ptr() == 0:
        held = "a view of storage that was freed (FSDP1's parameters outside its forward)"
    else:
        return
    raise RuntimeError(
        f"{name}: its layout was read as a whole tensor on every rank, but it is now {held}: "
        f"the model was wrapped or sharded after the layouts were read (or the module inside "
        f"an FSDP1 wrapper was passed); allowed: bind(model as wrapped) before attach "
        f"(SparsityController, MagnitudePruner), or the wrapped model to measure_sparsity"
    )


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
