"""The callbacks under the standalone ``pytorch_lightning`` package's Trainer.

Lightning 2.x is one trainer published under two names with classes of their own:
``lightning`` (``lightning.pytorch``, which the callbacks subclass) depends on
``pytorch-lightning``, and a user whose code says ``import pytorch_lightning as pl`` trains
with that package's Trainer and callbacks. Before the callbacks looked for finetuning and
weight averaging in both (dist_bregman/callbacks/namespaces.py), such a user's
``BackboneFinetuning`` run was refused as out of reach and an ``EMAWeightAveraging`` that
drops the zeros handed back a dense model without a word. ``dist_bregman.pytorch_lightning``
has the callbacks on that package's classes too, which its LightningCLI needs; the fits
under its Trainer below use those, the averaging tests and ddp_spawn's the plain ones.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    BackboneFinetuning,
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from pytorch_lightning.cli import LightningCLI

from dist_bregman import (
    BregmanPruner,
    KeepSupport,
    SafeModelPruning,
    SparseStochasticWeightAveraging,
    SparseWeightAveraging,
    measure_sparsity,
)
from dist_bregman import pytorch_lightning as standalone
from tests.helpers.lightning import (
    PLFinetunedModel,
    PLSeedModel,
    SeedModel,
    make_trainer,
    seed_loader,
)


def _pruner(cls: type[BregmanPruner] = BregmanPruner) -> BregmanPruner:
    return cls(
        target_sparsity=0.6, initial_lambda=0.02, lambda_update_rate=0.05, update_frequency=5
    )


class _Trace(pl.Callback):
    """(step, lambda, sparsity) after every batch."""

    def __init__(self, pruner: BregmanPruner) -> None:
        self.pruner, self.points = pruner, []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.points.append(
            (trainer.global_step, self.pruner.current_lambda, self.pruner.current_sparsity)
        )


def _fit(
    tmp_path: Path, model: Any, trainer: type[Any], max_epochs: int, **kwargs: Any
) -> tuple[BregmanPruner, _Trace, Any]:
    pruner = model.bregman_pruner = _pruner(
        standalone.BregmanPruner if trainer is pl.Trainer else BregmanPruner
    )
    trace = _Trace(pruner)
    callbacks = [pruner, trace, *kwargs.pop("callbacks", [])]
    ckpt_path = kwargs.pop("ckpt_path", None)
    fitted = make_trainer(tmp_path, callbacks, max_epochs=max_epochs, trainer=trainer, **kwargs)
    fitted.fit(model, seed_loader(), ckpt_path=ckpt_path)
    return pruner, trace, fitted


def test_a_pytorch_lightning_trainer_prunes_exactly_as_lightnings_does(tmp_path: Path) -> None:
    lightning_model, pl_model = SeedModel(), PLSeedModel()
    _, lightning_trace, _ = _fit(tmp_path / "lightning", lightning_model, L.Trainer, 3)
    pruner, trace, trainer = _fit(tmp_path / "pl", pl_model, pl.Trainer, 3)
    assert isinstance(trainer, pl.Trainer) and not isinstance(trainer, L.Trainer)
    assert trace.points == lightning_trace.points  # lambda and sparsity at every step
    for (name, value), (_, expected) in zip(
        pl_model.state_dict().items(), lightning_model.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
    assert measure_sparsity(pl_model).sparsity > 0.4  # it pruned, toward 0.6
    assert trainer.callback_metrics["bregman/lambda"].item() == pytest.approx(pruner.current_lambda)


def test_a_checkpoint_of_a_pytorch_lightning_fit_resumes_under_lightning(tmp_path: Path) -> None:
    """Both packages key the callback's state by its class name: a run saved by one resumes
    in the other, on the trajectory of the run that was never stopped."""
    _, whole, _ = _fit(tmp_path / "whole", SeedModel(), L.Trainer, 4)
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(
        tmp_path / "a", PLSeedModel(), pl.Trainer, 2, callbacks=[saving], enable_checkpointing=True
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    _, resumed, _ = _fit(tmp_path / "b", SeedModel(), L.Trainer, 4, ckpt_path=last)
    assert resumed.points[0][0] == 33  # after 2 epochs of 16 steps
    assert resumed.points == [p for p in whole.points if p[0] > 32]


def test_pytorch_lightnings_backbone_finetuning_is_recognised(tmp_path: Path) -> None:
    """0.9 is out of reach while the backbone (71% of the weights) is frozen: beside a
    finetuning callback lambda waits for it, and after the unfreeze the backbone is shrunk
    too; without one, the fit is refused at its start."""
    model = PLFinetunedModel()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    trainer = make_trainer(tmp_path, [_far_pruner(), finetuning], max_epochs=4, trainer=pl.Trainer)
    trainer.fit(model, seed_loader())
    assert int((model.backbone[0].weight == 0).sum()) > 100
    frozen = PLFinetunedModel()
    frozen.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match=r"target_sparsity=0.9 is unreachable: backbone.0.weight"):
        make_trainer(tmp_path, [_far_pruner()], trainer=pl.Trainer).fit(frozen, seed_loader())


def _far_pruner() -> BregmanPruner:
    return BregmanPruner(
        target_sparsity=0.9, initial_lambda=0.02, lambda_update_rate=0.05, update_frequency=4
    )


@pytest.mark.parametrize("pruner", [_pruner, lambda: SafeModelPruning(0.5)])
def test_pytorch_lightnings_weight_averaging_must_keep_the_zeros(
    tmp_path: Path, pruner: Any
) -> None:
    for averaging in (EMAWeightAveraging(), StochasticWeightAveraging(swa_lrs=0.05)):
        name = type(averaging).__name__
        with pytest.raises(ValueError, match=rf"with {name}: an average of the weights"):
            make_trainer(tmp_path, [pruner(), averaging], trainer=pl.Trainer).fit(
                PLSeedModel(), seed_loader()
            )
    for averaging in (
        WeightAveraging(avg_fn=KeepSupport(decay=0.9)),
        StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, avg_fn=KeepSupport()),
        SparseStochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1),
        standalone.SparseWeightAveraging(decay=0.9),
        standalone.SparseStochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1),
    ):
        model, chosen = PLSeedModel(), pruner()
        if isinstance(chosen, BregmanPruner):
            model.bregman_pruner = chosen
        make_trainer(tmp_path, [chosen, averaging], max_epochs=3, trainer=pl.Trainer).fit(
            model, seed_loader()
        )
        # The model handed back holds the average: zero wherever the pruned model was.
        assert measure_sparsity(model).sparsity > 0.3, type(averaging).__name__


def test_sparse_weight_averaging_says_what_to_use_under_pytorch_lightning(tmp_path: Path) -> None:
    """Lightning's WeightAveraging, which it extends, fails to set up a pytorch_lightning
    model ("Expected a parent"): refused with what works there instead."""
    averaging = SparseWeightAveraging(decay=0.9)
    trainer = make_trainer(tmp_path, [SafeModelPruning(0.5), averaging], trainer=pl.Trainer)
    with pytest.raises(
        TypeError, match="cannot set up PLSeedModel, a LightningModule of"
    ) as raised:
        trainer.fit(PLSeedModel(), seed_loader())
    assert "allowed: dist_bregman.pytorch_lightning.SparseWeightAveraging" in str(raised.value)


class _Data(pl.LightningDataModule):
    def train_dataloader(self) -> Any:
        return seed_loader()


CLI_CONFIG = """
trainer:
  max_epochs: 3
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: {module}.BregmanPruner
      init_args: {{target_sparsity: 0.6, initial_lambda: 0.02, lambda_update_rate: 0.05,
                  update_frequency: 5}}
    - class_path: {module}.SafeModelPruning
      init_args: {{amount: 0.3}}
    - class_path: {module}.SparseWeightAveraging
      init_args: {{decay: 0.9}}
"""


def test_pytorch_lightnings_cli_takes_the_standalone_callbacks_from_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its LightningCLI accepts only subclasses of its own Callback: dist_bregman's
    lightning.pytorch callbacks are refused, dist_bregman.pytorch_lightning's fit."""
    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(CLI_CONFIG.format(module="dist_bregman"))
    with pytest.raises(SystemExit):  # jsonargparse's usage error
        LightningCLI(PLSeedModel, _Data, args=["fit", "--config", str(config)])
    refusal = "dist_bregman.BregmanPruner does not correspond to a subclass of Callback"
    assert refusal in capsys.readouterr().err
    config.write_text(CLI_CONFIG.format(module="dist_bregman.pytorch_lightning"))
    cli = LightningCLI(
        PLSeedModel, _Data, args=["fit", "--config", str(config)], save_config_callback=None
    )
    names = [type(c).__module__ for c in cli.trainer.callbacks[:3]]
    assert names == ["dist_bregman.pytorch_lightning"] * 3
    pruner = cli.trainer.callbacks[0]
    assert isinstance(pruner, pl.Callback) and pruner.current_lambda != 0.02  # it updated
    # The model handed back holds the average, which kept the zeros of both pruners.
    assert measure_sparsity(cli.model).sparsity > 0.3
