"""A seed user's LightningModule, data and a quiet CPU Trainer.

Under either of Lightning's package names: :class:`SeedModel` and :func:`make_trainer` are
``lightning.pytorch``'s, :class:`PLSeedModel` and ``make_trainer(..., trainer=...)`` serve
the standalone ``pytorch_lightning``'s Trainer (tests/lightning/test_pytorch_lightning.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytorch_lightning
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dist_bregman import BregmanPruner


class SeedSteps(nn.Module):
    """The seed's integration: ``self.bregman_pruner`` and the loss term in training_step;
    mixed into a ``LightningModule`` of either package (which gives ``global_step``)."""

    def __init__(self, lr: float = 0.1, nan_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
        self.lr = lr
        self.nan_at_step = nan_at_step
        self.bregman_pruner: BregmanPruner | None = None

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if self.bregman_pruner is not None:
            reg_loss = self.bregman_pruner.get_regularization_loss(self)
            loss = loss + reg_loss
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SeedModel(SeedSteps, pl.LightningModule):
    """The seed user's model under ``lightning.pytorch``."""


class PLSeedModel(SeedSteps, pytorch_lightning.LightningModule):
    """The same model under the standalone ``pytorch_lightning`` package."""


class FinetunedSteps(nn.Module):
    """A backbone for Lightning's ``BackboneFinetuning`` (frozen at the start, a new param
    group from its epoch on) and a head; the seed's loss term when given a pruner."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.bregman_pruner: BregmanPruner | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        if self.bregman_pruner is not None:
            loss = loss + self.bregman_pruner.get_regularization_loss(self)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]  # the head, at first
        return torch.optim.SGD(trainable, lr=0.05)


class FinetunedModel(FinetunedSteps, pl.LightningModule):
    """:class:`FinetunedSteps` under ``lightning.pytorch``."""


class PLFinetunedModel(FinetunedSteps, pytorch_lightning.LightningModule):
    """:class:`FinetunedSteps` under the standalone ``pytorch_lightning`` package."""


class ManualTwoOptimizers(SeedModel):
    """Manual optimization (a GAN's shape): one optimizer per layer, each stepped by hand,
    so ``global_step`` counts two steps a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if self.bregman_pruner is not None:
            loss = loss + self.bregman_pruner.get_regularization_loss(self)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        return [torch.optim.SGD(self.net[i].parameters(), lr=self.lr, momentum=0.9) for i in (0, 2)]


def seed_loader(n: int = 256, batch_size: int = 16, resumable: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=generator)
    y = (x[:, :4].argmax(dim=1)).long()
    kind = ResumableLoader if resumable else DataLoader
    return kind(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ResumableLoader(DataLoader):
    """A DataLoader (in order) that Lightning resumes mid-epoch where its checkpoint left
    it: Lightning saves ``state_dict()`` and restarts a plain loader's epoch from its first
    batch, which would feed a run resumed mid-epoch other data than the uninterrupted one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        self.seen = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.seen = index + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["seen"]


def make_trainer(
    tmp_path: Path,
    callbacks: list,
    max_epochs: int = 2,
    trainer: type[Any] = pl.Trainer,
    **kwargs: Any,
) -> Any:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return trainer(callbacks=callbacks, **options)
