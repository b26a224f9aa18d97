"""Every collective the project runs, in one place.

No other module imports ``torch.distributed``. Each function is a no-op (or the obvious
single-process answer) when no process group is initialised, so the same code path serves a
laptop, ``torchrun``, Lightning and DeepSpeed.

Collectives run on the device the backend wants: gloo and MPI take CPU tensors, NCCL takes
the current CUDA device. A tensor already on the right device is reduced in place, without
a copy. Every collective inherits the process group's timeout, so a rank that never arrives
ends the job with an error instead of a hang.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any
"""A ``torch.distributed`` process group, or None for the default (world) group."""

_DRAIN_SECONDS = 0.05
"""How long :func:`shutdown` waits after destroying the groups (see there)."""


def is_distributed() -> bool:
    """True when a default process group exists, i.e. collectives would really communicate."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: ProcessGroup = None) -> int:
    """This process's rank in ``group``; before any process group exists, the launcher's
    ``RANK`` (torchrun, deepspeed and SLURM wrappers set it), else 0."""
    if is_distributed():
        return int(dist.get_rank(group))
    return int(os.environ.get("RANK", "0"))


def get_world_size(group: ProcessGroup = None) -> int:
    """Number of ranks in ``group``; 1 without a process group."""
    if is_distributed():
        return int(dist.get_world_size(group))
    return 1


def group_ranks(group: ProcessGroup) -> tuple[int, ...]:
    """The global ranks of ``group``, in the order of their ranks in it."""
    ranks = dist.get_process_group_ranks(group)
    return tuple(sorted(ranks, key=lambda rank: dist.get_group_rank(group, rank)))


def _subgroup(group: ProcessGroup) -> bool:
    """Whether ``group`` is a process group of some ranks, whose ranks are not the global
    ones (not the default group, and a process group exists)."""
    return group is not None and is_distributed() and group is not dist.GroupMember.WORLD


def group_members(group: ProcessGroup = None) -> frozenset[int] | None:
    """The global ranks measured together in ``group``; None for every rank (the default
    group, or no process group)."""
    return frozenset(dist.get_process_group_ranks(group)) if _subgroup(group) else None


def global_ranks(group: ProcessGroup, ranks: list[int]) -> list[int]:
    """The global ranks of ``group``'s ranks ``ranks``, as messages name ranks: the ones a
    job's logs are kept by (the same under the default group)."""
    if not _subgroup(group):
        return ranks
    return [int(dist.get_global_rank(group, rank)) for rank in ranks]


def group_rank(group: ProcessGroup, global_rank: int) -> int:
    """``global_rank``'s rank in ``group`` (the default group: the same)."""
    return int(dist.get_group_rank(group, global_rank)) if _subgroup(group) else global_rank


def is_rank_zero() -> bool:
    """True on the process that logs and decides (global rank 0)."""
    return get_rank() == 0


def _collective_device(group: ProcessGroup, device: torch.device) -> torch.device:
    """The device a collective over ``group`` needs for a tensor that lives on ``device``."""
    backend = str(dist.get_backend(group))
    cpu_backends = ("gloo", "mpi")
    if device.type != "cpu" and backend in cpu_backends:
        return torch.device("cpu")
    accelerator_only = not any(b in backend for b in cpu_backends)  # e.g. plain "nccl"
    if device.type == "cpu" and accelerator_only and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without a host synchronisation for host-to-CUDA copies.

    A plain copy from pageable host memory waits until the GPU has drained its queue (a
    sync, which would stall the caller behind every kernel queued so far); from pinned
    memory it is queued like a kernel. For the small buffers copied here (counts, flags)
    pinning costs less than the wait.
    """
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` with exactly one collective and return the result.

    The result may be a new tensor (moved to the backend's device) or ``tensor`` itself,
    reduced in place; callers must use the return value. Without a process group, or with a
    group of one, nothing is communicated.
    """
    if not is_distributed() or get_world_size(group) == 1:
        return tensor
    buffer = to_device(tensor, _collective_device(group, tensor.device))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer


def broadcast_float(value: float, group: ProcessGroup = None) -> float:
    """Return rank 0's ``value`` on every rank of ``group`` (bit-exact, as float64)."""
    if not is_distributed() or get_world_size(group) == 1:
        return float(value)
    device = _collective_device(group, torch.device("cpu"))
    buffer = to_device(torch.tensor([value], dtype=torch.float64), device)
    dist.broadcast(buffer, group=group, group_src=0)
    return float(buffer.item())


def all_gather_object(obj: object, group: ProcessGroup = None) -> list[object]:
    """Every rank's ``obj``, in rank order (for agreement checks and tests, not hot paths)."""
    if not is_distributed() or get_world_size(group) == 1:
        return [obj]
    gathered: list[object] = [None] * get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def named_ranks(world_size: int) -> int:
    """How many ranks :func:`rank_bit` names with a bit each (all of them up to 57).

    The ranks above share a counter in the bits above the named ones, wide enough for every
    rank of the job, so the int64 sum over ranks cannot overflow. (One shared top bit
    could: four ranks' ``2**62`` summed to ``2**64``, i.e. 0, and a NaN seen by exactly
    ranks 62-65 of a 66-rank job vanished from the flag.)
    """
    return min(world_size, 63 - world_size.bit_length())


