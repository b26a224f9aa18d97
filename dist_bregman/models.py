"""Models for the digits job, written the way the seed's users write theirs."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from dist_bregman.callbacks.bregman import BregmanPruner


class DigitsClassifier(pl.LightningModule):
    """Shared steps: cross-entropy, the seed's regularization hook, accuracy logging."""

    net: nn.Module

    def __init__(
        self, lr: float, momentum: float, weight_decay: float, optimizer: str, lr_schedule: str
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer={optimizer!r}: expected 'sgd' or 'adam'")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: expected 'constant' or 'cosine'")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.optimizer_name, self.lr_schedule = optimizer, lr_schedule
        self.bregman_pruner: BregmanPruner | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        # The seed's models hold the pruner as an attribute; find it among the callbacks.
        pruners = [c for c in self.trainer.callbacks if isinstance(c, BregmanPruner)]  # type: ignore[attr-defined]
        self.bregman_pruner = pruners[0] if pruners else None

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        # The seed's integration, unchanged (see README: "The loss term and the proximal step").
        if self.bregman_pruner is not None:
            reg_loss = self.bregman_pruner.get_regularization_loss(self)
            loss = loss + reg_loss
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(
                self.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
            )
        if self.lr_schedule == "constant":
            return optimizer
        # Cosine decay to 0 over the run: the proximal threshold lr * lambda decays with it,
        # so the sparsity pattern settles instead of flickering at the end.
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class DigitsMLP(DigitsClassifier):
    """``64 -> hidden... -> 10`` with ReLU."""

    def __init__(
        self,
        hidden: tuple[int, ...] = (256, 128),
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__(lr, momentum, weight_decay, optimizer, lr_schedule)
        self.save_hyperparameters()
        sizes = [64, *hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 10))
        self.net = nn.Sequential(*layers)
