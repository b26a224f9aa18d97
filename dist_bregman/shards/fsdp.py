"""FSDP1 (``FullyShardedDataParallel``) flat parameters.

FSDP1 flattens each wrapped unit's parameters into one ``FlatParameter``, pads it to a
multiple of the world size and gives each rank one contiguous shard (``HYBRID_SHARD``: the
shard group's size, each shard replicated across groups). Its metadata says,
for every original parameter, where its elements sit in this rank's shard
(``offset_in_shard``, ``numel_in_shard``) and which of its flattened indices they are
(``intra_param_start_idx``): the first gives the values without padding, the second the
matching slice of a full mask buffer. With ``use_orig_params=True`` the optimizer holds
1-D views of those slices; with ``False`` it holds the flat shard itself.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dist_bregman import comm
from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.targets import Target

try:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    HYBRID = (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2)
except ImportError:  # torch built without distributed support
    FullyShardedDataParallel = None  # type: ignore[assignment,misc]


class FlatPlacement(Placement):
    """One original parameter inside an FSDP1 flat parameter. Under ``HYBRID_SHARD`` the
    same shard sits on every shard group; the first group's copy is counted."""

    def __init__(self, target: Target, unit: Any, flat: Any, index: int) -> None:
        super().__init__(target)
        strategy = unit.sharding_strategy
        self.sharded = strategy != ShardingStrategy.NO_SHARD
        self.flat, self.index, self.handle = flat, index, unit._handle
        self.use_orig_params: bool = unit._use_orig_params
        self.param_name: str = flat._param_infos[index].param_name
        if strategy in HYBRID:  # counted by the first rank of this rank's replica group
            replicas = unit._inter_node_pg
            self._held_by(comm.group_ranks(replicas))

    @property
    def global_numel(self) -> int:
        return int(self.flat._numels[self.index])

    def _range(self) -> tuple[int, int, int]:
        """(offset in the local shard, elements here, first flattened index) of this param."""
        info = self.flat._shard_param_infos[self.index]
        if not info.in_shard:
            return 0, 0, 0
        return info.offset_in_shard, info.numel_in_shard, info.intra_param_start_idx

    def view(self, members: Container[int] | None = None) -> LocalView:
        if not self.counts_here(members):
            return LocalView(None, None, 0, self.global_numel, rows_whole=False)
        return self.local()

    def local(self) -> LocalView:
        offset, numel, start = self._range()
        if numel == 0:
            return LocalView(None, None, 0, self.global_numel, rows_whole=False)
        values = self.flat.detach()[offset : offset + numel]
        mask = self.target.tensors()[1]
        if mask is not None:
            mask = mask.reshape(-1)[start : start + numel]
        return LocalView(values, mask, numel, self.global_numel, rows_whole=False)

    def holder(self) -> tuple[torch.Tensor, slice | None]:
        if self.use_orig_params:
            return self.target.module._parameters[self.param_name], None  # type: ignore[return-value]
        offset, numel, _ = self._range()
        return self.flat, slice(offset, offset + numel)


def free_gathered(placements: Sequence[Placement]) -> None:
    """Free the gathered (unsharded) flat parameters FSDP1 keeps after a forward, after a
    write into the shards outside an optimizer step (a pruning event).

    A unit that does not reshard after forward (``SHARD_GRAD_OP``, ``_HYBRID_SHARD_ZERO2``,
    and the root unit under ``FULL_SHARD``) keeps its gathered flat parameter until the
    next backward, and the next forward uses it without gathering again: zeros written
    into the shards after an eval forward would reach the weights the model computes with
    only after a backward (measured: the gathered weights right after a cut were the uncut
    ones). Freed, the next forward gathers the shards as written. No communication.
    """
    handles = {
        id(p.handle): p.handle for p in placements if isinstance(p, FlatPlacement) and p.sharded
    }
    for handle in handles.values():
        if not handle.needs_unshard():  # the gathered copy is allocated
            handle.reshard(True)


class FlatParamIndex:
    """``(module, parameter name) -> (FSDP unit, flat parameter, index)`` for a model."""

    def __init__(self, entries: dict[tuple[int, str], tuple[Any, Any, int]]) -> None:
        self.entries = entries

    @classmethod
    def of(cls, modules: Iterable[nn.Module]) -> FlatParamIndex:
        """The index over ``modules`` (all of a model's: FSDP1 units sit inside it)."""
        entries: dict[tuple[int, str], tuple[Any, Any, int]] = {}
        if FullyShardedDataParallel is None:
            return cls(entries)
        for unit in modules:
            if isinstance(unit, FullyShardedDataParallel) and unit._handle is not None:
                flat = unit._handle.flat_param
                for index, info in enumerate(flat._param_infos):
                    entries[(id(info.module), info.param_name)] = (unit, flat, index)
        return cls(entries)

    def find(self, target: Target) -> FlatPlacement | None:
        if not self.entries:  # no FSDP1 unit in the model: the common case
            return None
        for name in (target.attr + "_orig", target.attr):
            entry = self.entries.get((id(target.module), name))
            if entry is not None:
                return FlatPlacement(target, *entry)
        return None
