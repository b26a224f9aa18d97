"""FSDP2 (``fully_shard``) and other DTensor parameters."""

from __future__ import annotations

import torch

from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.targets import Target

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage: in-place edits reach it), else ``x``."""
    return x.to_local() if is_dtensor(x) else x  # type: ignore[attr-defined]


def local_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """This rank's elements of a tensor from a state dict, as plain tensors: a DTensor's
    local shard, the local shards of a ``ShardedTensor`` (FSDP1's sharded state dict; its
    torch ops raise, so it is recognised by its ``local_shards``), else the tensor."""
    if hasattr(x, "local_shards"):
        return [shard.tensor for shard in x.local_shards()]
    return [local_tensor(x)]


class DTensorPlacement(Placement):
    """A DTensor: the local shard at its global offset. Uneven ``Shard(0)`` chunks (e.g.
    5 + 4 rows of 9) and empty shards are fine; replicas along ``Replicate`` mesh
    dimensions (HSDP) are counted only at coordinate 0 of those dimensions."""

    sharded = True

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        values = target.values
        placements, mesh = values.placements, values.device_mesh  # type: ignore[attr-defined]
        coordinate = mesh.get_coordinate()
        self._counter: int | None = None
        """The rank at this rank's coordinate with every ``Replicate`` dimension at 0: the
        one that counts the shard this rank holds (None: this rank is not in the mesh)."""
        self._counts_here = False
        if coordinate is not None:
            at = [
                0 if isinstance(p, Replicate) else c
                for c, p in zip(coordinate, placements, strict=True)
            ]
            self._counter = int(mesh.mesh[tuple(at)])
            self._counts_here = at == list(coordinate)
        self._rows_whole = all(not isinstance(p, Shard) or p.dim == 0 for p in placements)
        self.sharded_only = not any(isinstance(p, Replicate) for p in placements)
        """No replicas along any mesh dimension (a plain FSDP2 mesh, not HSDP)."""

    @property
    def global_numel(self) -> int:
        return self.target.values.numel()

    def counting_rank(self, rank: int) -> int:
        return rank if self._counter is None else self._counter

    def view(self) -> LocalView:
        if not self._counts_here:
            return LocalView(None, None, 0, self.global_numel, self._rows_whole)
        return self.local()

    def local(self) -> LocalView:
        values, mask = self.target.tensors()
        if self._counter is None:  # this rank is not in the tensor's mesh: holds nothing
            return LocalView(None, None, 0, values.numel(), self._rows_whole)
        local = values.to_local().detach()  # type: ignore[attr-defined]
        if mask is not None:
            if is_dtensor(mask):
                mask = mask.to_local()  # type: ignore[attr-defined]
            else:
                shape, offset = compute_local_shape_and_global_offset(
                    values.shape,
                    values.device_mesh,  # type: ignore[attr-defined]
                    values.placements,  # type: ignore[attr-defined]
                )
                mask = mask[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]
        return LocalView(local, mask, local.numel(), values.numel(), self._rows_whole)
