"""SafeModelPruning in a real Trainer: the seed's third snippet, resume, fresh loads."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dist_bregman import BregmanPruner, SafeModelPruning, measure_sparsity
from dist_bregman.pruning import MagnitudePruner, PruningConfig
from tests.helpers.lightning import ManualTwoOptimizers, SeedModel, make_trainer, seed_loader


def test_seed_snippet_both_callbacks_in_one_trainer_report_the_same_sparsity(
    tmp_path: Path,
) -> None:
    callbacks = [
        # Structured pruning (removes weights)
        SafeModelPruning(amount=0.2, scheduled_pruning=True, final_amount=0.6, epochs_to_ramp=10),
        # Bregman regularization (encourages sparsity)
        BregmanPruner(target_sparsity=0.8, initial_lambda=0.01, lambda_update_rate=0.001),
    ]
    model = SeedModel()
    model.bregman_pruner = callbacks[1]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=4)
    trainer.fit(model, seed_loader())
    pruning, bregman = callbacks
    cubic = 0.6 + (0.2 - 0.6) * (1 - 3 / 10) ** 3
    assert pruning.current_amount == pytest.approx(cubic) and pruning.last_event == 3
    truth = measure_sparsity(model)
    assert pruning.last.report.nonzero >= truth.nonzero  # Bregman zeros after the event count too
    assert bregman.controller.measure() == truth  # one truth for both callbacks
    assert truth.total - truth.nonzero >= round(cubic * truth.total)
    assert trainer.callback_metrics["pruning/amount"].item() == pytest.approx(cubic)
    logged = trainer.callback_metrics["pruning/amount"]  # a host tensor: no copy to a GPU
    assert logged.device.type == "cpu" and logged.dtype == torch.float64


class Trace(pl.Callback):
    def __init__(self) -> None:
        self.points: list[tuple[int, int, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = measure_sparsity(pl_module)
        self.points.append(
            (trainer.current_epoch, report.nonzero, float(pl_module.net[0].weight.detach().sum()))
        )


def _pruning() -> SafeModelPruning:
    return SafeModelPruning(
        amount=0.1, scheduled_pruning=True, final_amount=0.7, epochs_to_ramp=4, schedule="linear"
    )


def test_resume_mid_schedule_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = Trace()
    make_trainer(tmp_path / "a", [_pruning(), whole], max_epochs=5).fit(SeedModel(), seed_loader())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = _pruning()
    make_trainer(tmp_path / "b", [first, checkpoint], max_epochs=2, enable_checkpointing=True).fit(
        SeedModel(), seed_loader()
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["SafeModelPruning"]["last_event"] == 1
    restored = _pruning()
    restored.load_state_dict(saved["callbacks"]["SafeModelPruning"])
    assert first.current_amount is not None
    assert restored.current_amount == first.current_amount  # before its first event
    resumed, pruning = Trace(), _pruning()
    trainer = make_trainer(tmp_path / "c", [pruning, resumed], max_epochs=5)
    trainer.fit(SeedModel(), seed_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.points == whole.points[2:]  # masks, schedule and weights continue exactly
    assert pruning.current_amount == pytest.approx(0.7)


def test_a_second_fit_with_a_new_trainer_never_loosens_what_the_schedule_reached(
    tmp_path: Path,
) -> None:
    """Fine-tuning a pruned model with a new Trainer (epochs count from 0 again): the
    schedule's first amount would free most of the zeros; the reached amount is held."""
    pruning = _pruning()
    model = SeedModel()
    make_trainer(tmp_path / "a", [pruning], max_epochs=5).fit(model, seed_loader())
    reached = pruning.current_amount
    assert reached == pytest.approx(0.7)
    make_trainer(tmp_path / "b", [pruning], max_epochs=2).fit(model, seed_loader())
    assert pruning.current_amount == pytest.approx(reached)
    report = measure_sparsity(model)
    assert report.total - report.nonzero >= round(0.7 * report.total)


