"""The shipped examples run as a user would run them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_bregman.digits import digits_splits
from dist_bregman.export import load_sparse
from dist_bregman.models import DigitsMLP
from tests.helpers.dist import child_env, deepspeed_shm_files
from tests.helpers.ports import free_port
from tests.helpers.strategies import expect_apart

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(150)
def test_raw_torchrun_loop_two_ranks_agree(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "raw_torchrun.py"),
        "--steps",
        "60",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["lambdas"]) == 6
    for key in ("lambdas", "lambda", "sparsity", "nonzero", "total", "weight_checksum"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["total"] == 64 * 256 + 256 * 128 + 128 * 10
    assert 0 < ranks[0]["nonzero"] < ranks[0]["total"]
    assert "vs target 90.0% → Lambda" in done.stderr  # rank 0's log lines
    assert done.stderr.count("Step 60: Sparsity=") == 1  # ...and only rank 0's


@pytest.mark.timeout(150)
def test_fabric_loop_two_ranks_agree_under_ddp_and_fsdp2(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """examples/fabric_loop.py as its docstring runs it (Fabric starts the second rank):
    the ranks agree, and FSDP2's shards count what DDP's replicas do, step for step (not on
    torch 2.8, whose FSDP2 over gloo steps apart by itself: there the last check fails)."""
    expect_apart(request, "fsdp2")
    records = {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        command = [
            sys.executable,
            str(ROOT / "examples" / "fabric_loop.py"),
            *("--strategy", strategy, "--devices", "2", "--steps", "60", "--out", str(out)),
        ]
        returncode, stderr = _run_job(command, {**child_env(), "MASTER_PORT": str(free_port())})
        assert returncode == 0, stderr[-3000:]
        assert stderr.count("Step 60: Sparsity=") == 1  # rank 0's log lines only
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert {**ranks[0], "rank": 1} == ranks[1]
        records[strategy] = {k: v for k, v in ranks[0].items() if k != "rank"}
    assert records["ddp"] == records["fsdp2"]
    assert records["ddp"]["total"] == 64 * 256 + 256 * 128 + 128 * 10
    assert len(records["ddp"]["lambdas"]) == 6
    assert 0 < records["ddp"]["nonzero"] < records["ddp"]["total"]


def _launch(
    command: list[str], env: dict[str, str], stderr: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """Start a command that starts ranks of its own (a launcher), in its own process group,
    for :func:`_communicate` (``stderr=subprocess.STDOUT``: one stream)."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def _communicate(launched: list[subprocess.Popen[str]], timeout: float) -> list[tuple[str, str]]:
    """Each launched command's (stdout, stderr) once it ends; a command still running after
    ``timeout`` (or the first failure to wait) is killed with its whole process group:
    killing the launcher alone would leave its ranks running after the test."""
    try:
        return [process.communicate(timeout=timeout) for process in launched]
    finally:
        for process in launched:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def _run_job(command: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run a launcher under :func:`_communicate`: its exit code and stderr."""
    process = _launch(command, env)
    [(_, stderr)] = _communicate([process], timeout)
    return process.returncode, stderr


@pytest.mark.timeout(120)
def test_seed_usage_example_runs(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "examples" / "bregman_pruner_usage.py"), "--epochs", "3"]
    done = subprocess.run(
        command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final sparsity" in done.stdout and "validation accuracy" in done.stdout
    assert "Epoch 2: Sparsity of pruned modules =" in done.stderr
    assert "Skipping val loop" not in done.stderr  # the digits loaders' val set is used


@pytest.mark.timeout(150)
def test_launch_torchrun_script_runs_the_ddp_job(tmp_path: Path) -> None:
    test_fraction = 0.1503  # 271 test samples: 2 ranks do not divide them
    command = [
        str(ROOT / "launch" / "torchrun.sh"),
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.test_fraction={test_fraction}",
    ]
    env = child_env() | {"PYTHON": sys.executable}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=130)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "digits_ddp" / "version_0"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["global_step"] == 3 * 40  # 1,257 training samples / (2 ranks x 16) per step
    assert summary["total"] == 64 * 256 + 256 * 128 + 128 * 10
    # The reported test accuracy is the split's, scored once per sample: the exported
    # weights, evaluated here in one process, give the same figure (a padded sampler scored
    # 272 samples, one of them twice).
    model = DigitsMLP(hidden=(256, 128))
    model.load_state_dict(load_sparse(folder / "model_sparse.safetensors"))
    inputs, labels = digits_splits(test_fraction=test_fraction).test.tensors
    assert len(labels) == 271
    with torch.no_grad():
        correct = int((model(inputs).argmax(dim=1) == labels).sum())
    assert summary["test_accuracy"] == pytest.approx(correct / 271, abs=1e-6)
    assert done.stdout.count("== dist-bregman summary ==") == 1
    assert done.stderr.count("Step 120: Sparsity=") == 1  # logged by rank 0 only


def _run_two_nodes(
    script: str, env: dict[str, str], nodes: list[dict[str, str]], folder: Path
) -> str:
    """Run ``launch/<script>`` once per stand-in node (both on this host, one process each,
    CPU), as the job's own command would on two nodes; check they formed one 2-rank DDP job
    that stepped as the 2-rank torchrun job does, and return their stderr, joined."""
    command = [
        "bash",
        str(ROOT / "launch" / script),
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={folder}",
    ]
    env = child_env() | {"PYTHON": sys.executable, "NPROC": "1", "ACCELERATOR": "cpu"} | env
    launched = [_launch(command, env | node) for node in nodes]
    outputs = _communicate(launched, timeout=130)
    for process, (_, stderr) in zip(launched, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    stderr = "\n".join(err for _, err in outputs)
    ranks = sorted(
        line.split("GLOBAL_RANK: ")[1].split(",")[0]
        for line in stderr.splitlines()
        if "Initializing distributed: GLOBAL_RANK:" in line
    )
    assert ranks == ["0", "1"]  # one rank per node, each its own
    summary = json.loads((folder / "digits_ddp" / "version_0" / "summary.json").read_text())
    assert summary["global_step"] == 3 * 40  # 1,257 samples / (2 ranks x 16) per step
    assert summary["total"] == 64 * 256 + 256 * 128 + 128 * 10
    assert sum(out.count("== dist-bregman summary ==") for out, _ in outputs) == 1
    return stderr


SRUN = """#!/usr/bin/env bash
# srun on one host: srun's own options dropped, the command run once (one task per node)
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""


@pytest.mark.timeout(150)
def test_launch_slurm_script_on_two_stand_in_nodes(tmp_path: Path) -> None:
    """launch/slurm.sbatch as SLURM runs it on each of 2 nodes (srun and scontrol stood in
    for): one torchrun per node, node ranks from the c10d rendezvous on the first node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{child_env().get('PATH', '')}",
        "MASTER_PORT": str(free_port()),  # the rendezvous endpoint's port
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "dist-bregman",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS": "2",
    }
    nodes = [{"SLURM_NODEID": str(n), "SLURM_PROCID": str(n)} for n in range(2)]
    _run_two_nodes("slurm.sbatch", env, nodes, tmp_path)


@pytest.mark.timeout(150)
def test_launch_torchrun_script_on_two_nodes(tmp_path: Path) -> None:
    """launch/torchrun.sh with NNODES=2, run the same on each node: the c10d rendezvous
    hands out the node ranks. It used to pass a required NODE_RANK as --node_rank, which
    torchrun ignores under c10d with a warning on every node but the first."""
    env = {"NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    stderr = _run_two_nodes("torchrun.sh", env, [{}, {}], tmp_path)
    assert "node_rank is only used" not in stderr


@pytest.mark.timeout(200)
def test_raw_deepspeed_engine_under_the_deepspeed_launcher(tmp_path: Path) -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    command = [
        str(deepspeed),
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(ROOT / "examples" / "raw_deepspeed.py"),
        "--stage",
        "3",
        "--steps",
        "60",
        "--out",
        str(tmp_path),
    ]
    env = child_env() | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] | {"rank": 0}
    counts = ranks[0]["per_parameter"]
    assert {k: v[1] for k, v in counts.items()} == {
        "0.weight": 16384,
        "2.weight": 32768,
        "4.weight": 1280,
    }
    assert 0 < sum(v[0] for v in counts.values()) < 50432 and ranks[0]["penalty"] > 0
    assert deepspeed_shm_files(port) == []


@pytest.mark.timeout(200)
def test_raw_deepspeed_engine_with_linbreg_and_accumulation_under_torchrun(
    tmp_path: Path,
) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "raw_deepspeed.py"),
        "--stage",
        "2",
        "--optimizer",
        "linbreg",
        "--steps",
        "60",
        "--accumulate",
        "2",
        "--out",
        str(tmp_path),
    ]
    env = child_env() | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] | {"rank": 0}
    assert 0.8 < ranks[0]["sparsity"] < 0.96  # grown from the 5% sparse start
    # 120 micro-batches, 60 optimizer steps: lambda updated every 10 of those, not of these
    assert (ranks[0]["steps"], ranks[0]["updates"]) == (60, 6)


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("script", "config", "processes"),
    [
        ("deepspeed.sh", "digits_zero3.yaml", 2),
        ("torchrun.sh", "digits_fsdp2.yaml", 2),
        ("torchrun.sh", "digits_fsdp2_tp.yaml", 4),  # 2 x 2: FSDP2 over tensor parallelism
    ],
)
def test_launch_scripts_run_the_sharded_jobs(
    script: str, config: str, processes: int, tmp_path: Path
) -> None:
    steps = 3 * 40  # 3 epochs of a global batch of 32 (16 per data-parallel rank)
    command = [
        str(ROOT / "launch" / script),
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    env = child_env() | {
        "PYTHON": sys.executable,
        "CONFIG": f"configs/{config}",
        "NPROC": str(processes),
    }
    if script == "deepspeed.sh":  # torchrun.sh's --standalone binds port 0 and keeps it
        env["MASTER_PORT"] = str(free_port())
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    name = config.removesuffix(".yaml")
    folder = tmp_path / name / "version_0"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["global_step"] == steps and summary["total"] == 50432
    assert 0.0 < summary["final_sparsity"] < 1.0
    # The sharded model's whole weights, gathered and exported: a plain model loads them,
    # with the zeros the run reported.
    model = DigitsMLP(hidden=(256, 128))
    model.load_state_dict(load_sparse(folder / "model_sparse.safetensors"))
    weights = [model.net[i].weight for i in (0, 2, 4)]
    assert sum(int((w != 0).sum()) for w in weights) == summary["nonzero"]
    assert (done.stdout + done.stderr).count(f"Step {steps}: Sparsity=") == 1  # rank 0 only
    if script == "deepspeed.sh":
        assert deepspeed_shm_files(env["MASTER_PORT"]) == []


@pytest.mark.timeout(200)
def test_the_deepspeed_launcher_on_two_nodes_forms_one_world(tmp_path: Path) -> None:
    """What `deepspeed --hostfile` runs on each host (over pdsh): the per-node launcher
    with that host's --node_rank. Two one-process "nodes" here must train as ranks 0 and 1
    of one world (before: both took rank 0; one failed with EADDRINUSE, one waited)."""
    hosts = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode())
    port = free_port()
    env = child_env() | {"DS_ACCELERATOR": "cpu"}
    nodes = [
        _launch(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.launch",
                f"--world_info={hosts.decode()}",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "--no_local_rank",
                "--module",
                "dist_bregman",
                "fit",
                "--config",
                "configs/digits_zero1.yaml",
                "--trainer.devices=1",
                "--trainer.num_nodes=2",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ],
            env,
            stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    outputs = [out for out, _ in _communicate(nodes, timeout=180)]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    summary = json.loads((tmp_path / "digits_zero1" / "version_0" / "summary.json").read_text())
    assert summary["global_step"] == 40  # 1257 samples split in two, 16 a step (alone: 79)
    assert ["== dist-bregman summary ==" in out for out in outputs] == [True, False]


def _resilient(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        str(ROOT / "examples" / "resilient_torchrun.py"),
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=150
    )


@pytest.mark.timeout(330)
def test_a_killed_rank_restarts_from_the_checkpoint_and_ends_where_the_clean_run_ends(
    tmp_path: Path,
) -> None:
    killed = _resilient(tmp_path / "killed", "--kill-rank", "1", "--kill-at-step", "70")
    assert killed.returncode == 0, killed.stderr[-3000:]
    # The SIGKILL really happened and torchrun saw a worker fail. Which exit code it logs is a
    # race: when rank 0 has also died (its gloo peer is gone) by the agent's poll, torchrun
    # logs the lowest local rank, rank 0's -6 or 1, not rank 1's -9.
    assert "rank 1: SIGKILL at step 70" in killed.stdout
    assert "failed (exitcode: " in killed.stderr
    assert "resumed at step 50" in killed.stdout  # ...and the restart took the checkpoint
    clean = _resilient(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resumed" not in clean.stdout
    final_killed = json.loads((tmp_path / "killed" / "final.json").read_text())
    final_clean = json.loads((tmp_path / "clean" / "final.json").read_text())
    assert final_killed == final_clean  # sparsity and lambda: exactly
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(10, 121, 10))  # none lost, none twice
    assert lines == (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()
    assert len({json.loads(line)["lambda"] for line in lines}) > 3  # lambda really moved
