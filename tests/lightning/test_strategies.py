"""Lightning strategies on CPU, one after another in one 2-process launch: DDP (also with
torch's ZeroRedundancyOptimizer), FSDP2 (ModelParallelStrategy), DeepSpeed ZeRO-1/2/3
(dist_bregman.strategies.DeepSpeedStrategy)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dist import child_env
from tests.helpers.ports import free_port
from tests.helpers.strategies import steps_apart

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"


def run_script(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=ROOT,
        env=child_env() | {"MASTER_PORT": str(free_port())},  # Lightning launches the ranks
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


RUNS = (
    ("ddp", "sgd", "SGD"),
    ("ddp_zero", "linbreg", "ZeroRedundancyOptimizer"),
    ("fsdp2", "sgd", "SGD"),
    ("fsdp2", "linbreg", "LinBreg"),
    ("zero1", "sgd", "DeepSpeedZeroOptimizer"),
    ("zero2", "linbreg", "DeepSpeedZeroOptimizer"),
    ("zero3", "sgd", "DeepSpeedZeroOptimizer_Stage3"),
)


@pytest.fixture(scope="session")
def strategy_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All seven fits in one 2-process launch (~25 s of start-up each when launched apart;
    checked to give the same pickles either way). Its tests share an xdist group, so one
    worker runs them all and launches once; session-scoped, since a module-scoped fixture
    is torn down and launched again whenever the worker comes back to the module."""
    out = tmp_path_factory.mktemp("strategies")
    runs = [f"{strategy}:{optimizer}" for strategy, optimizer, _ in RUNS]
    run_script("lightning_strategy.py", "--runs", *runs, "--out", str(out))
    return out


@pytest.mark.timeout(300)  # covers the shared launch, paid by whichever test runs first
@pytest.mark.xdist_group("strategy_results")  # on one worker: the launch happens once
@pytest.mark.parametrize(("strategy", "optimizer", "wrapper"), RUNS)
def test_every_rank_sees_the_same_numbers_and_the_zeros_are_in_the_weights(
    strategy: str, optimizer: str, wrapper: str, strategy_results: Path
) -> None:
    out = strategy_results / f"{strategy}-{optimizer}.pkl"
    ranks = pickle.loads(out.read_bytes())
    first = ranks[0]
    assert len(ranks) == 2 and first["optimizer"] == wrapper
    for rank in ranks:
        assert (rank["points"], rank["report"], rank["lambda"]) == (
            first["points"],
            first["report"],
            first["lambda"],
        )
        assert {k.removeprefix("net."): v for k, v in rank["report"].per_parameter.items()} == rank[
            "gathered"
        ]
    nonzeros = [nonzero for _, nonzero, _ in first["points"]]
    assert len(nonzeros) == 4 and nonzeros[-1] < nonzeros[0]  # 16 steps, new zeros that stuck


@pytest.mark.timeout(300)
def test_lightning_model_pruning_lets_ranks_drift_ours_keeps_them_identical(tmp_path: Path) -> None:
    run_script(
        "model_pruning_drift.py", "--pruners", "lightning", "bregman", "--out", str(tmp_path)
    )
    results = {
        name: json.loads((tmp_path / f"{name}.json").read_text())
        for name in ("lightning", "bregman")
    }
    lightning, ours = results["lightning"], results["bregman"]
    # Same setting: ranks built their models from different seeds; DDP broadcasts rank 0's
    # weights when it wraps. Lightning's lottery-ticket copy was taken before that.
    assert lightning["weights"][0] != lightning["weights"][1]
    assert ours["weights"][0] == ours["weights"][1]
    assert ours["sparsity"][0] == ours["sparsity"][1] > 0.0


RESUMES = ("ddp_zero:linbreg", "fsdp2:linbreg", "zero2:linbreg", "zero3:sgd")


@pytest.mark.timeout(300)
def test_a_run_resumed_from_the_strategys_checkpoint_follows_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """Each strategy's own checkpoint (ZeroRedundancyOptimizer: the state Lightning
    consolidates on rank 0; FSDP2: a distributed checkpoint; DeepSpeed: its per-rank
    files), 2 of 4 epochs, resumed: the lambda updates and counts after it are those of
    the run that was never stopped. (FSDP2 with LinBreg failed to load: its ``v``
    was saved as a replica, one rank's for both.)"""
    run_script("lightning_strategy.py", "--resume", "--runs", *RESUMES, "--out", str(tmp_path))
    for run in RESUMES:
        (whole, whole_report), (resumed, resumed_report) = pickle.loads(
            (tmp_path / f"{run.replace(':', '-')}-resume.pkl").read_bytes()
        )
        assert [point[0] for point in resumed] == [20, 24, 28, 32], run
        assert resumed == [point for point in whole if point[0] > 16], run
        assert resumed_report == whole_report, run


LATE = ("ddp", "fsdp2", "zero2", "zero3")


@pytest.mark.timeout(300)
def test_layers_made_in_configure_model_are_measured_alike_under_every_strategy(
    tmp_path: Path,
) -> None:
    """Lightning's pattern for large models makes the layers in configure_model, after the
    callbacks' setup (ZeRO-3 under zero.Init, partitioned from the start; FSDP2 sharded
    there). Both callbacks resolved their weights at setup and stopped the fit ("found no
    Linear ... weight"). Now every rank measures what the gathered weights hold, and every
    strategy ends where DDP does."""
    run_script("lightning_late_layers.py", "--strategies", *LATE, "--out", str(tmp_path))
    results = {name: pickle.loads((tmp_path / f"{name}.pkl").read_bytes()) for name in LATE}
    alike = ("points", "report", "lambda", "gathered")  # not the optimizer's wrapper

    def seen(record: dict) -> dict:
        return {key: record[key] for key in alike}

    for name, ranks in results.items():
        assert ranks[0] == ranks[1], name
        counted = {k.removeprefix("net."): v for k, v in ranks[0]["report"].per_parameter.items()}
        assert counted == ranks[0]["gathered"], name
        if not steps_apart(name):  # there the training itself is torch's, not DDP's
            assert seen(ranks[0]) == seen(results["ddp"][0]), name
    report = results["ddp"][0]["report"]
    assert report.total == 221 + 187 + 55  # and SafeModelPruning's 30% held:
    assert report.nonzero <= 0.7 * report.total and len(results["ddp"][0]["points"]) == 4
