"""The main job: ``dist-bregman fit`` (``--config configs/digits.yaml``), for real."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment

from dist_bregman import BregmanPruner
from dist_bregman.callbacks.averaging import _avg_fn
from dist_bregman.cli import DEFAULT_JOB, BregmanCLI, main, with_default_job
from dist_bregman.export import load_sparse
from dist_bregman.strategies import DeepSpeedLauncherEnvironment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("config", "tolerance"),
    [("digits", 0.02), ("digits_linbreg", 0.01), ("digits_group", 0.03)],
)
def test_shipped_jobs_reach_their_target_and_write_the_report(
    config: str,
    tolerance: float,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default job runs as ``dist-bregman fit`` (no config), from any directory."""
    monkeypatch.chdir(tmp_path)
    chosen = [] if config == "digits" else ["--config", str(ROOT / "configs" / f"{config}.yaml")]
    main(
        [
            "fit",
            *chosen,
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    folder = tmp_path / config / "version_0"
    summary = json.loads((folder / "summary.json").read_text())
    assert abs(summary["final_sparsity"] - summary["target_sparsity"]) <= tolerance
    if config != "digits_group":  # freeze_support_at holds exactly the target (the default
        # job overshoots at its freeze: freed zeros of dead units are swapped for held ones)
        zeros = summary["total"] - summary["nonzero"]
        assert zeros == round(summary["target_sparsity"] * summary["total"])
    assert summary["test_accuracy"] >= 0.93
    assert summary["total"] == 64 * 256 + 256 * 128 + 128 * 10
    assert (folder / "sparsity_lambda.png").stat().st_size > 10_000
    assert summary["export_sparse_bytes"] < summary["export_dense_bytes"]
    assert (folder / "model_sparse.report.md").exists()
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "bregman/sparsity" in header and "bregman/lambda" in header
    printed = capsys.readouterr().out
    assert "== dist-bregman summary == test accuracy" in printed
    assert f"final lambda {summary['final_lambda']:.8f}" in printed
    if config == "digits_linbreg":  # dense for one epoch (40 steps), then the cut
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        logged = [
            (int(r["step"]), float(r["bregman/sparsity"])) for r in rows if r["bregman/sparsity"]
        ]
        assert all(sparsity == 0.0 for step, sparsity in logged if step < 39)
        assert min(sparsity for step, sparsity in logged if step == 39) >= 0.9
    if config == "digits_group":  # whole hidden neurons removed, the 10 classes kept
        assert summary["rows"] == 256 + 128 + 10
        assert summary["zero_rows"] >= 0.6 * (256 + 128)
        assert "bregman/node_sparsity" in header


def test_without_a_config_or_model_a_subcommand_gets_the_default_job() -> None:
    job = ["--config", str(DEFAULT_JOB)]
    assert with_default_job(["fit"]) == ["fit", *job]
    assert with_default_job(["test", "--ckpt_path=x"]) == ["test", *job, "--ckpt_path=x"]
    for named in (["-c", "a.yaml"], ["--config=a.yaml"], ["--model", "M"], ["--model.lr=1"]):
        assert with_default_job(["fit", *named]) == ["fit", *named]
    assert with_default_job(["--help"]) == ["--help"] and with_default_job([]) == []
    # One file: the repository's configs/digits.yaml is the one the package ships.
    assert (ROOT / "configs" / "digits.yaml").samefile(DEFAULT_JOB)
    # The wheel ships it: tests/test_packaging.py.


@pytest.mark.timeout(120)
def test_a_job_with_safe_model_pruning_alone_reports_and_exports_its_sparsity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["trainer"] |= {"max_epochs": 4, "enable_progress_bar": False}
    config["trainer"]["logger"]["init_args"] |= {"save_dir": str(tmp_path), "name": "gmp"}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "dist_bregman.SafeModelPruning",
            "init_args": {
                "amount": 0.5,
                "scheduled_pruning": True,
                "final_amount": 0.8,
                "epochs_to_ramp": 3,
            },
        }
    ]
    path = tmp_path / "gmp.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    folder = tmp_path / "gmp" / "version_0"
    summary = json.loads((folder / "summary.json").read_text())
    total = 64 * 256 + 256 * 128 + 128 * 10
    assert summary["total"] == total and summary["target_sparsity"] == 0.8
    assert summary["final_sparsity"] == pytest.approx(0.8, abs=1 / total)
    assert "final_lambda" not in summary  # no BregmanPruner, no lambda
    weights = load_sparse(folder / "model_sparse.safetensors")
    zeros = sum(int((weights[f"net.{i}.weight"] == 0).sum()) for i in (0, 2, 4))
    assert zeros == total - summary["nonzero"]
    assert summary["export_sparse_bytes"] < summary["export_dense_bytes"]
    printed = capsys.readouterr().out
    assert f"final sparsity {100 * summary['final_sparsity']:.3f}% (target 80.0%)" in printed


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "init_args", "rule"),
    [
        ("SparseWeightAveraging", {"decay": 0.99, "update_starting_at_step": 100}, "decay=0.99"),
        ("SparseStochasticWeightAveraging", {"swa_lrs": 0.01, "swa_epoch_start": 3}, ""),
    ],
)
def test_a_yaml_job_averages_its_weights_and_hands_back_a_sparse_model(
    tmp_path: Path, name: str, init_args: dict[str, object], rule: str
) -> None:
    """Lightning's averaging callbacks take their rule as an object jsonargparse cannot build
    from YAML, and the pruners refuse an average without KeepSupport: these are what a
    config file can give."""
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    config["trainer"] |= {"max_epochs": 6, "enable_progress_bar": False}
    config["trainer"]["logger"]["init_args"] |= {"save_dir": str(tmp_path), "name": "avg"}
    del config["trainer"]["callbacks"][0]["init_args"]["freeze_support_at"]
    config["trainer"]["callbacks"].append(
        {"class_path": f"dist_bregman.{name}", "init_args": init_args}
    )
    path = tmp_path / "avg.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = BregmanCLI(args=["--config", str(path)], run=False).trainer
    averaging = [c for c in trainer.callbacks if type(c).__name__ == name]  # type: ignore[attr-defined]
    assert len(averaging) == 1
    assert repr(_avg_fn(averaging[0])) == f"KeepSupport({rule})"
    main(["fit", "--config", str(path)])
    folder = tmp_path / "avg" / "version_0"
    summary = json.loads((folder / "summary.json").read_text())
    total = 64 * 256 + 256 * 128 + 128 * 10
    assert summary["final_sparsity"] > 0.5
    weights = load_sparse(folder / "model_sparse.safetensors")  # the average, handed back
    zeros = sum(int((weights[f"net.{i}.weight"] == 0).sum()) for i in (0, 2, 4))
    assert zeros == total - summary["nonzero"]


