"""Where each measured tensor's elements live, whatever the strategy.

Every rank contributes counts for the elements it *owns*, and one all-reduce sums them, so
every rank gets the unsharded model's numbers. A :class:`Placement` says, for one target,
which elements this rank holds and whether other ranks hold the same ones:

* replicated (one process, DDP, ZeRO-1/2, FSDP ``NO_SHARD``): every rank holds all of it;
  each replica is counted by exactly one rank, spread over ranks by size;
* FSDP2 and tensor-parallel ``DTensor``: the local shard, aligned with its global offset;
  replicas along ``Replicate`` mesh dimensions (HSDP), and the copies on the other slices
  of a sliced mesh (FSDP2 over TP), counted once;
* FSDP1 flat parameter: this rank's slice of the flat shard, without the padding
  (``HYBRID_SHARD``: a shard counted at its first replica);
* DeepSpeed ZeRO-3: the valid part of ``ds_tensor``, without the tail padding.

Prune masks (``weight_mask``) stay full buffers on every rank in all of these, so each
placement slices the mask to match its local elements. This package reads layouts
(placements, flat-parameter metadata, partition attributes); the one collective it makes
is in :func:`refresh_copies` (through :mod:`dist_bregman.comm`), after a pruning write.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from dist_bregman import comm
from dist_bregman.errors import first_names
from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.shards.dtensor import (
    DTensorPlacement,
    fsdp2_owners,
    is_dtensor,
    reshard_gathered,
    sharded_values,
)
from dist_bregman.shards.fsdp import FlatParamIndex, free_gathered
from dist_bregman.shards.replicated import Replicated, balanced_owners, check_whole
from dist_bregman.shards.zero import ZeroPartition, is_zero3_param
from dist_bregman.shards.zero import refresh_copies as refresh_zero_copies
from dist_bregman.targets import ParameterPairs, Target, resolve_values, unwrap

__all__ = [
    "LocalView",
    "Placement",
    "Replicated",
    "balanced_owners",
    "local_views",
    "locate",
    "place",
    "refresh_copies",
]


def place(model: nn.Module | None, targets: Sequence[Target]) -> list[Placement]:
    """The placement of each target (``model`` gives FSDP1's flat-parameter metadata and
    FSDP2's modules)."""
    modules = list(model.modules()) if model is not None else []
    return _place(modules, [(target, target.values) for target in targets])


def locate(model: nn.Module, pairs: ParameterPairs | None = None) -> list[Placement]:
    """``place(model, resolve(model, pairs))`` over one walk of the module tree, reading
    each tensor once: what :func:`~dist_bregman.measure_sparsity` does on every call."""
    tree = list(unwrap(model).named_modules())
    return _place([module for _, module in tree], resolve_values(model, pairs, tree=tree))


def _place(
    modules: Sequence[nn.Module], resolved: Sequence[tuple[Target, torch.Tensor]]
) -> list[Placement]:
    flat = FlatParamIndex.of(modules)
    owners = fsdp2_owners(modules)
    # A ZeRO-3 parameter exists only once DeepSpeed is imported: without it, the two
    # attribute probes per tensor (a raised AttributeError each) are skipped.
    zero3 = "deepspeed" in sys.modules
    if zero3:
        _refuse([target for target, read in resolved if _expert(read)], _EXPERTS)
    _refuse([target for target, read in resolved if _sliced(read)], _SLICES)
    placements: list[Placement] = []
    for target, read in resolved:
        owner = owners.get(id(target.module)) if owners else None
        values = read if owner is None else sharded_values(target, owner)
        entry = flat.find(target)
        if entry is not None:
            placements.append(entry)
        elif type(values) is nn.Parameter and not zero3:  # the common case, in one test
            if values.__dict__:  # (attributes set on it: FSDP1 marks what it flattened)
                check_whole(target.name, values)
            placements.append(Replicated(target))
        elif is_dtensor(values):
            placements.append(DTensorPlacement(target, owner))
        elif zero3 and is_zero3_param(values):
            placements.append(ZeroPartition(target))
        else:
            if type(values) is not nn.Parameter or values.__dict__:
                check_whole(target.name, values)
            placements.append(Replicated(target))
    return placements


def refresh_copies(placements: Sequence[Placement], group: comm.ProcessGroup = None) -> None:
    """After a write into this rank's elements outside an optimizer step (a pruning
    event), make the copies that forwards read agree with them: ZeRO-3's persistent
    parameters and hpZ partitions (:func:`.zero.refresh_copies`, a collective when
    persistent parameters exist) and FSDP1's gathered flat parameters
    (:func:`.fsdp.free_gathered`) and FSDP2's (:func:`.dtensor.reshard_gathered`)."""
    free_gathered(placements)
    reshard_gathered(placements)
    refresh_zero_copies(placements, group)


def local_views(
    placements: Sequence[Placement], group: comm.ProcessGroup = None
) -> list[LocalView]:
    """This rank's share of every target when ``group``'s ranks are measured together:
    whole replicas are owned by one rank each; copies of a shard are counted by the first
    of them in ``group`` (:meth:`~dist_bregman.shards.base.Placement.counter`)."""
    rank, world = comm.get_rank(group), comm.get_world_size(group)
    members = comm.group_members(group)
    replicas = [i for i, p in enumerate(placements) if not p.sharded]
    owners = balanced_owners([placements[i].global_numel for i in replicas], world)
    owner_of = dict(zip(replicas, owners, strict=True))
    views = []
    for index, placement in enumerate(placements):
        if index in owner_of:
            views.append(placement.view() if owner_of[index] == rank else placement.absent())
        else:
            views.append(placement.view(members))
    return views


def _expert(values: torch.Tensor) -> bool:
    """Whether ``values`` is a DeepSpeed MoE expert parameter (marked ``allreduce=False``:
    each expert-parallel rank holds other experts under the same names)."""
    return getattr(values, "allreduce", True) is False


def _sliced(values: torch.Tensor) -> bool:
    """Whether ``values`` is one tensor-parallel rank's slice of a weight in Megatron's
    layout: a plain tensor marked ``tensor_model_parallel=True`` (Megatron-LM and
    Megatron-DeepSpeed, NeMo, Transformer Engine). (A getattr: ~20 ns a tensor.)"""
    return getattr(values, "tensor_model_parallel", False) is True


_SLICES = (
    "tensor-parallel slices in Megatron's layout (tensor_model_parallel=True): each "
    "tensor-parallel rank holds another slice under these names, which this library would "
    "count and prune as replicas of one weight; allowed: torch's tensor parallelism "
    "(DTensor, parallelize_module), whose shards it counts, or parameters_to_prune without "
    "them (they then stay dense)"
)
"""Counted as replicas, one rank's slice (a plain tensor of the slice's size) would stand
for the whole weight, and the totals, the slice's size, would agree."""

_EXPERTS = (
    "DeepSpeed MoE expert weights: each expert-parallel rank holds other experts under these "
    "names, which this library does not count or prune apart; allowed: parameters_to_prune "
    "without the expert weights (they then stay dense)"
)
"""Counted as replicas, one rank's experts would stand for every rank's (a 2-expert layer
on 2 ranks: 480 of 736 elements counted)."""


def _refuse(targets: Sequence[Target], are: str) -> None:
    """Refuse ``targets``, which hold other elements on other ranks under the same names
    (``are``: what they are, why that is refused, and what is allowed)."""
    if targets:
        shown = first_names([target.name for target in targets], 3)
        raise ValueError(f"parameters_to_prune: {shown} are {are}")
