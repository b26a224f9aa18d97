"""Lightning's weight-averaging callbacks beside the pruners: allowed only when they keep
the zeros (:class:`~dist_bregman.averaging.KeepSupport`).

``StochasticWeightAveraging`` and ``WeightAveraging`` (``EMAWeightAveraging``) copy their
average into the model at the end of training and save it in checkpoints in place of the
model's weights: averaged without :class:`KeepSupport`, that model is not sparse, whatever
the pruner measured during training. The check runs at the start of ``fit``, before hours
are spent on a run whose result would be dense.
"""

from __future__ import annotations

import lightning.pytorch as pl

from dist_bregman.averaging import KeepSupport
from dist_bregman.callbacks.namespaces import callback_classes
from dist_bregman.holders import local_sgd_refused


def check_averaging(trainer: pl.Trainer, who: str) -> list[str]:
    """The class names of ``trainer``'s weight-averaging callbacks; raises for one that
    averages without :class:`KeepSupport`, and for DDP's model averaging (post-local SGD,
    which ``DDPStrategy`` runs itself after each optimizer step)."""
    if getattr(trainer.strategy, "_model_averager", None) is not None:
        raise local_sgd_refused(f"{who} with DDPStrategy(model_averaging_period=...)")
    names = []
    averaging = callback_classes("StochasticWeightAveraging") + callback_classes("WeightAveraging")
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(callback, averaging):
            continue
        name = type(callback).__name__
        if not isinstance(_avg_fn(callback), KeepSupport):
            raise ValueError(
                f"{who} with {name}: an average of the weights is zero only where every "
                f"averaged step was, so the model {name} hands back after fit (and saves in "
                f"checkpoints) loses the zeros (EMAWeightAveraging beside a 60% "
                f"SafeModelPruning ended with none); allowed: average with "
                f"dist_bregman.KeepSupport as its avg_fn, which keeps the model's zeros at each "
                f"update: WeightAveraging(avg_fn=KeepSupport(decay=0.999)) or "
                f"StochasticWeightAveraging(swa_lrs, avg_fn=KeepSupport()); in a YAML "
                f"config: dist_bregman.SparseWeightAveraging or "
                f"dist_bregman.SparseStochasticWeightAveraging"
            )
        names.append(name)
    return names


def _avg_fn(callback: object) -> object:
    """The averaging function ``callback`` was built with (Lightning keeps it privately:
    SWA as ``_avg_fn``, WeightAveraging among the ``AveragedModel`` arguments)."""
    if isinstance(callback, callback_classes("StochasticWeightAveraging")):
        return getattr(callback, "_avg_fn", None)
    arguments = getattr(callback, "_kwargs", {})
    if arguments.get("multi_avg_fn") is not None:  # used instead of avg_fn, on lists of
        return None  # tensors: KeepSupport takes one tensor at a time, as avg_fn
    return arguments.get("avg_fn")
