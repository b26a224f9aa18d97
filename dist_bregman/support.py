"""The frozen support: which zeros stay held after ``freeze_support_at``, and the swaps.

With ``freeze_hold="target"`` the held set is exactly the ``target_sparsity`` share of the
weights. When shrinkage overshot the target, the freeze holds the first ``held`` zeros in
global element order and frees the rest to regrow; a freed weight still zero at the next
lambda update got no gradient (a dead unit's, or one feeding it) and would leave the run
above its target, so it is held again and as many held zeros never freed are freed in its
place (:func:`plan_swap`, the pure rule; :class:`HeldSupport` enacts it). The held zeros
never freed are always the first ``untried`` zeros in that order (each swap frees the last
of them, and every zero freed before lies after them), so the whole state is one integer,
kept in checkpoints: a resumed run holds what the uninterrupted one held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dist_bregman.config import BregmanConfig
from dist_bregman.pruning import MagnitudePruner
from dist_bregman.sparsity import SparsityReport


@dataclass(frozen=True, slots=True)
class Swap:
    """One swap of :func:`plan_swap`."""

    free: tuple[int, int]
    """Places among the zeros, in global element order, left free; every other zero held."""
    untried: int
    """Held zeros never freed after this swap (the first ones in that order)."""
    exhausted: bool
    """No held zero is left to free: the zeros that did not regrow fill the held set."""


def plan_swap(held: int, zeros: int, untried: int) -> Swap | None:
    """The swap that brings ``zeros`` back to the ``held`` target, or None if none is due.

    Every zero is held but the first ``untried`` (never freed), of which the first
    ``held - (zeros - untried)`` stay held: the rest are freed in place of the zeros that
    were freed before and did not regrow. When the zeros beyond the first ``untried`` alone
    reach ``held`` (dead units, or ``torch.nn.utils.prune`` masks, whose zeros never
    regrow), all ``untried`` are freed and the swap is the last one.
    """
    if zeros <= held or held == 0:
        return None
    kept = held - (zeros - untried)
    if kept > 0:
        return Swap((kept, untried), kept, exhausted=False)
    return Swap((0, untried), 0, exhausted=True)


class HeldSupport:
    """The zeros held at zero once the support is frozen, and their swaps (module
    docstring). ``make_pruner`` builds masks over the measured set that the attached
    optimizers re-apply after every step; ``info`` and ``warn`` log (rank 0)."""

    def __init__(
        self,
        config: BregmanConfig,
        make_pruner: Callable[[], MagnitudePruner],
        info: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.config = config
        self._make_pruner = make_pruner
        self._info, self._warn = info, warn
        self.pruner: MagnitudePruner | None = None
        self.chosen_at = 0
        """The step at which the held set was last chosen (a freed zero needs a step to
        regrow before it is judged)."""
        self.untried: int | None = None
        """Held zeros never freed, the first among the zeros in global element order;
        None: not known (an older checkpoint, ``"found"``, or no freeze yet)."""
        self.tried_all = False
        """Every held zero has been freed once: no swap is left."""

    def _held_count(self, report: SparsityReport) -> int:
        """The size of the held set with ``"target"``: the target share of the weights."""
        return round(self.config.target_sparsity * report.total)

    def _new(self, step: int) -> MagnitudePruner:
        self.release()
        self.pruner = self._make_pruner()
        self.chosen_at = step
        return self.pruner

    def freeze(self, step: int, report: SparsityReport) -> int:
        """Choose the held set from ``report`` (measured now) and return its size: the
        zeros with ``"found"``; with ``"target"``, the target share of the smallest
        magnitudes (the zeros and the smallest survivors), or, if shrinkage overshot, the
        first zeros in global order. A collective."""
        tolerance = self.config.zero_tolerance
        if self.config.freeze_hold == "found":
            self._new(step).derive_masks(tolerance)
            return report.total - report.nonzero
        held = self._held_count(report)
        self.untried, self.tried_all = held, False
        if report.total - report.nonzero > held:
            self._new(step).hold_zeros((held, report.total), tolerance)
        else:
            self._new(step).prune(self.config.target_sparsity)
        return held

    def settle(self, step: int, report: SparsityReport) -> None:
        """At a lambda update after the freeze (``"target"``): hold the freed zeros that
        did not regrow and free as many never-freed ones (:func:`plan_swap`). Decided from
        the global ``report``, alike on every rank; a collective when it swaps."""
        if (
            self.pruner is None
            or self.config.freeze_hold != "target"
            or self.tried_all
            or step <= self.chosen_at
        ):
            return
        held = self._held_count(report)
        zeros = report.total - report.nonzero
        swap = plan_swap(held, zeros, held if self.untried is None else self.untried)
        if swap is None:
            return
        self.pruner.hold_zeros(swap.free, self.config.zero_tolerance)
        self.chosen_at = step
        self.untried, self.tried_all = swap.untried, swap.exhausted
        surplus = zeros - held
        beyond = (
            f"Step {step}: sparsity {100 * report.sparsity:.3f}%, {surplus} "
            f"{'zero' if surplus == 1 else 'zeros'} beyond the {held} held (target "
            f"{100 * self.config.target_sparsity:.1f}%)"
        )
        if not swap.exhausted:
            self._info(
                f"{beyond}: free zeros that did not regrow are held now, and as many held "
                f"zeros are freed in their place"
            )
            return
        self._warn(
            f"{beyond}: the zeros that did not regrow when freed fill the held set, so none "
            f"is left to free in their place, and the run may end above its target (zeros "
            f"of dead units get no gradient; zeros under torch.nn.utils.prune masks never "
            f"regrow)"
        )

    def rehold(self, measure: Callable[[], SparsityReport]) -> None:
        """After a resume past the freeze (or a new attach): the held set from the zeros in
        the weights and the count of never-freed zeros: every zero but those freed at the
        last swap that have not regrown yet. Without that count (an older checkpoint,
        ``"found"``, or once every held zero was tried), every zero. A collective."""
        pruner = self._new(0)
        if self.config.freeze_hold != "target" or self.untried is None or self.tried_all:
            pruner.derive_masks()
            return
        report = measure()
        held = self._held_count(report)
        surplus = max(report.total - report.nonzero - held, 0)
        pruner.hold_zeros((self.untried, self.untried + surplus), self.config.zero_tolerance)

    def release(self) -> None:
        """Stop re-applying the held zeros (they are rebuilt by :meth:`rehold`)."""
        if self.pruner is not None:
            self.pruner.detach()
            self.pruner = None
