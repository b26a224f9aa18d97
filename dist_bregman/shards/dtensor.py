"""FSDP2 (``fully_shard``) and other DTensor parameters.

FSDP2 registers a module's parameters as sharded DTensors between steps, but keeps a
group gathered from forward to backward when it does not reshard after forward (by
default the root module's group: what ``fully_shard(model)`` holds itself, e.g.
embeddings and the output layer; and every group with ``reshard_after_forward=False``),
and a forward without backward (eval) leaves it gathered until the next backward. The
module then holds plain full tensors; with ``reshard_after_forward=<int>``, a copy
sharded over a smaller mesh (a DTensor replicated across that mesh's copies). Reads take
the sharded parameter FSDP2 keeps for each (:func:`sharded_values`: the one the
optimizer steps, no communication), so the seed's loss term between forward and backward
costs no extra gather; after a write into the shards outside a step the gathered copies
are dropped (:func:`reshard_gathered`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Container, Sequence
from typing import Any

import torch
from torch import nn

from dist_bregman.shards.base import LocalView, Placement
from dist_bregman.targets import Target

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError as error:
    if torch.distributed.is_available():
        # Not skipped: without these, FSDP2 and DTensor parameters would be read as plain
        # tensors, and their sparsity counted wrong without a word. (torch 2.4 and 2.5 kept
        # FSDP2 in torch.distributed._composable.fsdp; see pyproject.toml for the floor.)
        raise ImportError(
            f"dist_bregman needs torch>=2.8 (FSDP2's FSDPModule in torch.distributed.fsdp, "
            f"DTensor in torch.distributed.tensor); this torch ({torch.__version__}) "
            f"failed: {error}"
        ) from error
    DTensor = None  # type: ignore[assignment,misc]  # torch built without distributed
    FSDPModule = None  # type: ignore[assignment,misc]


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage: in-place edits reach it), else ``x``."""
    return x.to_local() if is_dtensor(x) else x  # type: ignore[attr-defined]


def shaped_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local``, this rank's part of a tensor laid out as ``param`` (an optimizer's state
    for it), as a DTensor with ``param``'s mesh, placements and global shape when
    ``param`` is one; else ``local`` itself. No communication; the DTensor shares
    ``local``'s storage. A distributed checkpoint (DCP, as Lightning's FSDP2 strategy
    saves) stores a DTensor's parts at their offsets from every rank, while a plain tensor
    is taken for a replica and stored from one rank only: every other rank's state lost,
    and loaded into every rank."""
    if not is_dtensor(param):
        return local
    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def local_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """This rank's elements of a tensor from a state dict, as plain tensors: a DTensor's
    local shard, the local shards of a ``ShardedTensor`` (FSDP1's sharded state dict; its
    torch ops raise, so it is recognised by its ``local_shards``), the stored values of a
    sparse tensor (an ``Embedding(sparse=True)`` gradient: reductions such as ``amax`` do
    not run on its layout, and the elements not stored are zeros), else the tensor."""
    if hasattr(x, "local_shards"):
        return [shard.tensor for shard in x.local_shards()]
    if x.layout == torch.sparse_coo:
        return [x._values()]  # uncoalesced is fine: every stored entry is read
    if x.layout != torch.strided:  # CSR, CSC, BSR, BSC
        return [x.values()]
    return [local_tensor(x)]


def fsdp2_owners(modules: Sequence[nn.Module]) -> dict[int, Any]:
    """``id(module)`` to the FSDP2 module whose group holds its parameters: the nearest
    ``fully_shard``-ed module at or above it. Empty without FSDP2."""
    owners: dict[int, Any] = {}
    if FSDPModule is None:
        return owners
    for module in modules:  # pre-order: an inner FSDP2 module overrides its outer one
        if isinstance(module, FSDPModule):
            for inner in module.modules():
                owners[id(inner)] = module
    return owners


def sharded_values(target: Target, owner: Any, values: torch.Tensor | None = None) -> torch.Tensor:
    """``target``'s values (``values``, where the caller has just read them) as the
    sharded DTensor, also while its FSDP2 group (``owner``) is gathered or holds its
    post-forward copy (see the module docstring)."""
    if values is None:
        values = target.values
    if owner is None or (is_dtensor(values) and not _reshards_to_a_smaller_mesh(owner)):
        return values
    sharded = _sharded_param(owner, values)
    if sharded is None:  # FSDP2's internals moved: reshard (public), then read
        owner.reshard()
        return target.values
    return sharded


def _param_groups(owner: Any) -> list[Any]:
    """FSDP2's param groups of ``owner`` (private attributes: [] if they moved)."""
    try:
        state = owner._get_fsdp_state()
    except AttributeError:
        return []
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


