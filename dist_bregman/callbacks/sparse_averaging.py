"""Weight averaging beside the pruners, configurable from the CLI's YAML.

Lightning's ``WeightAveraging`` takes its averaging rule through ``**kwargs``, which
jsonargparse cannot fill, ``EMAWeightAveraging`` fixes its own rule, and jsonargparse
builds no object for ``StochasticWeightAveraging``'s ``avg_fn`` (a ``Callable``): none can
be given :class:`~dist_bregman.averaging.KeepSupport` from a config file, so a YAML job
could not average beside a pruner (both pruners refuse an average that loses the zeros).
:class:`SparseWeightAveraging` and :class:`SparseStochasticWeightAveraging` have
``KeepSupport`` built in and every argument typed. (Lightning 2.6 or later: earlier
versions have no ``WeightAveraging``.) Their rules live in mixins, which
:mod:`dist_bregman.pytorch_lightning` puts on the standalone package's classes.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from typing_extensions import override

from dist_bregman.averaging import KeepSupport
from dist_bregman.config import check_int


class KeepSupportEMA:
    """The rule of :class:`SparseWeightAveraging`, for a ``WeightAveraging`` of either
    Lightning package: :class:`KeepSupport` built in, updates on a step schedule."""

    def __init__(
        self,
        decay: float | None = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: torch.device | str | int | None = None,
        use_buffers: bool = True,
    ) -> None:
        self.update_every_n_steps = check_int("update_every_n_steps", update_every_n_steps, low=1)
        self.update_starting_at_step = check_int(
            "update_starting_at_step", update_starting_at_step, low=0
        )
        super().__init__(  # type: ignore[call-arg]
            device=device, use_buffers=use_buffers, avg_fn=KeepSupport(decay=decay)
        )

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After optimizer steps on the schedule; never at an epoch's end."""
        return (
            step_idx is not None
            and step_idx >= self.update_starting_at_step
            and (step_idx - self.update_starting_at_step) % self.update_every_n_steps == 0
        )


class KeepSupportSWA:
    """The rule of :class:`SparseStochasticWeightAveraging`, for a
    ``StochasticWeightAveraging`` of either Lightning package: Lightning's arguments, less
    ``avg_fn``, which is :class:`KeepSupport`."""

    def __init__(
        self,
        swa_lrs: float | list[float],
        swa_epoch_start: int | float = 0.8,
        annealing_epochs: int = 10,
        annealing_strategy: Literal["cos", "linear"] = "cos",
        device: torch.device | str | None = "cpu",
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            swa_lrs,
            swa_epoch_start,
            annealing_epochs,
            annealing_strategy,
            avg_fn=KeepSupport(),
            device=device,
        )


class SparseWeightAveraging(KeepSupportEMA, WeightAveraging):
    """An average of the weights that keeps the model's zeros: an exponential moving
    average with ``decay`` (the equal-weight mean with ``decay=None``), updated after every
    ``update_every_n_steps``-th optimizer step from step ``update_starting_at_step``
    (zero-based), zeroed where the model is zero at each update (:class:`KeepSupport`).

    As Lightning's ``WeightAveraging``, it copies the average into the model when training
    ends and saves it in checkpoints. In YAML::

        trainer:
          callbacks:
            - class_path: dist_bregman.SparseWeightAveraging
              init_args: {decay: 0.999, update_starting_at_step: 100}
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's WeightAveraging.setup fails on a standalone pytorch_lightning model
        # with "ValueError: Expected a parent" (it looks the module up among lightning's
        # classes). Lightning's SWA has no such step, and runs under either package.
        if not isinstance(pl_module, pl.LightningModule):
            raise TypeError(
                f"SparseWeightAveraging is a lightning.pytorch callback, and Lightning's "
                f"WeightAveraging it extends cannot set up {type(pl_module).__name__}, a "
                f"LightningModule of the standalone pytorch_lightning package; allowed: "
                f"dist_bregman.pytorch_lightning.SparseWeightAveraging there"
            )
        super().setup(trainer, pl_module, stage)


class SparseStochasticWeightAveraging(KeepSupportSWA, StochasticWeightAveraging):
    """Lightning's ``StochasticWeightAveraging`` (the equal-weight mean of the weights at
    each epoch's start from ``swa_epoch_start``, with its learning-rate schedule) averaging
    with :class:`KeepSupport`, so the average keeps the model's zeros. The arguments are
    Lightning's, less ``avg_fn``. In YAML::

        trainer:
          callbacks:
            - class_path: dist_bregman.SparseStochasticWeightAveraging
              init_args: {swa_lrs: 0.01, swa_epoch_start: 0.75}
    """
