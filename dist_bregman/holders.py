"""Which tensors an optimizer really updates for the measured weights, and where in them.

Zeroing a module's parameters does not stick when the optimizer keeps its own copies:
under ZeRO-1/2/3 and DeepSpeed mixed precision the next step overwrites the module from
fp32 masters. The proximal step and the Bregman optimizers must therefore act on what the
torch optimizer holds:

* a plain optimizer (one process, DDP, FSDP2, FSDP1): the parameters themselves (DTensors,
  1-D views with ``use_orig_params=True``), or FSDP1 flat shards (slices of them);
* torch's ``ZeroRedundancyOptimizer`` (DDP with sharded optimizer state): each rank's local
  optimizer steps the whole parameters it owns, before the owners broadcast them;
* DeepSpeed ZeRO-1/2: one flat fp32 partition per param group, parameters concatenated in
  ``round_robin_bit16_groups`` order and cut into ``partition_size`` pieces; ZeRO-1 in bf16
  with fp32 gradient accumulation (``BF16_Optimizer``) the same, in ``bf16_groups`` order;
* DeepSpeed ZeRO-3: one flat fp32 tensor per sub-group, the concatenated ``ds_tensor``
  partitions (each with its own tail padding), swapped into the client optimizer only for
  the duration of its ``step()``;
* DeepSpeed stage-0 fp16/bf16 (``FP16_UnfusedOptimizer``): shaped fp32 copies.

Any of these may come inside a wrapper that hands its steps on (Hugging Face Accelerate's
``AcceleratedOptimizer``): it is looked through. Post-local SGD is refused (the replicas
train apart). :func:`holding` reads those layouts once, at attach time: for each held tensor, the
:class:`Part` s of it that belong to measured tensors. This module never communicates.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dist_bregman import comm
from dist_bregman.shards import Placement
from dist_bregman.shards.dtensor import DTensorPlacement
from dist_bregman.shards.replicated import Replicated
from dist_bregman.shards.zero import ZeroPartition


@dataclass(frozen=True, slots=True)
class Part:
    """Measured elements inside one held tensor."""

    region: slice | None
    """Where they are in the held tensor's local data (``None``: all of it)."""
    index: int
    """The placement (measured tensor) they belong to."""
    local: slice | None
    """Which of that placement's local-view elements (flattened) they are (``None``: all)."""


@dataclass
class Holding:
    """What one optimizer holds of the measured tensors."""

    optimizer: torch.optim.Optimizer
    """The torch optimizer that steps (a DeepSpeed wrapper's client optimizer, a
    ``ZeroRedundancyOptimizer``'s local one)."""
    mirror: torch.optim.Optimizer | None = None
    """A wrapper that copies its param groups into :attr:`optimizer`'s before each of its
    steps (``ZeroRedundancyOptimizer``): a lambda written into :attr:`optimizer`'s groups
    alone would be overwritten by the old one at the next step. Its groups are read at
    each write, not kept: loading a state dict into it replaces them."""
    parts: dict[int, list[Part]] = field(default_factory=lambda: defaultdict(list))
    """``id(held tensor)`` -> the measured elements inside it."""
    held: dict[int, int] = field(default_factory=dict)
    """Placement index -> ``id`` of the tensor holding its local elements."""
    group_of: dict[int, int] = field(default_factory=dict)
    """``id(held tensor)`` -> index of its param group in ``optimizer``."""
    rows_whole: set[int] = field(default_factory=set)
    """``id``s of held tensors whose rows are whole (shaped, or DTensor ``Shard(0)``)."""
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    """``id(held tensor)`` -> the tensor, reachable between steps too (a ZeRO-3 client
    optimizer's ``param_groups`` show its fp32 tensors only during ``step()``)."""


def deepspeed_wrapper(optimizer: Any) -> str | None:
    """Which DeepSpeed optimizer wrapper ``optimizer`` is, or holds under pass-through
    wrappers (:func:`_passed_through`): ``"zero12"``, ``"bf16_zero1"``, ``"zero3"``,
    ``"fp32_copies"``, or None for a torch optimizer. A wrapper keeps the fp32 masters and
    the gradients it steps with in its own buffers: after ``backward`` its
    ``param_groups``' ``p.grad`` are None until its ``step()``, and the module's too (but
    for ``BF16_Optimizer``, which leaves a bf16 copy there)."""
    return _deepspeed_kind(_peeled(optimizer))


def _deepspeed_kind(optimizer: Any) -> str | None:
    if hasattr(optimizer, "round_robin_bit16_groups"):
        return "zero12"
    if hasattr(optimizer, "bf16_groups") and hasattr(optimizer, "fp32_groups_flat_partition"):
        return "bf16_zero1"
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return "zero3"
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        return "fp32_copies"
    return None