_SMALLER_MESH: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
""":func:`_reshards_to_a_smaller_mesh` per FSDP2 module: asked for every DTensor at every
read, and fixed by ``fully_shard`` (``set_reshard_after_forward`` takes a bool only, so a
kept True can only go stale into a needless lookup, never a wrong read)."""


def _reshards_to_a_smaller_mesh(owner: Any) -> bool:
    """Whether ``owner``'s group reshards after forward to a smaller mesh
    (``reshard_after_forward=<int>``): from a forward to the next backward, and after an
    eval forward, its modules then hold a copy of each parameter sharded over that mesh,
    a DTensor too, replicated across its copies of the mesh. (Should FSDP2's private
    property go: False, and the measurement's size check refuses such a copy, but the
    loss term, which has no such check, would read it as twice the weight.)"""
    known = _SMALLER_MESH.get(owner)
    if known is None:
        groups = _param_groups(owner)
        known = _SMALLER_MESH[owner] = any(
            getattr(g, "_use_post_forward_mesh", False) for g in groups
        )
    return known


def _sharded_param(owner: Any, seen: torch.Tensor) -> torch.Tensor | None:
    """The sharded parameter FSDP2 keeps for ``seen``: itself, the gathered copy or the
    post-forward copy of it (private attributes, hence the fallback in
    :func:`sharded_values`)."""
    for group in _param_groups(owner):
        for fsdp_param in getattr(group, "fsdp_params", ()):
            sharded = getattr(fsdp_param, "sharded_param", None)
            copies = (
                sharded,
                getattr(fsdp_param, "_unsharded_param", None),
                getattr(fsdp_param, "_sharded_post_forward_param", None),
            )
            if any(copy is seen for copy in copies):
                return sharded
    return None


def reshard_gathered(placements: Sequence[Placement]) -> None:
    """Drop the gathered copies of FSDP2 groups holding ``placements`` after a write into
    their shards outside a step, so the next forward gathers the shards as written (the
    group would otherwise compute with the copy until the next backward). No
    communication."""
    for placement in placements:
        owner = getattr(placement, "owner", None)
        if owner is not None and sharded_values(placement.target, owner) is not (
            placement.target.values
        ):
            owner.reshard()


class DTensorPlacement(Placement):
    """A DTensor: the local shard at its global offset. Uneven ``Shard(0)`` chunks (e.g.
    5 + 4 rows of 9) and empty shards are fine; replicas along ``Replicate`` mesh
    dimensions (HSDP), and the copies on the other slices of a sliced mesh
    (:func:`copy_ranks`), are counted once: at coordinate 0 of those dimensions, or where
    a subgroup is measured, at the first copy within it. ``owner``: the FSDP2 module whose
    group holds it (None: a DTensor FSDP2 does not manage)."""

    sharded = True

    def __init__(self, target: Target, owner: Any = None) -> None:
        super().__init__(target)
        self.owner = owner
        values = sharded_values(target, owner)
        placements, mesh = values.placements, values.device_mesh  # type: ignore[attr-defined]
        self._in_mesh = mesh.get_coordinate() is not None  # else it holds nothing here
        if self._in_mesh:
            replicated = tuple(i for i, p in enumerate(placements) if isinstance(p, Replicate))
            self._held_by(copy_ranks(mesh, replicated))
        self._rows_whole = all(not isinstance(p, Shard) or p.dim == 0 for p in placements)

    @property
    def global_numel(self) -> int:
        return self.target.values.numel()  # the same for FSDP2's full, unsharded copy

    @property
    def row_split(self) -> str:
        placements = sharded_values(self.target, self.owner).placements  # type: ignore[attr-defined]
        return (
            f"its DTensor placements {tuple(placements)} shard it along a dimension other "
            f"than 0 (row-wise tensor parallelism splits the input features)"
        )

    def holder(self) -> tuple[torch.Tensor, slice | None]:
        return sharded_values(self.target, self.owner), None

    def view(self, members: Container[int] | None = None) -> LocalView:
        if not self.counts_here(members):
            return LocalView(None, None, 0, self.global_numel, self._rows_whole)
        return self.local()

    def local(self) -> LocalView:
        read, mask = self.target.tensors()
        values = sharded_values(self.target, self.owner, read)
        if not self._in_mesh:  # this rank is not in the tensor's mesh: holds nothing
            return LocalView(None, None, 0, values.numel(), self._rows_whole)
        local = values.to_local().detach()  # type: ignore[attr-defined]
        if mask is not None:
            mask = local_part(mask, values)
        return LocalView(local, mask, local.numel(), values.numel(), self._rows_whole)


