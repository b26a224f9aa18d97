"""Reliability (one process): bad input fails before training naming the setting, its value
and what is allowed; bad numbers never reach lambda or a checkpoint; resume is exact."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from dist_bregman import BregmanPruner, SafeModelPruning, SparsityController, measure_sparsity
from dist_bregman.cli import main
from dist_bregman.config import BregmanConfig
from dist_bregman.errors import NonFiniteError
from dist_bregman.optim import AdaBreg, LinBreg, ProxSGD
from dist_bregman.strategies import check_cpu_precision
from tests.helpers.lightning import SeedModel, make_trainer, seed_loader

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _attach(model: nn.Module, params: list[torch.Tensor], **config: Any) -> None:
    controller = SparsityController(model, BregmanConfig(**config))
    controller.attach(torch.optim.SGD(params, lr=0.1))


def _frozen_target() -> None:
    model = _net()
    model[0].weight.requires_grad_(False)
    _attach(model, [model[2].weight], target_sparsity=0.9, initial_lambda=1e-3)


def _deepspeed_json(name: str) -> dict[str, Any]:
    config = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
    return {**config, "fp16": {"enabled": True}}


NET = _net()
# (what is called, the exception, what the message must say: setting=value and what is allowed)
BAD_INPUT: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "target > 1",
        lambda: BregmanPruner(target_sparsity=1.5),
        ValueError,
        r"target_sparsity=1\.5: expected a number in \[0\.0, 1\.0\]",
    ),
    (
        "target NaN",
        lambda: BregmanPruner(target_sparsity=math.nan),
        ValueError,
        r"target_sparsity=nan: expected a finite number",
    ),
    (
        "target as text",
        lambda: BregmanPruner(target_sparsity="0.9"),
        TypeError,  # type: ignore[arg-type]
        r"target_sparsity='0\.9': expected a real number, got str",
    ),
    (
        "lambda infinite",
        lambda: BregmanPruner(initial_lambda=math.inf),
        ValueError,
        r"initial_lambda=inf: expected a finite number",
    ),
    (
        "update_frequency 0",
        lambda: BregmanPruner(update_frequency=0),
        ValueError,
        r"update_frequency=0: expected an integer >= 1",
    ),
    (
        "update_frequency float",
        lambda: BregmanPruner(update_frequency=2.5),
        TypeError,  # type: ignore[arg-type]
        r"update_frequency=2\.5: expected an integer",
    ),
    (
        "negative rate",
        lambda: BregmanPruner(lambda_update_rate=-1.0),
        ValueError,
        r"lambda_update_rate=-1\.0: expected a number >= 0\.0",
    ),
    (
        "min > max",
        lambda: BregmanPruner(min_lambda=2.0, max_lambda=1.0),
        ValueError,
        r"min_lambda=2\.0 > max_lambda=1\.0: expected min_lambda <= max_lambda",
    ),
    (
        "unknown mode",
        lambda: BregmanPruner(mode="proximal"),
        ValueError,  # type: ignore[arg-type]
        r"mode='proximal': expected one of 'prox', 'loss'",
    ),
    (
        "verbose 3",
        lambda: BregmanPruner(verbose=3),
        ValueError,
        r"verbose=3: expected one of 0, 1, 2",
    ),
    (
        "on_nonfinite",
        lambda: BregmanPruner(on_nonfinite="ignore"),
        ValueError,  # type: ignore[arg-type]
        r"on_nonfinite='ignore': expected one of 'skip', 'stop'",
    ),
    (
        "agreement period",
        lambda: BregmanPruner(check_agreement_every=-1),
        ValueError,
        r"check_agreement_every=-1: expected an integer >= 0",
    ),
    (
        "freeze step",
        lambda: BregmanPruner(freeze_support_at=-5),
        ValueError,
        r"freeze_support_at=-5: expected an integer >= 0",
    ),
    (
        "freeze hold",
        lambda: BregmanPruner(freeze_hold="rows"),
        ValueError,
        r"freeze_hold='rows': expected one of 'target', 'found'",
    ),
    (
        "warm-up after the freeze",
        lambda: BregmanPruner(freeze_support_at=50, magnitude_start_at=50),
        ValueError,
        r"magnitude_start_at=50 with freeze_support_at=50: expected magnitude_start_at < "
        r"freeze_support_at",
    ),
    (
        "unknown parameter name",
        lambda: BregmanPruner(parameters_to_prune=[(NET[0], "wieght")]),
        ValueError,
        r"parameters_to_prune\[0\]: Linear has no tensor attribute 'wieght'; allowed",
    ),
    (
        "duplicated pair",
        lambda: BregmanPruner(parameters_to_prune=[(NET[0], "weight"), (NET[0], "weight")]),
        ValueError,
        r"parameters_to_prune\[1\]: \(Linear, 'weight'\) is listed twice",
    ),
    (
        "empty parameter set",
        lambda: BregmanPruner(parameters_to_prune=[]),
        ValueError,
        r"parameters_to_prune=\[\]: expected at least one",
    ),
    (
        "not a module",
        lambda: BregmanPruner(parameters_to_prune=[("fc1", "weight")]),
        TypeError,
        r"parameters_to_prune\[0\]: module=str: expected a torch\.nn\.Module",
    ),
    (
        "not in the optimizer",
        lambda: _attach(NET, [NET[0].weight], initial_lambda=1e-3),
        ValueError,
        r"parameters_to_prune: \['2\.weight'\] are trainable but no optimizer holds",
    ),
    (
        "infeasible target",
        _frozen_target,
        ValueError,
        r"target_sparsity=0\.9 is unreachable: 0\.weight .* allowed: target_sparsity <= ",
    ),
    (
        "measure tolerance",
        lambda: measure_sparsity(NET, zero_tolerance=-1.0),
        ValueError,
        r"zero_tolerance=-1\.0: expected a number >= 0",
    ),
    (
        "pruning amount",
        lambda: SafeModelPruning(amount=1.2),
        ValueError,
        r"amount=1\.2: expected a number in \[0\.0, 1\.0\]",
    ),
    (
        "pruning ramp",
        lambda: SafeModelPruning(epochs_to_ramp=-1),
        ValueError,
        r"epochs_to_ramp=-1: expected an integer >= 0",
    ),
    (
        "LinBreg lr",
        lambda: LinBreg(NET.parameters(), lr=-0.1),
        ValueError,
        r"lr=-0\.1: expected a number >= 0\.0",
    ),
    ("LinBreg regularizer", lambda: LinBreg(NET.parameters(), reg="l3"), ValueError, r"reg='l3'"),
    (
        "AdaBreg betas",
        lambda: AdaBreg(NET.parameters(), betas=(1.0, 0.9)),
        ValueError,
        r"betas\[0\]=1\.0: expected a number in \[0, 1\)",
    ),
    (
        "ProxSGD momentum",
        lambda: ProxSGD(NET.parameters(), momentum=1.0),
        ValueError,
        r"momentum=1\.0: expected a number in \[0, 1\)",
    ),
    (
        "DeepSpeed fp16 on CPU",
        lambda: check_cpu_precision(_deepspeed_json("zero2_fp32.json"), "32-true"),
        ValueError,
        r"fp16\.enabled=True on CPU: .* allowed: bf16\.enabled=true",
    ),
    (
        "Trainer fp16 with DeepSpeed on CPU",
        lambda: check_cpu_precision({}, "16-mixed"),
        ValueError,
        r"precision='16-mixed' .* allowed: 'bf16-mixed'",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_fails_at_construction_with_setting_value_and_allowed(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def _cli_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``dist-bregman fit --config config`` in this process (the entry point's own
    subprocess test is in test_cli.py); it must fail. Returns what it printed and raised."""
    argv = patch.object(sys, "argv", ["dist-bregman"])  # not pytest's own arguments
    with argv, pytest.raises((SystemExit, ValueError)) as failure:
        main(["fit", "--config", str(config)])
    if isinstance(failure.value, SystemExit):
        assert failure.value.code != 0
    printed = capsys.readouterr()
    return f"{printed.out}{printed.err}{failure.value}"


