"""``strategy="ddp"``, 2 CPU processes whose models start from different seeds (DDP then
broadcasts rank 0's weights): per-rank fingerprints of the effective weights after fitting
with Lightning's ``ModelPruning`` or with ``BregmanPruner``.

    python tests/scripts/model_pruning_drift.py --pruners lightning bregman --out /tmp/drift
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_bregman import BregmanPruner, comm, measure_sparsity


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))  # per-rank init
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Fingerprint(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = []
        for layer in (pl_module.net[0], pl_module.net[2]):
            mask = getattr(layer, "weight_mask", None)
            orig = getattr(layer, "weight_orig", layer.weight)
            effective = orig if mask is None else orig * mask
            weights.append(float(effective.detach().double().sum()))
        sparsity = measure_sparsity(pl_module, sync=False).sparsity
        gathered = comm.all_gather_object((weights, sparsity))
        if trainer.is_global_zero:
            self.out.write_text(
                json.dumps(
                    {"weights": [g[0] for g in gathered], "sparsity": [g[1] for g in gathered]}
                )
            )


def fit(pruner_name: str, out: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=generator)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(dim=1)), batch_size=16)
    pruner: pl.Callback
    if pruner_name == "lightning":
        pruner = ModelPruning(
            "l1_unstructured", amount=0.3, use_global_unstructured=True, verbose=0
        )
    else:
        pruner = BregmanPruner(
            target_sparsity=0.5, initial_lambda=0.01, lambda_update_rate=0.05, update_frequency=4
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruner, Fingerprint(out)],
    )
    trainer.fit(Model(), data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pruners", nargs="+", choices=("lightning", "bregman"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for <pruner>.json")
    args = parser.parse_args()
    for name in args.pruners:  # one launch for all: each fit builds its model afresh
        fit(name, args.out / f"{name}.json")
    comm.shutdown()


if __name__ == "__main__":
    main()
