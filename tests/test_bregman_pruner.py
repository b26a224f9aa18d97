"""BregmanPruner as the seed describes it: API, validation, logging, state, integration."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateFinder, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from torch import nn

from dist_bregman import BregmanPruner, SafeModelPruning, measure_sparsity
from dist_bregman.optim import LinBreg
from tests.helpers.dynamo import dynamo_warnings
from tests.helpers.lightning import ManualTwoOptimizers, SeedModel, make_trainer, seed_loader

STAMP = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] "


def _fit(
    tmp_path: Path,
    pruner: BregmanPruner,
    max_epochs: int = 2,
    model: SeedModel | None = None,
    callbacks: list | None = None,
    **kwargs: Any,
) -> tuple[SeedModel, pl.Trainer]:
    model = model or SeedModel()
    model.bregman_pruner = pruner
    trainer = make_trainer(tmp_path, callbacks or [pruner], max_epochs, **kwargs)
    trainer.fit(model, seed_loader())
    return model, trainer


# ---------------------------------------------------------------------------- API and validation
def test_seed_signature_names_order_and_defaults() -> None:
    params = inspect.signature(BregmanPruner).parameters
    assert list(params)[:6] == [
        "target_sparsity",
        "initial_lambda",
        "lambda_update_rate",
        "update_frequency",
        "parameters_to_prune",
        "verbose",
    ]
    pruner = BregmanPruner()
    config = pruner.config
    assert (config.target_sparsity, config.initial_lambda, config.lambda_update_rate) == (
        0.8,
        1.0,
        0.001,
    )
    assert (config.update_frequency, config.verbose, pruner.parameters_to_prune) == (100, 0, None)
    assert pruner.current_lambda == 1.0 and pruner.current_sparsity is None
    assert isinstance(pruner, pl.Callback)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"target_sparsity": 1.5},
            ValueError,
            r"target_sparsity=1\.5: expected a number in \[0\.0, 1\.0\]",
        ),
        ({"target_sparsity": -0.1}, ValueError, r"target_sparsity=-0\.1"),
        ({"target_sparsity": "0.8"}, TypeError, r"target_sparsity='0\.8': expected a real number"),
        ({"target_sparsity": float("nan")}, ValueError, r"target_sparsity=nan: expected a finite"),
        ({"update_frequency": 0}, ValueError, r"update_frequency=0: expected an integer >= 1"),
        ({"update_frequency": 2.5}, TypeError, r"update_frequency=2\.5: expected an integer"),
        ({"update_frequency": True}, TypeError, r"update_frequency=True"),
        (
            {"lambda_update_rate": -0.001},
            ValueError,
            r"lambda_update_rate=-0\.001: expected a number >= 0",
        ),
        (
            {"lambda_update_rate": float("inf")},
            ValueError,
            r"lambda_update_rate=inf: expected a finite",
        ),
        ({"initial_lambda": -1.0}, ValueError, r"initial_lambda=-1\.0"),
        ({"initial_lambda": float("nan")}, ValueError, r"initial_lambda=nan"),
        (
            {"initial_lambda": 500.0},
            ValueError,
            r"initial_lambda=500\.0: expected a number in \[0\.0, 100\.0\]",
        ),
        ({"min_lambda": 2.0, "max_lambda": 1.0}, ValueError, r"min_lambda=2\.0 > max_lambda=1\.0"),
        ({"max_lambda": float("inf")}, ValueError, r"max_lambda=inf: expected a finite"),
        ({"verbose": 3}, ValueError, r"verbose=3: expected one of 0, 1, 2"),
        ({"verbose": True}, ValueError, r"verbose=True"),
        ({"mode": "both"}, ValueError, r"mode='both': expected one of 'prox', 'loss'"),
        ({"lambda_rule": "pid"}, ValueError, r"lambda_rule='pid'"),
        (
            {"lambda_rule": "multiplicative"},
            ValueError,
            r"min_lambda=0\.0 with lambda_rule='multiplicative'",
        ),
        ({"zero_tolerance": -1e-9}, ValueError, r"zero_tolerance=-1e-09"),
        (
            {"parameters_to_prune": [(nn.Linear(2, 2), "kernel")]},
            ValueError,
            r"parameters_to_prune\[0\]: Linear has no tensor attribute 'kernel'",
        ),
        ({"parameters_to_prune": []}, ValueError, r"parameters_to_prune=\[\]"),
        ({"parameters_to_prune": [nn.Linear(2, 2)]}, TypeError, r"parameters_to_prune\[0\]=Linear"),
        ({"name": "enc/dec"}, ValueError, r"name='enc/dec': expected None or a non-empty str"),
        ({"name": ""}, ValueError, r"name='': expected None"),
        ({"name": 3}, TypeError, r"name=3: expected None or a str, got int"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_parameter_and_value(
    kwargs: dict, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        BregmanPruner(**kwargs)


# ---------------------------------------------------------------------------- logging
def _records(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("[%(asctime)s] %(message)s")
    return [formatter.format(r) for r in caplog.records if r.name == "dist_bregman"]


def test_verbose_0_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        _fit(tmp_path, BregmanPruner(initial_lambda=0.01, update_frequency=8), max_epochs=1)
    assert _records(caplog) == []


def test_verbose_1_logs_the_seed_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        _fit(
            tmp_path,
            BregmanPruner(initial_lambda=0.01, update_frequency=8, verbose=1),
            max_epochs=2,
        )
    lines = _records(caplog)
    epoch = re.compile(STAMP + r"Epoch (\d+): Sparsity of pruned modules = \d+\.\d{3}%$")
    decision = re.compile(
        STAMP + r"Sparsity \d+\.\d{3}% vs target 80\.0% → Lambda [↗↘→] \d+\.\d{8} → \d+\.\d{8}$"
    )
    step = re.compile(STAMP + r"Step (\d+): Sparsity=\d+\.\d{3}%, lambda=\d+\.\d{4}$")
    assert [int(m.group(1)) for line in lines if (m := epoch.match(line))] == [0, 1]
    assert [int(m.group(1)) for line in lines if (m := step.match(line))] == [8, 16, 24, 32]
    assert sum(bool(decision.match(line)) for line in lines) == 4
    assert len(lines) == 2 + 4 * 2  # nothing else at verbose=1


def test_verbose_2_adds_one_line_per_parameter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        _fit(
            tmp_path,
            BregmanPruner(initial_lambda=0.01, update_frequency=16, verbose=2),
            max_epochs=1,
        )
    per_parameter = [
        line
        for line in _records(caplog)
        if re.search(r"  net\.[02]\.weight: \d+\.\d{3}% zero \(\d+/\d+\)$", line)
    ]
    assert len(per_parameter) == 2 * 2  # epoch start + one update, two weights each


# ---------------------------------------------------------------------------- integration
def test_seed_snippet_in_a_real_trainer_makes_exact_zeros_and_logs_metrics(tmp_path: Path) -> None:
    pruner = BregmanPruner(
        target_sparsity=0.5, initial_lambda=0.02, lambda_update_rate=0.01, update_frequency=4
    )
    model, trainer = _fit(
        tmp_path, pruner, max_epochs=3, logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    truth = measure_sparsity(model)
    assert truth.nonzero < truth.total  # exact zeros, not small numbers
    assert pruner.current_sparsity is not None and 0.0 < pruner.current_sparsity < 1.0
    assert trainer.callback_metrics["bregman/lambda"].item() == pytest.approx(pruner.current_lambda)
    assert trainer.callback_metrics["bregman/sparsity"].item() == pytest.approx(
        pruner.current_sparsity
    )
    # Logged as host tensors: a Python number would become a tensor on the module's device,
    # which on a GPU is a host sync at every step.
    logged = [trainer.callback_metrics[f"bregman/{name}"] for name in ("lambda", "sparsity")]
    assert all(value.device.type == "cpu" and value.dtype == torch.float64 for value in logged)
    assert pruner.current_lambda != 0.02
    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "bregman/lambda" in header and "bregman/sparsity" in header


def test_a_second_fit_measures_the_model_as_it_is_now_and_keeps_lambda(tmp_path: Path) -> None:
    """Surgery between two fits (a layer replaced): the second fit resolves the targets
    afresh, so it measures and shrinks the new layer, and lambda carries over."""
    pruner = BregmanPruner(initial_lambda=0.02, lambda_update_rate=0.01, update_frequency=4)
    model, _ = _fit(tmp_path / "a", pruner, max_epochs=1)
    lambda_after_first = pruner.current_lambda
    model.net[2] = nn.Linear(32, 4)
    trainer = make_trainer(tmp_path / "b", [pruner], max_epochs=1)
    trainer.fit(model, seed_loader())
    assert pruner.controller is not None
    measured = {t.name: t.module for t in pruner.controller.targets}
    assert measured["net.2.weight"] is model.net[2]
    assert pruner.controller.last_update_step == 16  # its own steps, lambda carried over
    assert pruner.current_lambda != lambda_after_first


def test_gradient_accumulation_runs_as_the_larger_batch_would(tmp_path: Path) -> None:
    """accumulate_grad_batches=4 over batches of 16 against batches of 64: the same
    optimizer steps, so the same lambda updates (counted in optimizer steps, not batches)
    and the same weights, one proximal step per optimizer step. A lambda update a batch, or
    a proximal step after every batch, would part them."""
    runs = []
    for batch_size, accumulate in ((64, 1), (16, 4)):
        pruner = BregmanPruner(0.5, 0.05, 0.2, update_frequency=2)
        model, trace = SeedModel(), _Lambdas([pruner])
        model.bregman_pruner = pruner
        trainer = make_trainer(
            tmp_path / str(accumulate), [pruner, trace], 3, accumulate_grad_batches=accumulate
        )
        trainer.fit(model, seed_loader(batch_size=batch_size))
        assert trainer.global_step == 12 and pruner.controller is not None
        after_steps = {step: lam for step, lam in trace.points if step}  # (step 0: mid-way)
        runs.append((model, after_steps, pruner.controller.updates))
    (large, lambdas_large, updates_large), (small, lambdas_small, updates_small) = runs
    assert updates_large == updates_small == 6
    assert len(set(lambdas_large.values())) > 3
    assert lambdas_small == pytest.approx(lambdas_large, rel=1e-5)
    zeros = [int((m.net[0].weight == 0).sum()) for m in (large, small)]
    assert zeros[0] > 0 and abs(zeros[0] - zeros[1]) <= 2
    for a, b in zip(large.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_manual_optimization_with_two_optimizers_runs_as_one_automatic_optimizer(
    tmp_path: Path,
) -> None:
    """Both optimizers get the proximal step after their own ``step()`` and the lambda
    updates follow ``global_step`` (two a batch here, hence update_frequency 4 against 2):
    the weights and lambdas are those of the automatic run with one optimizer. A pruner
    attached to the first optimizer only leaves the head dense."""
    runs = []
    for model, every in ((SeedModel(), 2), (ManualTwoOptimizers(), 4)):
        pruner = BregmanPruner(0.5, 0.05, 0.2, update_frequency=every)
        trace = _Lambdas([pruner])
        model.bregman_pruner = pruner
        make_trainer(tmp_path, [pruner, trace], 3).fit(model, seed_loader())
        assert pruner.controller is not None and pruner.controller.updates == 24
        runs.append((model, [lam for _, lam in trace.points]))
    (automatic, lambdas), (manual, manual_lambdas) = runs
    assert len(set(lambdas)) > 3 and manual_lambdas == pytest.approx(lambdas, rel=1e-6)
    assert int((manual.net[2].weight == 0).sum()) > 0
    for a, b in zip(automatic.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class _ValidatedModel(SeedModel):
    """Reports the regularization term in validation_step, as a user monitoring it would."""

    def __init__(self) -> None:
        super().__init__()
        self.penalties: list[float] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert self.bregman_pruner is not None
        self.penalties.append(float(self.bregman_pruner.get_regularization_loss(self)))


def test_validate_after_fit_regularizes_the_model_it_is_given(tmp_path: Path) -> None:
    """validate(model) keeps the fitted controller; validate(other) measures other's weights
    (not the fitted model's) with the same lambda."""
    pruner = BregmanPruner(initial_lambda=0.02, lambda_update_rate=0.01, update_frequency=4)
    model, trainer = _fit(tmp_path, pruner, max_epochs=1, model=_ValidatedModel())
    fitted, lam = pruner.controller, pruner.current_lambda

    def l1(m: SeedModel) -> float:
        return (m.net[0].weight.abs().sum() + m.net[2].weight.abs().sum()).item()

    trainer.validate(model, seed_loader(n=16))
    assert pruner.controller is fitted
    assert model.penalties == [pytest.approx(lam * l1(model), rel=1e-5)]
    other = _ValidatedModel()
    other.bregman_pruner = pruner
    with torch.no_grad():
        other.net[0].weight.mul_(3.0)
    trainer.validate(other, seed_loader(n=16))
    assert other.penalties == [pytest.approx(lam * l1(other), rel=1e-5)]
    assert l1(other) > 2 * l1(model) and pruner.current_lambda == lam


class _LayersInConfigureModel(SeedModel):
    """Lightning's pattern for large models: the layers are made in configure_model (FSDP2
    and DeepSpeed ZeRO-3 then create them sharded), after the callbacks' setup."""

    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("callback", ["bregman", "safe"])
def test_layers_made_in_configure_model_are_measured_and_pruned(
    callback: str, tmp_path: Path
) -> None:
    """Both callbacks resolved their weights at setup, before configure_model: "found no
    Linear, ConvNd, ... weight" and the fit stopped."""
    model = _LayersInConfigureModel()
    if callback == "bregman":
        pruner: pl.Callback = BregmanPruner(initial_lambda=0.02, update_frequency=4)
        model.bregman_pruner = pruner  # type: ignore[assignment]
    else:
        pruner = SafeModelPruning(amount=0.5)
    make_trainer(tmp_path, [pruner], max_epochs=1).fit(model, seed_loader())
    report = measure_sparsity(model)
    assert set(report.per_parameter) == {"net.0.weight", "net.2.weight"}
    assert report.sparsity >= (0.5 if callback == "safe" else 0.01)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    pruner = BregmanPruner(initial_lambda=0.01, lambda_update_rate=0.1, update_frequency=4)
    _fit(tmp_path, pruner, max_epochs=1)
    state = pruner.state_dict()
    fresh = BregmanPruner(initial_lambda=0.01, lambda_update_rate=0.1, update_frequency=4)
    fresh.load_state_dict(state)
    assert fresh.current_lambda == pruner.current_lambda == state["lambda"]
    assert state["last_update_step"] == 16 and state["sparsity"] == pruner.current_sparsity


@pytest.mark.parametrize("saved_at", ["epoch end", "mid-epoch"])
def test_resume_from_lightning_checkpoint_continues_the_lambda_trajectory(
    tmp_path: Path, saved_at: str
) -> None:
    """Resumed from the end of epoch 2 (step 32), or from step 37 of epoch 3: mid-epoch
    and between two lambda updates (every 5 steps), as a job preempted after an
    ``every_n_train_steps`` checkpoint resumes."""

    def pruner() -> BregmanPruner:
        return BregmanPruner(
            target_sparsity=0.6, initial_lambda=0.02, lambda_update_rate=0.05, update_frequency=5
        )

    class Trace(pl.Callback):
        def __init__(self, target: BregmanPruner) -> None:
            self.target, self.points = target, []

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.points.append(
                (trainer.global_step, self.target.current_lambda, self.target.current_sparsity)
            )

    whole = pruner()
    whole_trace = Trace(whole)
    _fit(tmp_path / "a", whole, max_epochs=4, callbacks=[whole, whole_trace])

    first = pruner()
    mid_epoch = saved_at == "mid-epoch"
    step = 37 if mid_epoch else 32  # 16 steps an epoch
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=step if mid_epoch else None
    )
    model = SeedModel()
    model.bregman_pruner = first
    options = {"enable_checkpointing": True, "max_steps": step}
    loader = seed_loader(resumable=True)  # its position is in the checkpoint
    make_trainer(tmp_path / "b", [first, checkpoint], 4, **options).fit(model, loader)
    resumed = pruner()
    resumed_trace = Trace(resumed)
    model = SeedModel()
    model.bregman_pruner = resumed
    trainer = make_trainer(tmp_path / "c", [resumed, resumed_trace], max_epochs=4)
    loader = seed_loader(resumable=True)
    trainer.fit(model, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed_trace.points[0][0] == step + 1
    expected = [p for p in whole_trace.points if p[0] > step]
    if mid_epoch:  # the resumed run measures as it starts (step 37): until the update at
        # step 40 it reports that, where the uninterrupted run still reports step 35's
        assert [p[:2] for p in resumed_trace.points] == [p[:2] for p in expected]
        expected, resumed_trace.points = expected[2:], resumed_trace.points[2:]
    assert resumed_trace.points == expected
    assert resumed.current_lambda == whole.current_lambda


class _ScaledLayers(SeedModel):
    """The first layer's weight at lambda_scale 0 (optimized, never shrunk), the head's at 1."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        first, head = self.net[0], self.net[2]
        groups = [
            {"params": [first.weight], "lambda_scale": 0.0},
            {"params": [head.weight]},
            {"params": [first.bias, head.bias]},
        ]
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)


def test_a_param_groups_lambda_scale_decides_where_the_zeros_go(tmp_path: Path) -> None:
    """One lambda drives the model to the target; the scale-0 layer keeps every weight, so
    the head alone makes the zeros (128 of 448 weights: 20% is reachable)."""
    pruner = BregmanPruner(
        target_sparsity=0.2, initial_lambda=0.02, lambda_update_rate=0.5, update_frequency=4
    )
    model, _ = _fit(tmp_path, pruner, max_epochs=6, model=_ScaledLayers())
    first, head = model.net[0].weight, model.net[2].weight
    zeros = int((head == 0).sum())
    assert int((first == 0).sum()) == 0 and zeros > 0.6 * head.numel()
    assert pruner.current_sparsity == pytest.approx(zeros / 448)  # measured at the last step
    assert pruner.current_sparsity == pytest.approx(0.2, abs=0.03)


# ---------------------------------------------------------------------------- several pruners
class _TwoPruners(SeedModel):
    """The seed's pattern with two pruners: each adds its own loss term."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer = optimizer
        self.pruners: list[BregmanPruner] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        for pruner in self.pruners:
            loss = loss + pruner.get_regularization_loss(self)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "linbreg":
            return LinBreg(self.parameters(), lr=0.1, lambda_=0.01)
        return super().configure_optimizers()


def _two_pruners(model: _TwoPruners, body: str = "body", head: str = "head") -> list[BregmanPruner]:
    """The first layer to 50% and the last to 90%, on their own lambdas."""
    model.pruners = [
        BregmanPruner(0.5, 0.02, 0.05, 4, [(model.net[0], "weight")], verbose=1, name=body),
        BregmanPruner(0.9, 0.05, 0.2, 4, [(model.net[2], "weight")], verbose=1, name=head),
    ]
    return model.pruners


class _Lambdas(pl.Callback):
    def __init__(self, pruners: list[BregmanPruner]) -> None:
        self.pruners, self.points = pruners, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        lambdas = tuple(pruner.current_lambda for pruner in self.pruners)
        self.points.append((trainer.global_step, *lambdas))


def test_two_named_pruners_keep_their_own_weights_lambda_logs_metrics_and_checkpoint_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _TwoPruners()
    body, head = _two_pruners(model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with caplog.at_level(logging.INFO, logger="dist_bregman"):
        trainer = make_trainer(
            tmp_path, [body, head, checkpoint], max_epochs=2, enable_checkpointing=True
        )
        trainer.fit(model, seed_loader())
    for pruner, weight in ((body, "net.0.weight"), (head, "net.2.weight")):
        assert pruner.controller is not None and pruner.controller.last_report is not None
        assert list(pruner.controller.last_report.per_parameter) == [weight]
        name = pruner.config.name
        assert trainer.callback_metrics[f"bregman/{name}/lambda"] == pytest.approx(
            pruner.current_lambda
        )
    assert body.current_lambda != head.current_lambda
    assert "bregman/lambda" not in trainer.callback_metrics
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert state["BregmanPruner{'name': 'body'}"]["lambda"] == body.current_lambda
    assert state["BregmanPruner{'name': 'head'}"]["lambda"] == head.current_lambda
    lines = _records(caplog)
    assert any("] [body] Sparsity " in line and "target 50.0%" in line for line in lines)
    assert any("] [head] Sparsity " in line and "target 90.0%" in line for line in lines)
    assert all(re.search(STAMP + r"\[(body|head)\] ", line) for line in lines)


def test_two_named_pruners_resume_each_from_its_own_state(tmp_path: Path) -> None:
    whole = _TwoPruners()
    pruners = _two_pruners(whole)
    trace = _Lambdas(pruners)
    make_trainer(tmp_path / "a", [*pruners, trace], max_epochs=4).fit(whole, seed_loader())

    first = _TwoPruners()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [*_two_pruners(first), checkpoint]
    make_trainer(tmp_path / "b", callbacks, 2, enable_checkpointing=True).fit(first, seed_loader())

    resumed = _TwoPruners()
    pruners = _two_pruners(resumed)
    resumed_trace = _Lambdas(pruners)
    trainer = make_trainer(tmp_path / "c", [*pruners, resumed_trace], max_epochs=4)
    trainer.fit(resumed, seed_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed_trace.points[0][0] == 33
    assert resumed_trace.points == [p for p in trace.points if p[0] > 32]


def test_an_unnamed_pruner_keeps_lightnings_default_state_key() -> None:
    # Checkpoints written before names existed store the state under the class name.
    assert BregmanPruner().state_key == "BregmanPruner"
    assert BregmanPruner(name="a").state_key != BregmanPruner(name="b").state_key


def test_a_pruner_used_in_training_step_but_not_given_to_the_trainer_is_refused(
    tmp_path: Path,
) -> None:
    """The seed's pattern with the callback left out of ``Trainer(callbacks=...)``: the
    loss term alone prunes nothing, and the fit trained dense with no error (0 zeros after
    an epoch). Outside a fit the penalty is still given."""
    model = SeedModel()
    model.bregman_pruner = BregmanPruner(0.5, 0.05)
    with pytest.raises(RuntimeError, match=r"not among the Trainer's callbacks.*allowed: pass"):
        make_trainer(tmp_path, [], max_epochs=1).fit(model, seed_loader())
    assert model.bregman_pruner.get_regularization_loss(SeedModel()).item() > 0
    validated = _ValidatedModel()  # reports the penalty in validation_step
    validated.bregman_pruner = BregmanPruner(0.5, 0.05)
    make_trainer(tmp_path, [], max_epochs=1).validate(validated, seed_loader())
    assert len(validated.penalties) == 16 and min(validated.penalties) > 0


def test_a_compiled_training_step_trains_as_eager_without_dynamo_warnings(tmp_path: Path) -> None:
    """The seed's training_step under torch.compile (Dynamo, eager backend: the tracing,
    no code generation): the term is taken eagerly, in a fit (same weights and lambda as
    without compiling) and outside one (a first call builds the controller), with none
    of Dynamo's warnings about what it cannot trace (C++ kernels, cached lookups)."""
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, pruner = SeedModel(), BregmanPruner(0.5, 0.05, update_frequency=4)
        model.bregman_pruner = pruner
        if compiled:
            model.training_step = torch.compile(model.training_step, backend="eager")
        with dynamo_warnings() as warned:
            make_trainer(tmp_path, [pruner], max_epochs=1).fit(model, seed_loader())
            unfitted = BregmanPruner(0.5, 0.05)
            term = torch.compile(unfitted.get_regularization_loss, backend="eager")
            outside = term(SeedModel())
        assert warned == []
        eager = unfitted.get_regularization_loss(SeedModel())
        assert float(outside.detach()) == float(eager.detach()) > 0
        results[compiled] = [p.detach().clone() for p in model.parameters()]
        results[compiled].append(torch.tensor(pruner.current_lambda))
    assert all(map(torch.equal, results[False], results[True]))
    assert float(results[True][-1]) != 0.05  # lambda moved


def test_a_trainer_fitted_with_the_pruner_is_refused_once_the_pruner_is_taken_out(
    tmp_path: Path,
) -> None:
    """What set the pruner up is its Trainer's fit, not the Trainer for good: a later fit
    without the pruner is refused even by the same Trainer object (as a new Trainer at a
    freed one's address would be)."""
    model = SeedModel()
    pruner = BregmanPruner(0.5, 0.05)
    model.bregman_pruner = pruner
    trainer = make_trainer(tmp_path, [pruner], max_epochs=1)
    trainer.fit(model, seed_loader())
    trainer.callbacks.remove(pruner)
    trainer.fit_loop.max_epochs = 2  # one more epoch of training steps
    with pytest.raises(RuntimeError, match=r"not among the Trainer's callbacks"):
        trainer.fit(model, seed_loader())


class _Batched(SeedModel):
    """Its loader reads ``batch_size``, which Lightning's batch size finder scales."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> Any:
        return seed_loader(batch_size=self.batch_size)


def test_the_batch_size_finder_before_fit_leaves_the_fit_as_without_it(tmp_path: Path) -> None:
    """The finder empties ``trainer.callbacks`` for its trial steps, which call the loss
    term: they are not refused (the pruner was given to this Trainer), and the fit that
    follows is the fit at the found batch size without a finder."""

    def run(find: bool, batch_size: int) -> tuple[list[Any], list[torch.Tensor], int]:
        model = _Batched(batch_size)
        pruner = BregmanPruner(0.6, 0.02, 0.05, 5)
        model.bregman_pruner = pruner
        trace = _Lambdas([pruner])
        trainer = make_trainer(tmp_path / str(find), [pruner, trace], max_epochs=2)
        if find:
            Tuner(trainer).scale_batch_size(model, steps_per_trial=2, max_trials=3)
        trainer.fit(model)
        return trace.points, [p.detach().clone() for p in model.parameters()], model.batch_size

    found, weights, batch_size = run(True, 4)
    assert batch_size > 4
    plain, plain_weights, _ = run(False, batch_size)
    assert found == plain and len({lam for _, lam in plain}) > 3
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights, strict=True))


def test_two_pruners_on_one_weight_are_refused_at_fit(tmp_path: Path) -> None:
    model = _TwoPruners()
    model.pruners = [
        BregmanPruner(parameters_to_prune=[(model.net[0], "weight")], name="a"),
        BregmanPruner(name="b"),  # discovers net.0.weight too
    ]
    with pytest.raises(ValueError, match=r"name='b'\) and BregmanPruner\(name='a'\) both measure"):
        make_trainer(tmp_path, model.pruners, max_epochs=1).fit(model, seed_loader())


def test_two_pruners_driving_one_bregman_optimizer_are_refused_at_fit(tmp_path: Path) -> None:
    model = _TwoPruners("linbreg")
    pruners = _two_pruners(model)
    with pytest.raises(ValueError, match=r"both drive one LinBreg, which holds one lambda"):
        make_trainer(tmp_path, pruners, max_epochs=1).fit(model, seed_loader())


# ---------------------------------------------------------------------------- learning-rate finder
class _LinBregModel(SeedModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return LinBreg(self.parameters(), lr=self.lr, lambda_=0.01)


@pytest.mark.parametrize(
    ("how", "model_class"), [("tuner", SeedModel), ("callback", _LinBregModel)]
)
def test_lr_find_before_fit_leaves_the_fit_as_without_it(
    tmp_path: Path, how: str, model_class: type[SeedModel]
) -> None:
    """Lightning's learning-rate finder trains a few trial steps and restores the weights,
    optimizer and callback states from a checkpoint it took before them; the fit that
    follows (``Tuner.lr_find`` then ``fit``, or a ``LearningRateFinder`` callback at the
    start of ``fit``) must be the fit at that learning rate without a finder: the same
    lambda at every step, the same final sparsity and weights."""

    def run(find: bool, lr: float) -> tuple[list[Any], dict[str, torch.Tensor], float]:
        model = model_class(lr=lr)
        pruner = BregmanPruner(0.6, 0.02, 0.05, 5)
        model.bregman_pruner = pruner
        trace = _Lambdas([pruner])
        callbacks: list[pl.Callback] = [pruner, trace]
        if find and how == "callback":
            # After the pruner: its on_fit_start has attached to the optimizer when the
            # finder's trial steps run (the Tuner puts its finder first).
            callbacks.append(LearningRateFinder(min_lr=1e-3, max_lr=0.5, num_training_steps=24))
        trainer = make_trainer(tmp_path / str(find), callbacks, max_epochs=2)
        if find and how == "tuner":
            Tuner(trainer).lr_find(model, seed_loader(), min_lr=1e-3, max_lr=0.5, num_training=24)
            assert pruner.current_lambda == 0.02 and pruner.controller is not None
            assert pruner.controller.updates == 0
        trainer.fit(model, seed_loader())
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        return [*trace.points, pruner.current_sparsity], weights, model.lr

    found, weights, lr = run(True, 0.1)
    assert lr != 0.1  # the finder set it
    plain, plain_weights, _ = run(False, lr)
    assert found == plain
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)
