"""Weight averaging (SWA, EMA) that keeps the zeros the pruners make.

An average of iterates is zero only where every averaged iterate was zero: a weight pruned
at step 500 keeps a decaying, never exactly zero share of its earlier values, and a weight
the proximal step zeroes and frees again is nonzero in most iterates. Averaging therefore
undoes the sparsity a run reached (measured: Lightning's ``EMAWeightAveraging`` beside a
``SafeModelPruning`` at 60% handed back a model with no zero at all, and beside a
``BregmanPruner`` at 77% with none either). :class:`KeepSupport` wraps the averaging rule
so that every update also zeros the average wherever the model is zero now: the averaged
model has the support of the model at the last update, and averages within it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.swa_utils import get_ema_avg_fn, get_swa_avg_fn

from dist_bregman.config import check_number

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(averaged, current, num_averaged) -> new average``: the ``avg_fn`` of
:class:`torch.optim.swa_utils.AveragedModel` and of Lightning's averaging callbacks."""


class KeepSupport:
    """An ``avg_fn`` that averages (the equal-weight mean of SWA; an exponential moving
    average with ``decay``; or ``avg_fn``'s rule), then zeros the average where the model's
    tensor is zero.

    Give it to Lightning's ``WeightAveraging(avg_fn=KeepSupport(decay=0.999))`` or
    ``StochasticWeightAveraging(swa_lrs, avg_fn=KeepSupport())``, or to
    :class:`torch.optim.swa_utils.AveragedModel`: as ``avg_fn``, not ``multi_avg_fn`` (it
    takes one tensor at a time). :class:`~dist_bregman.BregmanPruner` and
    :class:`~dist_bregman.SafeModelPruning` refuse those callbacks averaging without it.
    """

    def __init__(self, decay: float | None = None, avg_fn: AvgFn | None = None) -> None:
        if decay is not None:
            check_number("decay", decay, low=0.0, high=1.0)
            if avg_fn is not None:
                raise ValueError(
                    f"decay={decay!r} with avg_fn={avg_fn!r}: allowed: one of them (decay is "
                    f"the exponential moving average's), or neither (the equal-weight mean)"
                )
        if avg_fn is not None and not callable(avg_fn):
            raise TypeError(
                f"avg_fn={avg_fn!r}: expected None or a callable (averaged, current, "
                f"num_averaged) -> Tensor"
            )
        self.decay = decay
        self.avg_fn = avg_fn
        self._rule: AvgFn = avg_fn or (get_swa_avg_fn() if decay is None else get_ema_avg_fn(decay))

    def __call__(
        self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        if not current.is_floating_point():  # a counter (BatchNorm's num_batches_tracked,
            return current.clone()  # averaged with use_buffers=True): the model's own
        return self._rule(averaged, current, num_averaged).masked_fill(current == 0, 0)

    def __repr__(self) -> str:
        if self.decay is not None:
            return f"KeepSupport(decay={self.decay!r})"
        return "KeepSupport()" if self.avg_fn is None else f"KeepSupport(avg_fn={self.avg_fn!r})"