@pytest.mark.timeout(200)
def test_the_default_job_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    """The training loader draws each epoch's order from the global RNG, which Lightning's
    checkpoints do not keep: resumed after 2 of 3 epochs, the job ended at 53.040% sparsity
    against 49.574%. The datamodule carries the RNG in its state now."""

    def run(folder: str, epochs: int, *extra: str) -> dict[str, object]:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "digits.yaml"),
                f"--trainer.max_epochs={epochs}",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path / folder}",
                *extra,
            ]
        )
        return json.loads((tmp_path / folder / "digits" / "version_0" / "summary.json").read_text())

    run("first", 2, "--trainer.enable_checkpointing=true")
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    resumed = run("resumed", 3, f"--ckpt_path={checkpoint}")
    whole = run("whole", 3)
    assert whole["global_step"] == 120
    assert resumed == whole  # sparsity, nonzeros, lambda, accuracy, steps, export sizes


@pytest.mark.timeout(60)
def test_python_dash_m_entry_point_and_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done, patch.object(sys, "argv", ["dist-bregman"]):
        main(["fit", "--help"])
    assert done.value.code == 0 and "--config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done, patch.object(sys, "argv", ["dist-bregman"]):
        main(["--help"])  # says what the command does, and that it has a default job
    words = " ".join(capsys.readouterr().out.split())  # whatever width argparse wraps to
    assert done.value.code == 0 and "runs the default job" in words
    # The module entry point itself, in a process of its own, failing on a bad setting.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_bregman",
            "fit",
            "--config",
            str(ROOT / "configs" / "digits.yaml"),
            "--trainer.callbacks.init_args.target_sparsity",
            "1.5",
            "--trainer.max_epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert bad.returncode != 0
    assert "target_sparsity=1.5" in bad.stderr
    # The command line reaches LightningCLI as args (the default job put in), which it
    # warned about at the top of every run unless the CLI parses them itself.
    assert "args parameter" not in bad.stderr


