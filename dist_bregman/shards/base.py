"""What every placement provides."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Container

import torch

from dist_bregman import comm
from dist_bregman.targets import Target


@dataclasses.dataclass(slots=True, eq=False)
class LocalView:
    """What one rank counts of one target. (A slotted, unfrozen dataclass: one is built per
    tensor per measurement, and a named tuple takes 1.6 times as long to create.)"""

    values: torch.Tensor | None
    """Local elements to count (a plain tensor), or ``None`` when this rank counts none."""
    mask: torch.Tensor | None
    """Prune mask aligned with ``values`` (same shape), or ``None``."""
    numel: int
    """Elements this rank contributes to the global total."""
    global_numel: int
    """Elements of the full, unsharded tensor: what the reduced total must equal."""
    rows_whole: bool
    """``values`` keeps whole dim-0 rows in their original trailing shape, so all-zero rows
    (neurons, filters) and kernels can be counted locally."""

    def effective(self) -> torch.Tensor | None:
        """``values * mask`` (what the forward uses of these elements), or None."""
        if self.values is None or self.mask is None:
            return self.values
        return self.values * self.mask


class Placement(ABC):
    """The layout of one target on this rank."""

    sharded: bool
    """True when ranks hold different elements (sum them); False for replicas."""
    copies: tuple[int, ...] = ()
    """The global ranks holding the same elements as this rank, itself included, in the
    order that picks the one that counts them: the first among the ranks measured
    together (a shard's replicas under HSDP / HYBRID_SHARD, a layer's copies on the other
    slices of a sliced device mesh). Empty: no other rank holds them."""
    _me: int = -1
    """This process's global rank, kept beside :attr:`copies` by :meth:`_held_by` (asked
    at every measurement, ``torch.distributed.get_rank`` took ~1 us a tensor)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    @property
    @abstractmethod
    def global_numel(self) -> int:
        """Elements of the full tensor."""

    @abstractmethod
    def view(self, members: Container[int] | None = None) -> LocalView:
        """The elements this rank holds and counts (read afresh: wrappers move storage)
        when the global ranks ``members`` (None: every rank) are measured together."""

    def absent(self) -> LocalView:
        """The view of a replica another rank counts."""
        return LocalView(None, None, 0, self.global_numel, rows_whole=True)

    def local(self) -> LocalView:
        """The elements this rank holds, also where another rank counts them (HSDP's
        replicas of a shard): what a prune mask must cover on every rank."""
        return self.view()

    def counter(self, members: Container[int] | None = None) -> int | None:
        """The global rank that counts the elements this rank holds when ``members``
        (None: every rank) are measured together: the first of :attr:`copies` among them.
        None where no other rank holds them: this rank counts them. (A measurement within
        a subgroup, such as one pipeline stage's data-parallel ranks under FSDP2 on a
        slice of a (pp, dp) mesh, counts copies that the whole world would count elsewhere.)
        Replicas of whole tensors are spread over ranks by size instead:
        :func:`~dist_bregman.shards.balanced_owners`."""
        if members is None:
            return self.copies[0] if self.copies else None
        return next((rank for rank in self.copies if rank in members), None)

    def counts_here(self, members: Container[int] | None = None) -> bool:
        """Whether this rank counts the elements it holds (see :meth:`counter`)."""
        counter = self.counter(members)
        return counter is None or counter == self._me

    def _held_by(self, copies: tuple[int, ...]) -> None:
        """Set :attr:`copies` (this rank among them)."""
        self.copies, self._me = copies, comm.get_rank()

    @property
    def row_split(self) -> str:
        """How this layout cuts the tensor's rows, for messages where whole rows are needed
        (group sparsity, structured pruning)."""
        return "the strategy splits it into flat shards (FSDP1 / ZeRO)"

    def trainable(self) -> bool:
        """Whether an optimizer is expected to update these elements."""
        return bool(self.holder()[0].requires_grad)

    def holder(self) -> tuple[torch.Tensor, slice | None]:
        """The tensor a plain optimizer holds for these elements, and their slice in its
        local data (``None``: all of it)."""
        return self.target.values, None
