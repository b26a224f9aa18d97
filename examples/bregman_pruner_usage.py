"""The seed's example, runnable: a LightningModule that adds the Bregman loss term.

    python examples/bregman_pruner_usage.py            # ~10 s on a CPU
    python examples/bregman_pruner_usage.py --epochs 5 --target 0.8

The model follows the seed's pattern: it holds ``self.bregman_pruner`` and adds
``get_regularization_loss(self)`` in ``training_step``. With the default ``mode="prox"``
the exact zeros come from the proximal step the pruner runs after each optimizer step; the
loss term contributes the penalty's value to the logged loss and no second dose of its
gradient (see the README, "The loss term and the proximal step").
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from dist_bregman import BregmanPruner, measure_sparsity
from dist_bregman.data import DigitsDataModule


class LitClassifier(pl.LightningModule):
    """A user's model, written as in the seed."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.bregman_pruner: BregmanPruner | None = None

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        # Your standard loss calculation
        loss = self.compute_loss(batch)

        # Add Bregman regularization
        if self.bregman_pruner is not None:
            reg_loss = self.bregman_pruner.get_regularization_loss(self)
            loss = loss + reg_loss

        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    pl.seed_everything(0)

    # Create the callback. initial_lambda is the L1 coefficient per weight (the units of
    # weight_decay); the seed's default of 1.0 is far too strong for this model.
    bregman_pruner = BregmanPruner(
        target_sparsity=args.target,  # 80% target sparsity
        initial_lambda=1e-3,  # starting regularization strength
        lambda_update_rate=2.0,  # gain of the lambda rule
        lambda_rule="multiplicative",
        min_lambda=1e-6,
        max_lambda=1e-2,
        update_frequency=10,  # steps between updates
        verbose=1,  # enable logging
    )
    model = LitClassifier()
    model.bregman_pruner = bregman_pruner

    # Add to PyTorch Lightning trainer
    trainer = pl.Trainer(
        callbacks=[bregman_pruner],
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    report = measure_sparsity(model)
    accuracy = float(trainer.callback_metrics["val_acc"])  # of the last epoch's weights
    print(
        f"final sparsity {100 * report.sparsity:.3f}% ({report.nonzero}/{report.total} "
        f"nonzero), validation accuracy {100 * accuracy:.2f}%"
    )


if __name__ == "__main__":
    main()