LAUNCHER_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "LOCAL_RANK": "0"}


def _trainer_under_the_deepspeed_launcher(
    monkeypatch: pytest.MonkeyPatch, folder: Path, env: dict[str, str], *args: str
) -> pl.Trainer:
    for key, value in (LAUNCHER_ENV | env).items():
        monkeypatch.setenv(key, value)
    config = str(ROOT / "configs" / "digits_zero1.yaml")
    root = f"--trainer.default_root_dir={folder}"
    return BregmanCLI(args=["--config", config, root, *args], run=False).trainer


def test_under_the_deepspeed_launcher_the_trainer_takes_its_ranks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The launcher's node rank is CROSS_RANK, which Lightning does not read: every node
    took itself for node 0. The CLI builds the Trainer with the launcher's ranks."""
    env = {"CROSS_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    trainer = _trainer_under_the_deepspeed_launcher(
        monkeypatch, tmp_path, env, "--trainer.devices=2", "--trainer.num_nodes=2"
    )
    environment = trainer.strategy.cluster_environment  # type: ignore[attr-defined]
    assert isinstance(environment, DeepSpeedLauncherEnvironment)
    assert (trainer.node_rank, trainer.global_rank, trainer.local_rank) == (1, 3, 1)
    assert trainer.world_size == 4
    # Lightning's own rule (node rank from NODE_RANK/GROUP_RANK) would say node 0, rank 1.
    # At fit, before any process group: a Trainer that disagrees with the launcher's world.
    trainer = _trainer_under_the_deepspeed_launcher(
        monkeypatch, tmp_path, env, "--trainer.devices=2"
    )
    with pytest.raises(
        ValueError,
        match=r"devices=2 x num_nodes=1 = 2 processes, but the "
        r"deepspeed launcher started WORLD_SIZE=4",
    ):
        trainer.strategy.launcher.launch(lambda: None)  # type: ignore[attr-defined]
    # A cluster environment the config names is the user's choice, kept.
    named = "--trainer.plugins=lightning.fabric.plugins.environments.LightningEnvironment"
    trainer = _trainer_under_the_deepspeed_launcher(monkeypatch, tmp_path, env, named)
    assert type(trainer.strategy.cluster_environment) is LightningEnvironment  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.stem
)
def test_every_shipped_config_builds_its_trainer(config: Path, tmp_path: Path) -> None:
    """Model, data, callbacks and strategy, as written (configs/digits_fsdp.yaml failed to
    parse: use_orig_params is no init argument of FSDPStrategy). FSDP1 runs on GPUs only:
    on CPU the config must get as far as Lightning's own refusal."""
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    strategy = yaml.safe_load(config.read_text())["trainer"].get("strategy")
    fsdp1 = isinstance(strategy, dict) and strategy["class_path"].endswith(".FSDPStrategy")
    if fsdp1 and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="strategy `fsdp` requires a GPU accelerator"):
            BregmanCLI(args=[*args, "--trainer.accelerator=cpu"], run=False)
        return
    trainer = BregmanCLI(args=args, run=False).trainer
    assert any(isinstance(c, BregmanPruner) for c in trainer.callbacks)  # type: ignore[attr-defined]
    if isinstance(strategy, dict):
        assert type(trainer.strategy).__name__ == strategy["class_path"].rsplit(".", 1)[1]