def test_manual_optimization_with_two_optimizers_prunes_as_one_automatic_optimizer(
    tmp_path: Path,
) -> None:
    """The masks are re-applied after each optimizer's own ``step()``: with one optimizer
    per layer, stepped by hand, the weights are those of the automatic run with one
    optimizer (masks held only after the first optimizer would let the head's pruned
    weights move again). Epoch events: the two runs prune at the same points."""
    models = []
    for model in (SeedModel(), ManualTwoOptimizers()):
        make_trainer(tmp_path, [_pruning()], max_epochs=3).fit(model, seed_loader())
        models.append(model)
    automatic, manual = models
    assert int((manual.net[2].weight == 0).sum()) > 0
    for a, b in zip(automatic.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_pruned_checkpoint_loads_into_a_fresh_unpruned_model(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = SeedModel()
    pruning = SafeModelPruning(amount=0.5)
    make_trainer(tmp_path, [pruning, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        model, seed_loader()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    fresh = SeedModel(lr=0.3)
    fresh.load_state_dict(state)  # plain weights: the masks are the zeros themselves
    x = torch.randn(16, 10)
    assert torch.equal(fresh.net(x), model.net(x))
    assert measure_sparsity(fresh).sparsity == pytest.approx(0.5, abs=1 / 448)
    assert all(type(p) is torch.nn.Parameter for p in fresh.parameters())


def test_step_unit_and_permanent_end(tmp_path: Path) -> None:
    pruning = SafeModelPruning(amount=0.3, prune_every=5, prune_unit="step")
    model = SeedModel()
    make_trainer(tmp_path, [pruning], max_epochs=1).fit(model, seed_loader())
    assert pruning.last_event == 15  # 16 steps: events at 5, 10, 15
    assert not pruning.pruner.active  # released at the end of fit...
    assert measure_sparsity(model).sparsity >= 0.3 - 1 / 448  # ...with the zeros in


def _event_units(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The "step N" of each verbose event line captured."""
    lines = [r.getMessage() for r in caplog.records]
    return [line.split(":")[1].strip() for line in lines if "pruned to" in line]


def test_a_second_fit_with_a_new_trainer_prunes_at_every_step_event_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps count from 0 again in a new Trainer: the event at the step where the first fit
    pruned last is this fit's event too, not a repeat of that one."""
    pruning = SafeModelPruning(amount=0.3, prune_every=5, prune_unit="step", verbose=1)
    model = SeedModel()
    make_trainer(tmp_path / "a", [pruning], max_steps=7).fit(model, seed_loader())
    assert pruning.last_event == 5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        make_trainer(tmp_path / "b", [pruning], max_epochs=1).fit(model, seed_loader())
    assert _event_units(caplog) == ["step 5", "step 10", "step 15"]
    assert pruning.last_event == 15


def test_step_events_with_gradient_accumulation_prune_once_per_optimizer_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """global_step stays put over the micro-batches of one optimizer step."""
    pruning = SafeModelPruning(amount=0.3, prune_every=2, prune_unit="step", verbose=1)
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        make_trainer(tmp_path, [pruning], max_epochs=1, accumulate_grad_batches=4).fit(
            SeedModel(), seed_loader()
        )
    assert _event_units(caplog) == ["step 2", "step 4"]  # 16 batches: 4 optimizer steps


def test_a_resume_at_an_event_step_with_accumulation_does_not_prune_there_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The restored step is the last event's: its remaining micro-batches are not due."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    options = {"accumulate_grad_batches": 4, "enable_checkpointing": True}
    pruning = SafeModelPruning(amount=0.3, prune_every=2, prune_unit="step", verbose=1)
    make_trainer(tmp_path, [pruning, checkpoint], max_steps=2, **options).fit(
        SeedModel(), seed_loader()
    )
    assert pruning.last_event == 2
    resumed = SafeModelPruning(amount=0.3, prune_every=2, prune_unit="step", verbose=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        make_trainer(tmp_path, [resumed], max_steps=4, **options).fit(
            SeedModel(), seed_loader(), ckpt_path=str(tmp_path / "last.ckpt")
        )
    assert _event_units(caplog) == ["step 4"]


def test_bad_arguments_raise_at_construction() -> None:
    with pytest.raises(ValueError, match=r"final_amount=None with scheduled_pruning=True"):
        SafeModelPruning(amount=0.2, scheduled_pruning=True)
    with pytest.raises(ValueError, match=r"parameters_to_prune\[0\]"):
        SafeModelPruning(parameters_to_prune=[(torch.nn.Linear(2, 2), "nope")])


@pytest.mark.parametrize("file_format", ["safetensors", "torch"])
def test_export_round_trip_reproduces_the_outputs(tmp_path: Path, file_format: str) -> None:
    from torch.nn.utils import prune

    from dist_bregman.export import export_sparse, load_sparse

    model = SeedModel()
    prune.l1_unstructured(model.net[0], "weight", amount=0.5)  # a torch mask, folded on export
    MagnitudePruner(model, PruningConfig(amount=0.8)).prune(0.8)
    path = tmp_path / f"model.{'safetensors' if file_format == 'safetensors' else 'pt'}"
    layers = export_sparse(model, path, file_format=file_format)
    fresh = SeedModel(lr=0.3)
    fresh.load_state_dict(load_sparse(path))
    x = torch.randn(32, 10)
    assert torch.equal(fresh.net(x), model.net(x))
    assert [layer.name for layer in layers] == ["net.0.weight", "net.2.weight"]
    assert sum(layer.nonzero for layer in layers) == measure_sparsity(model).nonzero
    assert sum(layer.sparse_bytes for layer in layers) < 0.5 * sum(
        layer.dense_bytes for layer in layers
    )
    table = path.with_suffix(".report.md").read_text()
    assert "| net.0.weight | 32x10 |" in table and "| total |" in table


def test_a_pruning_event_over_non_finite_weights_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Corrupt(pl.Callback):  # runs before the pruning event at the same epoch end
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            with torch.no_grad():
                module.net[0].weight[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])

    model = SeedModel()
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        make_trainer(tmp_path, [Corrupt(), SafeModelPruning(amount=0.5)], max_epochs=1).fit(
            model, seed_loader()
        )
    assert "SafeModelPruning: epoch 0: 3 non-finite (NaN/Inf) weight elements on rank(s) [0]" in (
        caplog.text
    )
    assert model.net[0].weight[0, :3].isfinite().sum() == 0  # kept, not zeroed


# ---------------------------------------------------------------------------- several callbacks
def _filters_and_elements(model: SeedModel) -> list[SafeModelPruning]:
    """Whole rows (neurons) of the first layer, elements of the last on a schedule: what
    two Lightning ModelPruning callbacks would do, each on its own weights."""
    return [
        SafeModelPruning(
            0.25, structured=True, parameters_to_prune=[(model.net[0], "weight")], name="rows"
        ),
        SafeModelPruning(
            0.1,
            scheduled_pruning=True,
            final_amount=0.7,
            epochs_to_ramp=4,
            schedule="linear",
            parameters_to_prune=[(model.net[2], "weight")],
            verbose=1,
            name="elements",
        ),
    ]


def test_two_named_callbacks_prune_their_own_weights_and_resume_from_their_own_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, whole = SeedModel(), Trace()
    callbacks = _filters_and_elements(model)
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        trainer = make_trainer(tmp_path / "a", [*callbacks, whole], max_epochs=5)
        trainer.fit(model, seed_loader())
    first, last = model.net[0].weight.detach(), model.net[2].weight.detach()
    assert int((first.abs().sum(dim=1) == 0).sum()) == 8  # 25% of 320 elements: 8 rows of 10
    assert int((last == 0).sum()) >= round(0.7 * last.numel())
    assert trainer.callback_metrics["pruning/rows/amount"].item() == pytest.approx(0.25)
    assert trainer.callback_metrics["pruning/elements/amount"].item() == pytest.approx(0.7)
    assert "pruning/amount" not in trainer.callback_metrics
    lines = [r.getMessage() for r in caplog.records if "pruned to" in r.getMessage()]
    assert len(lines) == 5 and all(
        line.startswith("[elements] SafeModelPruning: ") for line in lines
    )
    assert lines[0].startswith("[elements] SafeModelPruning: epoch 0: pruned to 10.000% (global")

    model = SeedModel()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [*_filters_and_elements(model), checkpoint]
    make_trainer(tmp_path / "b", callbacks, 2, enable_checkpointing=True).fit(model, seed_loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert saved["SafeModelPruning{'name': 'rows'}"]["amount"] == pytest.approx(0.25)
    assert saved["SafeModelPruning{'name': 'elements'}"]["amount"] == pytest.approx(0.1 + 0.15)
    model, resumed = SeedModel(), Trace()
    trainer = make_trainer(tmp_path / "c", [*_filters_and_elements(model), resumed], max_epochs=5)
    trainer.fit(model, seed_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.points == whole.points[2:]


def test_two_callbacks_pruning_one_weight_are_refused_at_fit(tmp_path: Path) -> None:
    model = SeedModel()
    callbacks = [
        SafeModelPruning(0.3, parameters_to_prune=[(model.net[2], "weight")], name="head"),
        SafeModelPruning(0.5, name="all"),  # discovers net.2.weight too
    ]
    with pytest.raises(ValueError, match=r"name='all'\) and SafeModelPruning\(name='head'\) both"):
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(model, seed_loader())
    assert SafeModelPruning().state_key == "SafeModelPruning"  # unnamed: Lightning's default
    with pytest.raises(ValueError, match=r"name='a b': expected None or a non-empty str"):
        SafeModelPruning(name="a b")
