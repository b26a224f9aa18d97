"""Weight averaging beside the pruners, configurable from the CLI's YAML.

Lightning's ``WeightAveraging`` takes its averaging rule through ``**kwargs``, which
jsonargparse cannot fill, and ``EMAWeightAveraging`` fixes its own rule: neither can be
given :class:`~dist_bregman.averaging.KeepSupport` from a config file, so a YAML job could
not average beside a pruner (both pruners refuse an average that loses the zeros).
:class:`SparseWeightAveraging` has ``KeepSupport`` built in and every argument typed.
(Lightning 2.6 or later: earlier versions have no ``WeightAveraging``.)
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from typing_extensions import override

from dist_bregman.averaging import KeepSupport
from dist_bregman.config import check_int


class SparseWeightAveraging(WeightAveraging):
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
        super().__init__(device=device, use_buffers=use_buffers, avg_fn=KeepSupport(decay=decay))

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After optimizer steps on the schedule; never at an epoch's end."""
        return (
            step_idx is not None
            and step_idx >= self.update_starting_at_step
            and (step_idx - self.update_starting_at_step) % self.update_every_n_steps == 0
        )