@functools.lru_cache(maxsize=64)
def copy_ranks(mesh: Any, replicated: tuple[int, ...]) -> tuple[int, ...]:
    """The ranks holding the same elements as this rank of a DTensor laid out on ``mesh``
    and replicated along its dimensions ``replicated``, in the root mesh's row-major order:
    the first is at coordinate 0 of every dimension they differ in.

    Besides the ``Replicate`` dimensions (HSDP), a DTensor on a slice of a larger device
    mesh has a copy on every slice: under FSDP2 over tensor parallelism
    (``fully_shard(layer, mesh=mesh["dp"])`` for a layer left out of the TP plan, as
    Lightning's ``ModelParallelStrategy`` and torchtitan lay a 2-D run out), each TP rank's
    ``dp`` slice holds the whole layer, sharded over ``dp``. Counted on every slice, a (dp
    2, tp 2) run counted a 221-element layer as 442 (refused by the reduced totals). Under
    pipeline parallelism the other slices hold other stages, not copies: they are not
    measured together (a stage is measured within its own ranks' group), so the first
    copy among the measured ranks counts (:meth:`Placement.counter`). Where the root mesh
    cannot be found (torch's private ``DeviceMesh._get_root_mesh`` or
    ``_mesh_resources.get_root_mesh``; one of them is in torch 2.8 to 2.13), the slices
    count as separate and the totals refuse the count of a world that holds copies.
    (Cached per mesh: placements are built at every measurement.)"""
    grid, own = _root_mesh(mesh).mesh, mesh.mesh
    places = torch.stack([(grid == rank).nonzero()[0] for rank in own.flatten().tolist()])
    spans = (places != places[0]).any(dim=0).tolist()  # root dimensions the slice spans
    at = mesh.get_coordinate()
    box = tuple(slice(None) if d in replicated else c for d, c in enumerate(at))
    holders = set()  # this slice's replicas of the shard, then their copies on every slice
    for rank in own[box].flatten().tolist():
        place = (grid == rank).nonzero()[0].tolist()
        across = tuple(c if spans[d] else slice(None) for d, c in enumerate(place))
        holders.update(grid[across].flatten().tolist())
    order = {rank: i for i, rank in enumerate(grid.flatten().tolist())}
    return tuple(sorted(holders, key=order.__getitem__))


def _root_mesh(mesh: Any) -> Any:
    """The device mesh ``mesh`` was sliced from (``mesh`` itself when not a slice, or when
    torch no longer tells)."""
    getter = getattr(mesh, "_get_root_mesh", None)
    if getter is not None:
        return getter()
    try:
        from torch.distributed.device_mesh import _mesh_resources

        return _mesh_resources.get_root_mesh(mesh)
    except (ImportError, AttributeError):
        return mesh


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a prune mask ``full`` as the DTensor ``like`` lays its elements
    out: the local shard of a DTensor mask; of a plain one (FSDP2 leaves buffers unsharded:
    the whole mask, the same on every rank) the elements matching ``like``'s.

    Under ``Shard`` and ``Replicate`` placements that part is one box of ``full``: a view.
    A ``_StridedShard`` (what FSDP2 over tensor parallelism lays out, and what
    redistributing such a tensor can leave) need not be one box: under
    ``_StridedShard(0, split_factor=2)`` on 2 ranks each rank holds every other pair of
    rows, and the box at its first offset took the wrong mask rows (8 rows, rows 2, 3 and
    7 pruned: 16 nonzeros counted of 20). Such a part is split as DTensor splits, locally
    (no communication): a copy, which is only read."""
    if is_dtensor(full):
        return full.to_local()  # type: ignore[attr-defined]
    placements = like.placements  # type: ignore[attr-defined]
    mesh = like.device_mesh  # type: ignore[attr-defined]
    if all(type(p) in (Shard, Replicate) for p in placements):
        shape, offset = compute_local_shape_and_global_offset(like.shape, mesh, placements)
        return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]
    return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