def _peeled(optimizer: Any) -> Any:
    """``optimizer`` without the pass-through wrappers around it, down to a torch optimizer
    or a DeepSpeed wrapper (which holds its client as ``.optimizer`` too, and stays)."""
    while _deepspeed_kind(optimizer) is None:
        inner = _passed_through(optimizer)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def groups_key(optimizers: Sequence[Any]) -> tuple[tuple[int, int], ...]:
    """Each param group of ``optimizers`` as ``(id, size)``: changes when a group is added
    (Lightning's ``BaseFinetuning`` unfreezing layers), its list grows, or the groups are
    replaced (that callback restoring them on a resume). Cheap enough to ask every step."""
    return tuple((id(g), len(g["params"])) for o in optimizers for g in o.param_groups)


def holding(optimizer: Any, placements: Sequence[Placement]) -> Holding:
    """Map ``optimizer`` (a torch optimizer, a DeepSpeed wrapper, or a wrapper of either)
    onto ``placements``."""
    optimizer = _peeled(optimizer)
    wrapper = _deepspeed_kind(optimizer)
    if wrapper == "zero12":
        return _zero12(optimizer, placements)
    if wrapper == "bf16_zero1":
        return _bf16_zero1(optimizer, placements)
    if wrapper == "zero3":
        return _zero3(optimizer, placements)
    if wrapper == "fp32_copies":
        return _fp32_copies(optimizer, placements)
    if _torchs(optimizer, "post_localSGD_optimizer", "PostLocalSGDOptimizer"):
        raise local_sgd_refused("PostLocalSGDOptimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer={type(optimizer).__name__}: expected a torch.optim.Optimizer or a "
            f"DeepSpeed ZeRO-1/2/3 or fp16/bf16 optimizer wrapping one"
        )
    if _torchs(optimizer, "zero_redundancy_optimizer", "ZeroRedundancyOptimizer"):
        return _zero_redundancy(optimizer, placements)
    return _parameters(Holding(optimizer), optimizer.param_groups, placements)


def _passed_through(optimizer: Any) -> Any:
    """The optimizer that ``optimizer`` hands its steps to, where ``optimizer`` is a wrapper
    that holds it as ``.optimizer`` without being one itself (it never ran
    ``Optimizer.__init__``, so it has no step hooks: Hugging Face Accelerate's
    ``AcceleratedOptimizer``); else None."""
    if "_optimizer_step_post_hooks" in getattr(optimizer, "__dict__", {}):
        return None  # a torch optimizer proper
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None and inner is not optimizer else None


def _torchs(optimizer: Any, module: str, name: str) -> bool:
    """Whether ``optimizer`` is ``torch.distributed.optim``'s class ``name``, without
    importing it: an instance of it means its module is loaded."""
    loaded = sys.modules.get(f"torch.distributed.optim.{module}")
    return loaded is not None and isinstance(optimizer, getattr(loaded, name))


def local_sgd_refused(what: str) -> ValueError:
    """The refusal of post-local SGD (``what``: how it was asked for)."""
    return ValueError(
        f"{what} (post-local SGD): every rank trains its own replica between model "
        f"averagings, so there is no one model to measure or to drive to a target (a "
        f"replicated weight is counted on one rank), and the average is zero only where "
        f"every replica was; allowed: DDP without model averaging (gradients averaged at "
        f"every step), torch's ZeroRedundancyOptimizer, FSDP or DeepSpeed"
    )


def _parameters(
    result: Holding,
    groups: Sequence[dict[str, Any]],
    placements: Sequence[Placement],
    stepped: set[int] | None = None,
) -> Holding:
    """``result`` for an optimizer of the parameters themselves: ``groups`` hold them,
    and this rank steps those in ``stepped`` (None: all of them)."""
    for index, group in enumerate(groups):
        for p in group["params"]:
            result.group_of[id(p)] = index
    for index, placement in enumerate(placements):
        tensor, region = placement.holder()
        if id(tensor) in result.group_of:
            result.held[index] = id(tensor)
            whole = isinstance(placement, Replicated) or (
                isinstance(placement, DTensorPlacement) and placement.view().rows_whole
            )
            if whole:
                result.rows_whole.add(id(tensor))
            if stepped is None or id(tensor) in stepped:
                result.tensors[id(tensor)] = tensor
                result.parts[id(tensor)].append(Part(region, index, None))
    return result


