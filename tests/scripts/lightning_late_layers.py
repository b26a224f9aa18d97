"""Lightning's pattern for large models, 2 CPU processes: the layers are made in
``configure_model`` (after the callbacks' setup; DeepSpeed ZeRO-3 makes them partitioned
under ``zero.Init``, FSDP2 shards them there), with BregmanPruner and SafeModelPruning.

    python tests/scripts/lightning_late_layers.py --strategies ddp zero3 --out /tmp/late

Rank 0 writes ``<strategy>.pkl``: per rank, what ``lightning_strategy.Probe`` records (the
lambda updates, the final report, the counts of the weights gathered whole).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_strategy import Probe, strategy_for

from dist_bregman import BregmanPruner, SafeModelPruning, comm


class LateModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.bregman_pruner: BregmanPruner | None = None

    def configure_model(self) -> None:
        if hasattr(self, "net"):
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(13, 17), nn.ReLU(), nn.Linear(17, 11), nn.ReLU(), nn.Linear(11, 5)
        )
        if self.device_mesh is not None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        assert self.bregman_pruner is not None
        return loss + self.bregman_pruner.get_regularization_loss(self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(strategy: str, out: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 13, generator=generator)
    data = DataLoader(TensorDataset(x, x[:, :5].argmax(dim=1)), batch_size=16)
    pruner = BregmanPruner(
        target_sparsity=0.6, initial_lambda=0.02, lambda_update_rate=0.05, update_frequency=4
    )
    model = LateModel()
    model.bregman_pruner = pruner
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy_for(strategy),
        max_epochs=2,
        callbacks=[SafeModelPruning(amount=0.3), pruner, Probe(pruner, out / f"{strategy}.pkl")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for strategy in args.strategies:
        fit(strategy, args.out)
    comm.shutdown()


if __name__ == "__main__":
    main()
