"""Lightning's BackboneFinetuning beside the pruners: the backbone is frozen at the start
and joins the optimizer as a new param group later; the pruners follow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning

from dist_bregman import BregmanPruner, SafeModelPruning
from tests.helpers.lightning import FinetunedModel, make_trainer, seed_loader

UNFREEZE = 2  # the epoch BackboneFinetuning unfreezes the backbone at (16 steps an epoch)


class _Trace(pl.Callback):
    def __init__(self, pruner: pl.Callback) -> None:
        self.pruner, self.points = pruner, []
        self.epoch_ends: list[torch.Tensor] = []  # the backbone after each epoch's event

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.epoch_ends.append(pl_module.backbone[0].weight.detach().clone())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *_: Any) -> None:
        lam = getattr(self.pruner, "current_lambda", None)
        backbone = pl_module.backbone[0].weight.detach().clone()
        self.points.append((trainer.global_step, trainer.current_epoch, lam, backbone))


def _fit(tmp_path: Path, pruner: pl.Callback) -> tuple[FinetunedModel, _Trace]:
    model = FinetunedModel()
    if isinstance(pruner, BregmanPruner):
        model.bregman_pruner = pruner
    trace = _Trace(pruner)
    finetuning = BackboneFinetuning(
        unfreeze_backbone_at_epoch=UNFREEZE, backbone_initial_ratio_lr=1.0
    )
    trainer = make_trainer(tmp_path, [pruner, finetuning, trace], max_epochs=5)
    trainer.fit(model, seed_loader())
    return model, trace


def test_safe_model_pruning_keeps_the_backbones_zeros_after_it_is_unfrozen(tmp_path: Path) -> None:
    """Pruned every 2 epochs (ends of epochs 1 and 3): the backbone, frozen until epoch 2,
    is pruned while frozen; its steps from epoch 2 on must not bring those weights back
    (they did: 103 of the 135 pruned weights regrew in that epoch before the pruner followed the
    optimizer's new group)."""
    pruner = SafeModelPruning(0.5, prune_every=2)
    _, trace = _fit(tmp_path, pruner)
    pruned = trace.epoch_ends[UNFREEZE - 1] == 0
    assert 100 < int(pruned.sum()) < 320
    after = [w for _, epoch, _, w in trace.points if epoch >= UNFREEZE]
    assert all(bool((w[pruned] == 0).all()) for w in after)
    assert not torch.equal(after[0], after[-1])  # it trains


def test_bregman_pruner_holds_lambda_while_the_target_is_out_of_reach_then_shrinks_the_backbone(
    tmp_path: Path,
) -> None:
    """The frozen backbone is 71% of the measured weights, so 60% is out of reach at the
    start: the fit starts (it was refused), lambda stays put while the backbone is frozen
    (no integral wind-up), then the backbone's new param group gets the proximal step."""
    pruner = BregmanPruner(0.6, 0.02, 0.05, 5)
    model, trace = _fit(tmp_path, pruner)
    points = trace.points
    frozen = [lam for step, epoch, lam, _ in points if epoch < UNFREEZE]
    assert frozen and set(frozen) == {0.02}
    thawed = [lam for _, epoch, lam, _ in points if epoch >= UNFREEZE]
    assert len(set(thawed)) > 5
    assert int((model.backbone[0].weight == 0).sum()) > 100
    assert pruner.controller is not None and pruner.controller.out_of_reach is None
