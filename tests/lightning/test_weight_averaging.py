"""Weight averaging (Lightning's SWA and EMA callbacks) beside the pruners: refused unless
the average keeps the zeros (KeepSupport); with it, the model a fit hands back is sparse."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from dist_bregman import (
    BregmanPruner,
    KeepSupport,
    SafeModelPruning,
    SparseStochasticWeightAveraging,
    SparseWeightAveraging,
    measure_sparsity,
)
from dist_bregman.callbacks.averaging import _avg_fn, check_averaging
from tests.helpers.lightning import SeedModel, make_trainer, seed_loader


def test_keep_support_averages_then_zeros_where_the_model_is_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(6, 5, generator=generator) for _ in range(4)]
    for step in steps[1:]:
        step[torch.rand(6, 5, generator=generator) < 0.4] = 0
    for rule, reference in (
        (KeepSupport(), lambda avg, cur, n: avg + (cur - avg) / (n + 1)),
        (KeepSupport(decay=0.9), lambda avg, cur, n: 0.9 * avg + 0.1 * cur),
        (KeepSupport(avg_fn=get_ema_avg_fn(0.8)), lambda avg, cur, n: 0.8 * avg + 0.2 * cur),
    ):
        model = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False), torch.nn.BatchNorm1d(6))
        averaged = AveragedModel(model, avg_fn=rule, use_buffers=True)
        expected = steps[0].clone()  # the first update copies
        for n, step in enumerate(steps):
            with torch.no_grad():
                model[0].weight.copy_(step)
            model(torch.randn(4, 5, generator=generator))  # moves BatchNorm's buffers
            averaged.update_parameters(model)
            if n:
                expected = torch.where(step == 0, 0.0, reference(expected, step, n))
            torch.testing.assert_close(averaged.module[0].weight, expected, rtol=0, atol=1e-6)
            assert torch.equal(averaged.module[0].weight == 0, step == 0)
            assert averaged.module[1].num_batches_tracked == n + 1  # a counter: not averaged
    # Without it, an average is zero only where every step was: here (a dense first step)
    # nowhere, though the last step is 40% zero.
    model = torch.nn.Linear(5, 6, bias=False)
    plain = AveragedModel(model, avg_fn=get_ema_avg_fn(0.9))
    for step in steps:
        with torch.no_grad():
            model.weight.copy_(step)
        plain.update_parameters(model)
    assert int((steps[-1] == 0).sum()) > 6 and int((plain.module.weight == 0).sum()) == 0


def test_keep_support_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"avg_fn=0.9: expected None or a callable"):
        KeepSupport(avg_fn=0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"decay=1.5: expected a number in \[0(\.0)?, 1"):
        KeepSupport(decay=1.5)
    with pytest.raises(ValueError, match=r"decay=0.9 with avg_fn=.*allowed: one of them"):
        KeepSupport(0.9, get_ema_avg_fn(0.9))


def test_sparse_weight_averaging_updates_on_its_schedule_and_checks_its_arguments() -> None:
    averaging = SparseWeightAveraging(update_every_n_steps=3, update_starting_at_step=2)
    assert [k for k in range(12) if averaging.should_update(step_idx=k)] == [2, 5, 8, 11]
    assert not averaging.should_update(epoch_idx=0)
    assert repr(_avg_fn(averaging)) == "KeepSupport(decay=0.999)"
    assert repr(_avg_fn(SparseWeightAveraging(decay=None))) == "KeepSupport()"
    with pytest.raises(ValueError, match=r"update_every_n_steps=0: expected an integer >= 1"):
        SparseWeightAveraging(update_every_n_steps=0)
    with pytest.raises(ValueError, match=r"update_starting_at_step=-1: expected an integer >= 0"):
        SparseWeightAveraging(update_starting_at_step=-1)
    with pytest.raises(ValueError, match=r"decay=1.5: expected a number in \[0.0, 1.0\]"):
        SparseWeightAveraging(decay=1.5)


def _model_and_pruner(kind: str) -> tuple[SeedModel, pl.Callback]:
    model = SeedModel(lr=0.05)
    if kind == "bregman":
        pruner = BregmanPruner(0.6, 0.02, 0.05, 5, verbose=1)
        model.bregman_pruner = pruner
        return model, pruner
    return model, SafeModelPruning(0.3, True, 0.6, 6, verbose=1)  # ramps to the last epoch


@pytest.mark.parametrize(
    ("kind", "averaging"),
    [
        ("bregman", lambda: EMAWeightAveraging()),
        ("safe", lambda: StochasticWeightAveraging(swa_lrs=0.05)),
        ("bregman", lambda: WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))),
    ],
)
def test_averaging_that_loses_the_zeros_is_refused_before_training(
    tmp_path: Path, kind: str, averaging: Any
) -> None:
    """Measured before the check: EMAWeightAveraging handed back a model with no zero
    after BregmanPruner measured 77% and after SafeModelPruning pruned 60%."""
    model, pruner = _model_and_pruner(kind)
    callback = averaging()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, [pruner, callback], max_epochs=2)
    name = type(callback).__name__
    refusal = rf"{type(pruner).__name__} with {name}: .*KeepSupport.*in a YAML config: "
    refusal += r"dist_bregman.SparseWeightAveraging or dist_bregman.SparseStochasticWeightAveraging"
    with pytest.raises(ValueError, match=refusal):
        trainer.fit(model, seed_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("who", ["BregmanPruner", "SafeModelPruning"])
def test_ddp_model_averaging_is_refused_before_training(who: str) -> None:
    """``DDPStrategy(model_averaging_period=...)`` with a post-local SGD state averages the
    replicas itself after each optimizer step: the ranks train apart in between. (On CPU
    its state cannot be made before the process group, which it needs for its subgroups:
    the strategy's attribute is set as its ``setup`` sets it.)"""
    strategy = DDPStrategy(model_averaging_period=4)
    trainer = SimpleNamespace(strategy=strategy, callbacks=[])
    assert strategy._model_averager is None  # Lightning's attribute, until setup
    assert check_averaging(trainer, who) == []  # type: ignore[arg-type]
    strategy._model_averager = PeriodicModelAverager.__new__(PeriodicModelAverager)
    refusal = rf"{who} with DDPStrategy\(model_averaging_period=...\) \(post-local SGD\)"
    with pytest.raises(ValueError, match=refusal + r".*allowed: DDP without model averaging"):
        check_averaging(trainer, who)  # type: ignore[arg-type]


class _Live(pl.Callback):
    """The model's own weights after the last optimizer step, before any averaging."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize(
    "make",
    [
        lambda: WeightAveraging(avg_fn=KeepSupport(decay=0.9)),
        lambda: SparseWeightAveraging(decay=0.9),  # the same, as YAML can give it
    ],
    ids=["WeightAveraging", "SparseWeightAveraging"],
)
def test_ema_keeping_the_support_hands_back_an_averaged_model_with_the_last_steps_zeros(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Any
) -> None:
    model, pruner = _model_and_pruner("bregman")
    assert isinstance(pruner, BregmanPruner)
    live = _Live()
    ema = make()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [pruner, ema, live, checkpoint]
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        trainer = make_trainer(tmp_path, callbacks, max_epochs=4, enable_checkpointing=True)
        trainer.fit(model, seed_loader())
    final = model.state_dict()
    weights = [k for k in final if k.endswith("weight")]
    assert all(torch.equal(final[k] == 0, live.weights[k] == 0) for k in weights)
    assert not all(torch.equal(final[k], live.weights[k]) for k in weights)  # averaged
    sparsity = measure_sparsity(model).sparsity
    assert 0.5 < sparsity == pruner.current_sparsity
    line = f"Fit end: the model holds the {type(ema).__name__} average: sparsity "
    assert any(line + f"{100 * sparsity:.3f}%" in r.getMessage() for r in caplog.records)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], final[k]) for k in weights)  # the average, as sparse


@pytest.mark.parametrize(
    "make",
    [
        lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3, avg_fn=KeepSupport()),
        lambda: SparseStochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=3),
    ],
    ids=["StochasticWeightAveraging", "SparseStochasticWeightAveraging"],
)
def test_swa_keeping_the_support_keeps_the_zeros_of_the_last_pruning_event(
    tmp_path: Path, make: Any
) -> None:
    """SWA averages at epoch starts and SafeModelPruning prunes at epoch ends: the average
    copied in at the end lacks the last event's zeros, which the pruner makes again."""
    model, pruner = _model_and_pruner("safe")
    assert isinstance(pruner, SafeModelPruning)
    live = _Live()
    swa = make()
    make_trainer(tmp_path, [pruner, swa, live], max_epochs=6).fit(model, seed_loader())
    assert pruner.last is not None and pruner.last_event == 5
    report = pruner.last.report
    assert (
        measure_sparsity(model).nonzero == report.nonzero
    )  # (4 more without the enforcement at fit end)
    final = model.state_dict()
    assert not all(torch.equal(final[k], live.weights[k]) for k in final)  # averaged