@pytest.mark.timeout(120)
def test_yaml_with_an_unknown_key_and_a_bad_value_fail_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = (ROOT / "configs" / "digits.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(config.replace("max_epochs: 60", "max_epoch: 60"))
    output = _cli_fails(typo, capsys)
    assert "max_epoch" in output
    assert "Epoch 0" not in output  # nothing trained
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.replace("update_frequency: 10", "update_frequency: 0"))
    output = _cli_fails(bad, capsys)
    assert "update_frequency=0: expected an integer >= 1" in output
    assert "Epoch 0" not in output


def test_yaml_is_read_with_a_safe_loader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(
        (ROOT / "configs" / "digits.yaml").read_text()
        + f"\nextra: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert "could not determine a constructor" in _cli_fails(evil, capsys)
    assert not marker.exists()


# ---------------------------------------------------------------------------- bad numbers
def test_kernel_and_torch_paths_count_nan_and_inf_weights() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([math.nan, -math.inf])
        model[2].weight[1, 1] = math.inf
    assert measure_sparsity(model).nonfinite == 3  # contiguous: the one-pass kernel
    strided = nn.Linear(8, 4)
    with torch.no_grad():
        strided.weight = nn.Parameter(torch.randn(8, 4).t())  # not contiguous: torch ops
        strided.weight[0, 0] = math.nan
    assert measure_sparsity(strided).nonfinite == 1


def test_unguarded_nan_stops_with_the_step_and_rank_and_lambda_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pruner = BregmanPruner(initial_lambda=0.01, lambda_update_rate=0.5, update_frequency=4)
    model = SeedModel(nan_at_step=5)
    model.bregman_pruner = pruner
    trainer = make_trainer(tmp_path, [pruner], max_epochs=1)
    with caplog.at_level(logging.WARNING, logger="dist_bregman"), pytest.raises(NonFiniteError):
        trainer.fit(model, seed_loader())
    assert "Step 8:" in caplog.text and "rank(s) [0]" in caplog.text
    assert pruner.current_lambda == pruner.controller.lambda_  # type: ignore[union-attr]
    assert math.isfinite(pruner.current_lambda)
    # A checkpoint of the corrupt weights is refused, not written; weights-only too (there
    # Lightning calls no callback's on_save_checkpoint).
    for weights_only in (False, True):
        with pytest.raises(NonFiniteError, match="refusing to save a checkpoint"):
            trainer.save_checkpoint(tmp_path / "bad.ckpt", weights_only=weights_only)
        assert not (tmp_path / "bad.ckpt").exists()


def test_a_weights_only_model_checkpoint_refuses_nan_weights_between_measurements(
    tmp_path: Path,
) -> None:
    """ModelCheckpoint(save_weights_only=True) saving every step: the NaN loss of step 5
    makes the weights NaN; the next measurement is at step 8, the next save at step 6."""
    pruner = BregmanPruner(initial_lambda=0.01, lambda_update_rate=0.5, update_frequency=4)
    model = SeedModel(nan_at_step=5)
    model.bregman_pruner = pruner
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_weights_only=True, every_n_train_steps=1, save_top_k=-1
    )
    trainer = make_trainer(tmp_path, [pruner, checkpoint], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint"):
        trainer.fit(model, seed_loader())
    assert trainer.global_step == 6
    saved = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert saved == [f"epoch=0-step={step}.ckpt" for step in range(1, 6)]


def _guarded_fit(tmp_path: Path, on_nonfinite: str) -> tuple[BregmanPruner, SeedModel, Any]:
    pruner = BregmanPruner(
        initial_lambda=0.01,
        lambda_update_rate=0.5,
        update_frequency=4,
        guard_steps=True,
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
    )
    model = SeedModel(nan_at_step=5)
    model.bregman_pruner = pruner
    trainer = make_trainer(tmp_path, [pruner], max_epochs=2)
    trainer.fit(model, seed_loader())
    return pruner, model, trainer


def test_guarded_nan_step_is_skipped_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        pruner, model, trainer = _guarded_fit(tmp_path, "skip")
    controller = pruner.controller
    assert controller is not None and controller.skipped_steps == 1
    assert "Step 6: non-finite gradient on rank(s) [0]: optimizer step dropped" in caplog.text
    assert "Step 8: lambda update skipped: non-finite loss on rank(s) [0]" in caplog.text
    assert trainer.global_step == 32  # every batch ran; the bad one changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(pruner.current_lambda)


def test_guarded_nan_with_stop_saves_a_clean_checkpoint_and_stops(tmp_path: Path) -> None:
    pruner, _, trainer = _guarded_fit(tmp_path, "stop")
    assert trainer.global_step == 6 and trainer.should_stop
    saved = torch.load(tmp_path / "bregman-stop-step6.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    state = next(v for k, v in saved["callbacks"].items() if "BregmanPruner" in k)
    assert state["lambda"] == pruner.current_lambda and state["last_update_step"] == 4


def test_guard_leaves_grad_scaler_overflow_to_the_scaler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """precision="16-mixed": a scale too large overflows the fp16 gradients on the first
    steps; the GradScaler drops those steps and halves its scale. That is calibration, not
    bad data: the guard must neither count it nor stop the run (it stopped at step 1)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    pruner = BregmanPruner(
        initial_lambda=0.01, update_frequency=4, guard_steps=True, on_nonfinite="stop"
    )
    model = SeedModel()
    model.bregman_pruner = pruner
    before = [p.detach().clone() for p in model.parameters()]
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    trainer = make_trainer(tmp_path, [pruner], max_epochs=2, plugins=[plugin])
    with caplog.at_level(logging.WARNING, logger="dist_bregman"):
        trainer.fit(model, seed_loader())
    assert scaler.get_scale() <= 2.0**20  # the scaler met overflow and lowered its scale...
    assert not trainer.should_stop and trainer.global_step == 32  # ...and the run went on
    assert pruner.controller is not None and pruner.controller.skipped_steps == 0
    assert "non-finite gradient" not in caplog.text
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- exact resume
class BregmanSeedModel(SeedModel):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "linbreg":
            return LinBreg(self.parameters(), lr=0.05, momentum=0.9, lambda_=0.05)
        if self.optimizer_name == "adabreg":
            return AdaBreg(self.parameters(), lr=0.01, lambda_=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Trace(pl.Callback):
    def __init__(self, pruner: BregmanPruner) -> None:
        self.pruner, self.points = pruner, []

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        report = self.pruner.controller.last_report  # type: ignore[union-attr]
        counts = None if report is None else (report.nonzero, report.total)
        self.points.append((trainer.global_step, self.pruner.current_lambda, counts))


@pytest.mark.parametrize("freeze", [0, 20], ids=["shrinking", "frozen_at_20"])
@pytest.mark.parametrize("optimizer", ["prox-sgd", "linbreg", "adabreg"])
def test_resume_gives_the_uninterrupted_trajectory(
    tmp_path: Path, optimizer: str, freeze: int
) -> None:
    def run(folder: str, epochs: int, ckpt: Path | None = None, save: bool = False) -> Any:
        pruner = BregmanPruner(
            target_sparsity=0.6,
            initial_lambda=0.05,
            lambda_update_rate=0.5,
            lambda_rule="multiplicative",
            min_lambda=1e-5,
            max_lambda=1.0,
            update_frequency=5,
            freeze_support_at=freeze,  # 20: the checkpoint (step 32) holds a frozen support
        )
        trace = Trace(pruner)
        model = BregmanSeedModel(optimizer)
        model.bregman_pruner = pruner
        callbacks: list[pl.Callback] = [pruner, trace]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer = make_trainer(
            tmp_path / folder, callbacks, max_epochs=epochs, enable_checkpointing=save
        )
        trainer.fit(model, seed_loader(), ckpt_path=ckpt)
        return trace.points, model, trainer

    whole, whole_model, whole_trainer = run("a", 4)
    run("b", 2, save=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain data only
    if optimizer != "prox-sgd":
        assert "v" in saved["optimizer_states"][0]["state"][0]
    state = next(v for k, v in saved["callbacks"].items() if "BregmanPruner" in k)
    assert state["frozen"] is bool(freeze)
    resumed, model, trainer = run("c", 4, ckpt=tmp_path / "ckpt" / "last.ckpt")
    assert resumed[0][0] == 33
    assert [p[:2] for p in resumed] == [p[:2] for p in whole if p[0] > 32]  # lambda: exact
    assert [p[2] for p in resumed[4:]] == [p[2] for p in whole if p[0] > 36]  # counts: exact
    for a, b in zip(model.parameters(), whole_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    moments = trainer.optimizers[0].state_dict()["state"]
    expected = whole_trainer.optimizers[0].state_dict()["state"]
    for key, value in expected.items():
        for name, tensor in value.items():
            if isinstance(tensor, torch.Tensor):
                torch.testing.assert_close(moments[key][name], tensor)