def _zero_redundancy(wrapper: Any, placements: Sequence[Placement]) -> Holding:
    """Every parameter of ``wrapper`` is held (by the rank that owns it), and this rank
    steps its own in the local optimizer, whose param groups are ``wrapper``'s, each cut
    to this rank's share. Its step hooks run before the owners broadcast the parameters,
    so a proximal step or a mask acts once, where the update was made, and the broadcast
    carries its zeros to every rank."""
    local = getattr(wrapper, "optim", None)
    if getattr(wrapper, "_overlap_with_ddp", False) or not isinstance(local, torch.optim.Optimizer):
        raise ValueError(
            "ZeroRedundancyOptimizer(overlap_with_ddp=True) steps inside DDP's communication "
            "hook with a functional optimizer, where no step hook runs and no lambda can be "
            "set; allowed: overlap_with_ddp=False"
        )
    stepped = {id(p) for group in local.param_groups for p in group["params"]}
    result = Holding(local, mirror=wrapper)
    return _parameters(result, wrapper.param_groups, placements, stepped)


def _by_parameter(placements: Sequence[Placement]) -> dict[int, int]:
    return {id(p.target.values): index for index, p in enumerate(placements)}


def _zero12(wrapper: Any, placements: Sequence[Placement]) -> Holding:
    groups = getattr(wrapper, "real_dp_process_group", None)
    return _flat_partitions(
        wrapper.optimizer,
        placements,
        [
            (
                params,
                wrapper.single_partition_of_fp32_groups[g],
                comm.get_rank(groups[g] if groups else wrapper.dp_process_group),
                int(wrapper.partition_size[g]),
            )
            for g, params in enumerate(wrapper.round_robin_bit16_groups)
        ],
    )


def _bf16_zero1(wrapper: Any, placements: Sequence[Placement]) -> Holding:
    """``BF16_Optimizer``: each group's bf16 parameters flattened (padded at the end to a
    multiple of the world), cut into equal partitions, this rank's an fp32 copy."""
    groups = wrapper.real_dp_process_group
    return _flat_partitions(
        wrapper.optimizer,
        placements,
        [
            (
                params,
                wrapper.fp32_groups_flat_partition[g],
                comm.get_rank(groups[g]),
                wrapper.bf16_groups_flat[g].numel() // comm.get_world_size(groups[g]),
            )
            for g, params in enumerate(wrapper.bf16_groups)
        ],
    )


def _flat_partitions(
    client: torch.optim.Optimizer,
    placements: Sequence[Placement],
    layout: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor, int, int]],
) -> Holding:
    """``client`` steps, for each of its param groups, one flat fp32 partition: ``layout``
    gives each group's ``(parameters in flattened order, the partition, this rank's index,
    the partition size)``."""
    result = Holding(client)
    index_of = _by_parameter(placements)
    for g, (params, flat, rank, size) in enumerate(layout):
        low, high = rank * size, (rank + 1) * size
        result.group_of[id(flat)] = g
        result.tensors[id(flat)] = flat
        offset = 0
        for p in params:
            index = index_of.get(id(p))
            if index is not None:
                result.held[index] = id(flat)
                start, stop = max(offset, low), min(offset + p.numel(), high)
                if start < stop:
                    part = Part(
                        slice(start - low, stop - low), index, slice(start - offset, stop - offset)
                    )
                    result.parts[id(flat)].append(part)
            offset += p.numel()
    return result


def _zero3(wrapper: Any, placements: Sequence[Placement]) -> Holding:
    result = Holding(wrapper.optimizer)
    index_of = _by_parameter(placements)
    for sub_group, params in enumerate(wrapper.fp16_groups):
        flat = wrapper.fp32_partitioned_groups_flat[sub_group]
        result.group_of[id(flat)] = int(wrapper.sub_group_to_group_id[sub_group])
        result.tensors[id(flat)] = flat
        offset = 0
        for p in params:
            index = index_of.get(id(p))
            if index is not None:
                placement = placements[index]
                assert isinstance(placement, ZeroPartition)
                _, valid = placement.valid()
                result.held[index] = id(flat)
                if valid:
                    result.parts[id(flat)].append(Part(slice(offset, offset + valid), index, None))
            offset += p.ds_tensor.numel()
    return result


def _fp32_copies(wrapper: Any, placements: Sequence[Placement]) -> Holding:
    result = Holding(wrapper.optimizer)
    index_of = _by_parameter(placements)
    for g, (params, copies) in enumerate(
        zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
    ):
        if isinstance(copies, torch.Tensor):
            raise NotImplementedError(
                f"{type(wrapper).__name__} keeps one flat fp32 tensor per group; "
                f"allowed: DeepSpeed's unfused fp16/bf16 optimizer, or a ZeRO stage >= 1"
            )
        for p, copy in zip(params, copies, strict=True):
            result.group_of[id(copy)] = g
            result.tensors[id(copy)] = copy
            index = index_of.get(id(p))
            if index is not None:
                result.held[index] = id(copy)
                result.parts[id(copy)].append(Part(None, index, None))
                result.rows_whole.add(id(copy))
    return result
