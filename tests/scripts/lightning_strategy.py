"""Lightning, 2 CPU processes, one strategy after another: what every rank's BregmanPruner saw.

    python tests/scripts/lightning_strategy.py --runs ddp:sgd zero3:sgd --out /tmp/results
    python tests/scripts/lightning_strategy.py --resume --runs fsdp2:linbreg --out /tmp/results

Lightning re-runs this script for rank 1 at the first fit; the later fits find the
processes and the process group in place (``LOCAL_RANK`` is set from then on), so every
strategy is tried in one launch instead of paying process and import start-up per strategy.
For each run, rank 0 writes ``<strategy>-<optimizer>.pkl`` with, per rank: the (step,
nonzero, lambda) trajectory, the final report, and counts of the full effective weights
gathered with the strategy's own machinery.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_bregman import BregmanPruner, comm, regularized_groups
from dist_bregman.optim import LinBreg
from tests.helpers.strategies import counts, effective_weights, matrix_model, zero_redundancy


class Model(pl.LightningModule):
    def __init__(self, optimizer: str, zero: bool = False) -> None:
        super().__init__()
        self.net = matrix_model()
        self.optimizer_name = optimizer
        self.zero = zero
        self.bregman_pruner: BregmanPruner | None = None

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # The last layer is left to the root's group, as an output layer usually is: FSDP2
        # keeps that group gathered from forward to backward and after the validation
        # forwards, where the pruner reads it (the loss term, the measurement at the end).
        for layer in self.net[:-1]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.bregman_pruner is not None:
            loss = loss + self.bregman_pruner.get_regularization_loss(self)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.optimizer_name == "linbreg":
            optimizer = LinBreg(regularized_groups(self.net), lr=0.5)
        return zero_redundancy(optimizer) if self.zero else optimizer


class Probe(pl.Callback):
    def __init__(self, pruner: BregmanPruner, out: Path) -> None:
        self.pruner, self.out, self.points = pruner, out, []
        self.record: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        controller = self.pruner.controller
        if controller is not None and controller.last_update_step == trainer.global_step:
            self.points.append(
                (trainer.global_step, controller.last_report.nonzero, controller.lambda_)
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gather: Any = contextlib.nullcontext()
        if getattr(trainer.strategy, "zero_stage_3", False):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(
                list(pl_module.parameters()), modifier_rank=None
            )
        with gather:
            gathered = counts(effective_weights(pl_module.net))
        controller = self.pruner.controller
        assert controller is not None
        record = self.record = {
            "points": self.points,
            "report": controller.measure(),
            "gathered": gathered,
            "lambda": controller.lambda_,
            "optimizer": type(trainer.optimizers[0]).__name__,
        }
        everyone = comm.all_gather_object(record)
        if trainer.is_global_zero:
            self.out.write_bytes(pickle.dumps(everyone))


def strategy_for(name: str) -> Any:
    if name in ("ddp", "ddp_zero"):  # ddp_zero: torch's ZeroRedundancyOptimizer over DDP
        return "ddp"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    from dist_bregman.strategies import DeepSpeedStrategy

    stage = int(name[-1])
    return DeepSpeedStrategy(
        config={
            "train_micro_batch_size_per_gpu": 16,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        }
    )


def fit(
    strategy: str,
    optimizer: str,
    out: Path,
    epochs: int = 2,
    ckpt_path: Path | None = None,
    save: Path | None = None,
) -> Probe:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 13, generator=generator)
    data = DataLoader(TensorDataset(x, x[:, :5].argmax(dim=1)), batch_size=16)
    val = DataLoader(TensorDataset(x[:32], x[:32, :5].argmax(dim=1)), batch_size=16)
    pruner = BregmanPruner(
        target_sparsity=0.6,
        initial_lambda=0.02 if optimizer == "sgd" else 0.05,
        lambda_update_rate=0.05,
        update_frequency=4,
    )
    model = Model(optimizer, zero=strategy == "ddp_zero")
    model.bregman_pruner = pruner
    probe = Probe(pruner, out / f"{strategy}-{optimizer}.pkl")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy_for(strategy),
        max_epochs=epochs,
        callbacks=[pruner, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data, val, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return probe


def resume(strategy: str, optimizer: str, out: Path) -> None:
    """4 epochs at once; 2 epochs saved by the strategy's own checkpointing, then resumed
    to 4: rank 0 writes both runs' (step, nonzero, lambda) points after epoch 2 and final
    reports to ``<strategy>-<optimizer>-resume.pkl``."""
    whole = fit(strategy, optimizer, out, epochs=4)
    checkpoint = out / f"{strategy}-{optimizer}.ckpt"
    fit(strategy, optimizer, out, epochs=2, save=checkpoint)
    resumed = fit(strategy, optimizer, out, epochs=4, ckpt_path=checkpoint)
    runs = [(probe.points, probe.record["report"]) for probe in (whole, resumed)]
    if comm.is_rank_zero():
        (out / f"{strategy}-{optimizer}-resume.pkl").write_bytes(pickle.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", required=True, help="strategy:optimizer ...")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="resume runs instead (above)")
    args = parser.parse_args()
    for run in args.runs:
        strategy, optimizer = run.split(":")
        (resume if args.resume else fit)(strategy, optimizer, args.out)
    comm.shutdown()


if __name__ == "__main__":
    main()
