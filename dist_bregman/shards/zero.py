"""DeepSpeed ZeRO-3 partitioned parameters.

Outside a module's forward a ZeRO-3 parameter is empty (``numel() == 0``); its elements
live in ``ds_tensor``: ``ceil(ds_numel / world)`` of them per rank, the flattened parameter
cut in rank order. The last rank's tail is padding allocated with ``torch.empty`` (garbage
such as 1.8e25 was seen), so only ``max(0, min(part, ds_numel - rank * part))`` elements
count. Parameters small enough to persist (``stage3_param_persistence_threshold``) are
whole on every rank after a forward, but their ``ds_tensor`` is still the partition: counting
partitions never double-counts them.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import torch
from torch import nn

from dist_bregman import comm
from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.targets import Target


def is_zero3_param(x: object) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3."""
    return hasattr(x, "ds_tensor") and hasattr(x, "ds_numel")


class ZeroPartition(Placement):
    """The valid part of this rank's ``ds_tensor``."""

    sharded = True

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        group = getattr(target.values, "ds_process_group", None)
        self.rank = comm.get_rank(group)
        if comm.get_world_size(group) != comm.get_world_size():
            raise NotImplementedError(
                f"{target.name}: a ZeRO-3 partition group of {comm.get_world_size(group)} "
                f"ranks in a world of {comm.get_world_size()} (MiCS) is not supported; "
                f"allowed: partitions over the whole world (plain ZeRO-3, or ZeRO++ hpZ, "
                f"whose primary partitions span it)"
            )

    @property
    def global_numel(self) -> int:
        return int(self.target.values.ds_numel)  # type: ignore[attr-defined]

    def valid(self) -> tuple[int, int]:
        """:func:`_valid` for this rank."""
        return _valid(self.target.values, self.rank)

    def view(self, members: Container[int] | None = None) -> LocalView:
        start, numel = self.valid()
        if numel == 0:
            return LocalView(None, None, 0, self.global_numel, rows_whole=False)
        values = self.target.values.ds_tensor.detach()[:numel]  # type: ignore[attr-defined]
        mask = self.target.tensors()[1]
        if mask is not None:
            mask = mask.reshape(-1)[start : start + numel]
        return LocalView(values, mask, numel, self.global_numel, rows_whole=False)


def _valid(param: Any, rank: int) -> tuple[int, int]:
    """(first flattened index, number of real elements) of ``rank``'s partition."""
    part = param.ds_tensor.numel()
    start = rank * part
    return start, max(0, min(part, int(param.ds_numel) - start))


def partitions(model: nn.Module) -> list[torch.Tensor]:
    """The real elements of this rank's partition of each ZeRO-3 parameter of ``model``:
    what a checkpoint saves of it, where ``state_dict()`` shows an empty tensor (between
    forwards) or a whole copy that may be stale (persistent parameters)."""
    found = []
    for param in model.parameters():
        if is_zero3_param(param):
            _, numel = _valid(param, comm.get_rank(getattr(param, "ds_process_group", None)))
            found.append(param.ds_tensor.detach()[:numel])  # type: ignore[attr-defined]
    return found


def refresh_copies(placements: Sequence[Placement], group: comm.ProcessGroup = None) -> None:
    """Make the copies of ZeRO-3 parameters that forwards read agree with the partitions,
    after a write into the partitions outside an optimizer step (a pruning event).

    DeepSpeed refreshes both kinds only after a step, so the zeros would reach the next
    forward late (measured: a forward right after a cut computed with the uncut weights):

    * ZeRO++ hpZ (``zero_hpz_partition_size``) keeps a secondary partition per node group
      for gathers: it is dropped, as DeepSpeed drops it after a step, and the next gather
      reads the primary partitions and rebuilds it;
    * a parameter under ``stage3_param_persistence_threshold`` (DeepSpeed's default keeps
      every small one) stays whole on every rank between forwards: the copy is rebuilt
      here, every rank writing its valid partition into a zero buffer and one all-reduce
      (float64: exact) summing them. A collective; nothing happens without a persistent
      parameter (the same set on every rank: persistence depends on size only).
    """
    for placement in placements:
        if isinstance(placement, ZeroPartition):
            placement.target.values.ds_secondary_tensor = None  # type: ignore[attr-defined]
    persistent = [
        p
        for p in placements
        if isinstance(p, ZeroPartition) and p.target.values.numel() == p.global_numel
    ]
    if not persistent:
        return
    sizes = [p.global_numel for p in persistent]
    buffer = torch.zeros(sum(sizes), dtype=torch.float64)
    offset = 0
    for placement, size in zip(persistent, sizes, strict=True):
        start, numel = placement.valid()
        view = placement.view()
        if view.values is not None:
            buffer[offset + start : offset + start + numel] = view.values.reshape(-1)
        offset += size
    buffer = comm.all_reduce_sum(buffer, group)
    offset = 0
    for placement, size in zip(persistent, sizes, strict=True):
        whole = placement.target.values
        whole.data.copy_(buffer[offset : offset + size].view(whole.shape))
        offset += size
