"""Lightning ``strategy="ddp_spawn"`` on CPU: every rank agrees with a 1-process run (under
both of Lightning's package names, ``lightning.pytorch`` and ``pytorch_lightning``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import pytorch_lightning
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dist_bregman import BregmanPruner, comm, measure_sparsity
from tests.helpers.lightning import PLSeedModel, SeedModel, make_trainer, seed_loader
from tests.helpers.ports import free_port


class Probe(pl.Callback):
    """Records (step, nonzero, lambda) at every update; at the end gathers every rank's
    record and weights to rank 0, which writes them to ``out``."""

    def __init__(self, pruner: BregmanPruner, out: Path | None = None) -> None:
        self.pruner, self.out, self.trajectory = pruner, out, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        controller = self.pruner.controller
        if controller is not None and controller.last_update_step == trainer.global_step:
            self.trajectory.append(
                (trainer.global_step, controller.last_report.nonzero, controller.lambda_)
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "trajectory": self.trajectory,
            "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "report": measure_sparsity(pl_module),
        }
        gathered = comm.all_gather_object(record)
        if trainer.is_global_zero and self.out is not None:
            self.out.write_bytes(pickle.dumps(gathered))


class EndGroup(pl.Callback):
    """Ends each spawned worker's process group at teardown (after Lightning has unwrapped
    DDP): Lightning destroys only NCCL groups at exit and leaves gloo's to the interpreter,
    where a worker died without a Python error (torch's ``ProcessExitedException``) once
    in about 45 runs here: the gloo exit abort that ``comm.shutdown`` explains."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        comm.shutdown()


def _pruner() -> BregmanPruner:
    return BregmanPruner(
        target_sparsity=0.7, initial_lambda=0.01, lambda_update_rate=0.05, update_frequency=4
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("model_class", "trainer_class"),
    [(SeedModel, pl.Trainer), (PLSeedModel, pytorch_lightning.Trainer)],
    ids=["lightning", "pytorch_lightning"],
)
def test_ddp_spawn_ranks_agree_with_each_other_and_with_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_class: type, trainer_class: type
) -> None:
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # Lightning would bind port 0, close it
    # Under DDP Lightning gives the training loader DistributedSampler(shuffle=True, seed=0):
    # rank r takes perm[r::2] of each epoch's permutation. The same sampler with one replica
    # yields that permutation in order, so one process with batches of 16 sees, at every
    # step, exactly the union of the two ranks' batches of 8.
    dataset = seed_loader().dataset
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    single = _pruner()
    single_probe = Probe(single)
    model = model_class()
    model.bregman_pruner = single
    make_trainer(tmp_path / "one", [single, single_probe], 2, trainer_class).fit(
        model, DataLoader(dataset, batch_size=16, sampler=sampler)
    )
    single_state = {k: v.detach() for k, v in model.state_dict().items()}

    pruner = _pruner()
    out = tmp_path / "ranks.pkl"
    model = model_class()
    model.bregman_pruner = pruner
    trainer = make_trainer(
        tmp_path / "ddp",
        [pruner, Probe(pruner, out), EndGroup()],
        max_epochs=2,
        trainer=trainer_class,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(model, seed_loader(batch_size=8))
    ranks = pickle.loads(out.read_bytes())

    assert len(ranks) == 2 and len(single_probe.trajectory) == 8
    for rank in ranks:
        assert rank["trajectory"] == single_probe.trajectory  # counts and lambda, exactly
        assert rank["report"] == ranks[0]["report"]
        for key, value in single_state.items():
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-5, atol=1e-6)
    assert ranks[0]["report"].nonzero < ranks[0]["report"].total
    # The main process gets rank 0's logged values back.
    assert trainer.callback_metrics["bregman/lambda"].item() == pytest.approx(single.current_lambda)