def rank_bit(flag: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """``flag`` (0-d bool) as an int64 that names this rank: summed over the ranks of
    ``group`` (in a buffer that is all-reduced anyway), :func:`ranks_from_bits` says which
    ranks raised the flag."""
    return flag.to(torch.int64) * own_bit(group)


def own_bit(group: ProcessGroup = None) -> int:
    """The value by which :func:`rank_bit` names this rank of ``group``."""
    rank = get_rank(group) if is_distributed() else 0  # RANK before init: not a group's
    return 1 << min(rank, named_ranks(get_world_size(group)))


def ranks_from_bits(bits: int, group: ProcessGroup = None) -> list[int | str]:
    """Decode a sum of :func:`rank_bit` values over the ranks of ``group`` into the global
    ranks that set them, the ones a job's logs are kept by (beyond the named ranks: how
    many of the others did)."""
    world_size = get_world_size(group)
    named = named_ranks(world_size)
    ranks: list[int | str] = [*global_ranks(group, [r for r in range(named) if bits >> r & 1])]
    whose = "the group's ranks" if _subgroup(group) else "ranks"
    others = bits >> named
    if others:
        ranks.append(f"{others} of {whose} {named}-{world_size - 1}")
    return ranks


def barrier(group: ProcessGroup = None) -> None:
    """Wait for every rank of ``group``; a no-op without a process group."""
    if is_distributed() and get_world_size(group) > 1:
        dist.barrier(group=group)


DEEPSPEED_SHM_FILE = "deepspeed_allreduce_buffer_{uid}_{address}_{port}_{rank}"
"""The name of a /dev/shm file of DeepSpeed's CPU backend (see :func:`release_deepspeed_shm`)."""


def release_deepspeed_shm() -> None:
    """Unlink the shared-memory files DeepSpeed's CPU backend made for this job, keeping
    their memory mapped until the processes exit. Collective: every rank calls it once
    DeepSpeed has set up its backend (``deepspeed.init_distributed``, or
    ``deepspeed.initialize``); a no-op where it made none (CUDA, ranks on several nodes).

    On CPU with every rank on one node (the ``deepspeed`` launcher sets ``LOCAL_SIZE``),
    DeepSpeed's shm comm op creates a 66 MB file per rank in ``/dev/shm``
    (:data:`DEEPSPEED_SHM_FILE`), maps every rank's, and never unlinks them (DeepSpeed
    0.19.8's ``csrc/cpu/comm/shm.cpp``): each job, finished or killed, left ``world_size``
    x 66 MB of RAM taken until a reboot. Here 325 such files, 20 of 24 GB, built up over a
    day of test runs, until the suite stalled on memory. Each rank opens its peers' files
    while DeepSpeed sets up (retrying until they exist), so after a barrier every mapping
    is made and each rank can unlink its own name: the memory goes when the last process
    holding it exits, however it ends.
    """
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None:  # not loaded, or not on CPU
        return
    if os.environ.get("LOCAL_SIZE") != str(get_world_size()):
        return  # DeepSpeed's condition for the files: so every rank skips the barrier alike
    barrier()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = DEEPSPEED_SHM_FILE.format(uid=os.getuid(), address=address, port=port, rank=get_rank())
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown() -> None:
    """End a distributed job cleanly: wait for every rank, destroy the process groups, then
    give the backend's worker threads a moment before the interpreter exits.

    Call it after dropping the objects that hold a process group (``del ddp_model``,
    ``del engine``; a LightningCLI/Trainer). Two teardown failures were seen here with gloo
    when groups were left to the interpreter: DeepSpeed ZeRO-3 jobs aborting at exit
    ("terminate called without an active exception"), and a DDP job hanging for good
    because the DDP reducer, freed at exit, ran the group's destructor with the GIL held
    while gloo's worker thread waited for the GIL to release a Python tensor (3 of 8
    concurrent runs). Releasing the wrappers first, then this, ended 12 of 12 cleanly.

    Destroying the group is not enough once DDP has used it: its gloo worker threads
    outlive ``destroy_process_group`` (something still holds the group), and a worker that
    drops the last reference to a finished collective's tensor needs the GIL. If the
    interpreter is finalizing by then, the thread is unwound mid-destructor and the process
    aborts with the message above (a core dump showed exactly that). 2 gloo ranks under
    ``mp.spawn``, DDP, ``del ddp``, barrier and destroy: 16 of 150 runs aborted at exit;
    with the pause below, which lets those threads take the GIL and finish: 0 of 150.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(_DRAIN_SECONDS)  # releases the GIL to gloo's worker threads
