"""Every benchmark keeps working (CI runs each in --quick mode, seconds), and the README
quotes the tables they wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def run_quick(name: str, out: Path, *extra: str) -> Any:
    script = ROOT / "benchmarks" / f"{name}.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"{name}.md").read_text().count("|") > 10
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.timeout(180)
def test_measure_throughput_quick(tmp_path: Path) -> None:
    results = run_quick("measure_throughput", tmp_path)
    assert results[0]["ratio_to_floor"]["floor (sum per tensor)"] == 1.0
    assert set(results[0]["median_seconds"]) == {
        "floor (sum per tensor)",
        "naive ((p == 0).sum().item())",
        "measure_sparsity(model)",
        "SparsityController.measure()",
        "SparsityController.measure(), rows too (group_l1)",
    }


@pytest.mark.timeout(180)
def test_loss_term_quick(tmp_path: Path) -> None:
    # The script checks the value it times, and that both loss-mode rows write the same
    # gradients.
    results = run_quick("loss_term", tmp_path)
    assert results[0]["ratio_to_floor"]["floor (sum per tensor)"] == 1.0
    assert set(results[0]["median_seconds"]) == {
        "floor (sum per tensor)",
        "torch ops (abs().sum() per tensor)",
        "SparsityController.regularization_loss() (prox)",
        "loss mode: torch ops, value + backward()",
        "loss mode: regularization_loss(), value + backward()",
    }


@pytest.mark.timeout(180)
def test_step_overhead_quick(tmp_path: Path) -> None:
    result = run_quick("step_overhead", tmp_path)
    assert result["ratio"]["SGD momentum"] == 1.0
    assert result["against"]["SGD momentum, a second copy"] == "SGD momentum"
    assert result["against"]["AdaBreg + pruner, uf=5"] == "Adam"
    assert all(value > 0 for value in result["steps_per_second"].values())
    # Time inside the pruner's own calls, read directly (CPU), for the rows that have one.
    share = result["in_pruner_share"]
    assert set(share) == {name for name in result["ratio"] if "pruner" in name}
    assert all(0.0 < value < 1.0 for value in share.values())


@pytest.mark.timeout(180)
def test_distributed_cost_quick(tmp_path: Path) -> None:
    rows = run_quick("distributed_cost", tmp_path)
    by_world = {(r["layout"], r["world"]): r for r in rows}
    for layout in ("ddp", "fsdp2"):
        # One measurement + lambda update: nothing sent alone; at world 2 exactly one
        # all-reduce of the counts and one broadcast of lambda, a few dozen bytes.
        assert by_world[(layout, 1)]["update_collectives"] == 0
        assert by_world[(layout, 2)]["update_collectives"] == 2
        assert 0 < by_world[(layout, 2)]["update_bytes_per_rank"] <= 128


@pytest.mark.timeout(180)
def test_import_time_quick(tmp_path: Path) -> None:
    """Each statement ran in its own interpreter; the core one asserts that Lightning
    stayed unloaded (the script fails otherwise). No timing is compared here."""
    result = run_quick("import_time", tmp_path)
    assert (
        set(result["median_seconds"])
        == set(result["statements"])
        == {
            "python, nothing imported",
            "import torch",
            "import dist_bregman",
            "import dist_bregman + BregmanPruner (loads Lightning)",
        }
    )
    assert result["ratio_to_import_torch"]["import torch"] == 1.0
    assert "lightning" in result["statements"]["import dist_bregman"]
    parts = result["breakdown_seconds"]  # from a real -X importtime run
    assert parts["total"] > 0 and all(seconds >= 0 for seconds in parts.values())


IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _early
import time:      1000 |       5000 | torch
import time:        50 |         50 |       sympy.core
import time:       200 |        300 |     torch.distributed.tensor
import time:        10 |        310 |   dist_bregman.shards
import time:        20 |         20 |   safetensors
import time:        40 |        370 | dist_bregman
"""


def test_import_breakdown_takes_the_outermost_imports_outside_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the README's second import table is read from: of the lines after torch's, each
    module outside the package imported by one of its modules (not by a module outside it,
    as sympy.core here), and the package's own time as the rest."""
    import_time = load_benchmark("import_time", monkeypatch)
    found = import_time.imported_by_package(IMPORTTIME)
    assert found == pytest.approx(
        {
            "total": 370e-6,
            "torch.distributed.tensor": 300e-6,
            "safetensors": 20e-6,
            import_time.OWN: 50e-6,
        }
    )


@pytest.mark.timeout(240)
def test_quality_quick(tmp_path: Path) -> None:
    results = run_quick("quality", tmp_path, "--jobs", "1")  # in-process: no worker start-up
    runs = results["runs"]
    sgd_peers, adam_peers = ("ModelPruning", "GMP"), ("ModelPruning (Adam)", "GMP (Adam)")
    bregman = ("BregmanPruner (prox)", "LinBreg", "AdaBreg")
    assert {(r["task"], r["method"]) for r in runs} == {
        (task, method)
        for task in ("digits-mlp", "digits-cnn", "teacher-student", "teacher-student-few")
        for method in ("dense", *sgd_peers, "dense (Adam)", *adam_peers, *bregman)
    }
    regression = ("teacher-student", "teacher-student-few")
    last_step = {(r["task"], r["method"]): r["trace"][-1][0] for r in runs}
    # 96 pairs are 3 batches an epoch, 1,000 are 32: the few-pair task trains 21 epochs for
    # 2 (63 steps against 64; exactly as many at the full 30: 320 epochs), so its trace,
    # a point every 10 steps, ends at the same step.
    assert last_step["teacher-student-few", "GMP"] == last_step["teacher-student", "GMP"] > 0
    for run in runs:
        if run["method"] in sgd_peers + adam_peers:  # schedules land on the target
            assert run["sparsity"] == pytest.approx(0.9, abs=0.002)
        if run["task"] in regression:
            assert 0.0 <= run["f1"] <= 1.0
        steps = [step for step, *_ in run["trace"]]
        assert steps and steps == sorted(set(steps)), run
        if run["task"] not in regression and run["method"] in ("LinBreg", "AdaBreg"):
            # A dense warm-up, then the magnitude cut; the freeze holds exactly the target.
            assert run["trace"][0][1] < 0.1, run["trace"][:3]
            assert all(lam is not None for *_, lam in run["trace"])
            assert run["sparsity"] == pytest.approx(0.9, abs=1e-4)
    metric = {(r["task"], r["method"]): r["metric"] for r in runs}
    # AdaBreg is Adam at lambda 0: it is compared with the Adam references, the others
    # with SGD's; "best" is the better of all four peers whatever their optimizer.
    adam = {"AdaBreg", "dense (Adam)", *adam_peers}
    assert metric["digits-mlp", "dense (Adam)"] != metric["digits-mlp", "dense"]
    f1 = {(r["task"], r["method"]): r["f1"] for r in runs}
    for row in results["summary"]:  # one seed: a paired gap is the plain difference
        task, on_adam = row["task"], row["method"] in adam
        exact = None if task not in regression else int(f1[task, row["method"]] == 1.0)
        assert row["exact"] == exact  # seeds whose support is exactly the teacher's
        dense = metric[task, "dense (Adam)" if on_adam else "dense"]
        assert row["vs_dense"] == pytest.approx(row["metric"] - dense, abs=1e-12)
        if row["method"] not in bregman:
            assert row["peer"] is None and row["vs_peer"] is None and row["best"] is None
            continue
        pick = min if task in regression else max  # lower error, higher accuracy
        for key, names in (
            ("peer", adam_peers if on_adam else sgd_peers),
            ("best", sgd_peers + adam_peers),
        ):
            peers = {peer: metric[task, peer] for peer in names}
            assert row[key] in names and peers[row[key]] == pick(peers.values())
            assert row[f"vs_{key}"] == pytest.approx(row["metric"] - peers[row[key]], abs=1e-12)
    assert (tmp_path / "quality_accuracy.png").stat().st_size > 0
    assert (tmp_path / "quality_trajectory.png").stat().st_size > 0
    # The report again from the run's JSON, nothing trained: the same table.
    again = tmp_path / "again"
    script = ROOT / "benchmarks" / "quality.py"
    command = [sys.executable, str(script), "--from-json", str(tmp_path / "quality.json")]
    command += ["--out", str(again), "--name", "check"]  # a second table beside the first
    done = subprocess.run(command, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "check.md").read_text() == (tmp_path / "quality.md").read_text()
    assert json.loads((again / "check.json").read_text())["runs"] == runs
    assert (again / "check_accuracy.png").stat().st_size > 0


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A benchmark script imported as a module (``main`` not run)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import common.py
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SCRIPTS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "common")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help_prints(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--help`` is the first thing a reader runs; argparse formats help strings with
    ``%``, so a bare "90%" in one raised ValueError instead of printing (as quality.py's
    did)."""
    module = load_benchmark(name, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        module.main()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--quick" in out


def test_quality_pairs_each_regression_target_with_its_own_dense_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The regression's teacher has the target's sparsity, so a pruned run at 90% is
    compared with a dense fit of the 90% teacher; a digits dense run serves every target."""
    quality = load_benchmark("quality", monkeypatch)
    tasks, targets = ["digits-mlp", "teacher-student"], [0.8, 0.9]
    runs = quality.plan(tasks, ["dense", "GMP"], targets, 2, 1, "test")
    dense = sorted((r.task, r.target, r.seed) for r in runs if r.method == "dense")
    assert dense == [("digits-mlp", 0.8, 0), ("digits-mlp", 0.8, 1)] + [
        ("teacher-student", t, s) for t in targets for s in (0, 1)
    ]
    for i, run in enumerate(runs):  # made-up results, distinct per run
        run.metric, run.sparsity, run.seconds = float(i), run.target, 1.0
    metric = {(r.task, r.target, r.method, r.seed): r.metric for r in runs}
    done = quality.list_dense_under_every_target(runs, targets)
    assert len(done) == len(runs) + 2  # the two digits dense runs, copied under 90%
    rows = {(r["task"], r["target"], r["method"]): r for r in quality.summarize(done)}
    for task in tasks:
        for target in targets:
            reference = target if task == "teacher-student" else 0.8
            gaps = [
                metric[task, target, "GMP", s] - metric[task, reference, "dense", s] for s in (0, 1)
            ]
            assert rows[task, target, "GMP"]["vs_dense"] == pytest.approx(sum(gaps) / 2)


@pytest.mark.parametrize("task", ["digits-mlp", "teacher-student"])
def test_quality_decides_tied_peers_against_the_method(
    task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two peers with the same mean (on digits, the same images right over all seeds) are
    one comparison with two standard errors: the table takes the one against which the
    method's margin in standard errors is least favourable to it (the least significant
    lead, the most significant deficit); a peer better by mean still wins outright."""
    quality = load_benchmark("quality", monkeypatch)
    better = 1.0 if task == "digits-mlp" else -1.0  # accuracy up, regression error down
    method = [0.90, 0.92, 0.94, 0.96]
    steady = [0.01, 0.01, 0.02, 0.00]  # both gaps have mean 0.01: a tie in the peers' means
    erratic = [0.03, -0.01, 0.02, 0.00]

    def rows(sign: float, leader: float | None, steady: list[float] = steady) -> dict[str, Any]:
        peers = {"ModelPruning": steady, "GMP": erratic}  # the steady one comes first
        runs = [quality.Run(task, "LinBreg", 0.9, s, 30, metric=m) for s, m in enumerate(method)]
        for name, gaps in peers.items():
            runs += [
                quality.Run(task, name, 0.9, s, 30, metric=m - better * sign * g)
                for s, (m, g) in enumerate(zip(method, gaps, strict=True))
            ]
        if leader is not None:  # a peer better than both by mean, however steady
            runs += [
                quality.Run(task, "GMP (Adam)", 0.9, s, 30, metric=m + better * leader)
                for s, m in enumerate(method)
            ]
        return next(r for r in quality.summarize(runs) if r["method"] == "LinBreg")

    ahead = rows(sign=1.0, leader=None)  # the method is better than both by 0.01
    assert ahead["peer"] == "GMP"  # its +0.01 is least significant against the erratic one
    assert ahead["vs_peer"] == pytest.approx(better * 0.01)
    behind = rows(sign=-1.0, leader=None)  # the method is worse than both by 0.01
    assert behind["peer"] == "ModelPruning"  # its -0.01 is most significant there
    assert rows(sign=1.0, leader=0.001)["best"] == "GMP (Adam)"
    # The same lead on every seed (no spread) is the most significant one, not a zero.
    assert rows(sign=1.0, leader=None, steady=[0.01] * 4)["peer"] == "GMP"
    assert rows(sign=-1.0, leader=None, steady=[0.01] * 4)["peer"] == "ModelPruning"


def test_quality_trial_replaces_data_lrs_and_prox_cap_in_its_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a trial changes in quality.py (done in each worker by the pool's initializer):
    the first N training examples, every lr times the multiple, prox's cap."""
    trial = load_benchmark("quality_trial", monkeypatch)
    quality = trial.quality
    for name in ("teacher_data", "digits_splits", "optimizer_settings", "bregman_pruner"):
        monkeypatch.setattr(quality, name, getattr(quality, name))  # restored after the test
    before = quality.optimizer_settings("teacher-student", "GMP").lr
    prox = "BregmanPruner (prox)"
    trial._apply(96, 20.0, 0.3)
    assert len(quality.teacher_data(0.9, 0, 1000)[1]) == 96
    assert len(quality.digits_splits(seed=0, images=False).train) == 96
    assert quality.optimizer_settings("teacher-student", "GMP").lr == pytest.approx(20 * before)
    assert quality.bregman_pruner("teacher-student", prox, 0.9, 10).config.max_lambda == 0.3
    assert quality.bregman_pruner("teacher-student", "LinBreg", 0.9, 10).config.max_lambda == 10


def test_quality_trial_on_mnist1d_swaps_in_its_splits_and_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--data mnist1d``: per seed a stratified 70/15/15 split of MNIST-1D's 5,000 signals
    (disjoint, reproducible, another per seed), and models whose Conv1d weights are
    regularized as the digits models' Conv2d ones (left in the unregularized group, the
    Bregman optimizers would not shrink them while the pruner counted them)."""
    trial = load_benchmark("quality_trial", monkeypatch)
    quality = trial.quality
    names = ("teacher_data", "digits_splits", "optimizer_settings", "bregman_pruner")
    for name in (*names, "DigitsMLP", "DigitsCNN"):
        monkeypatch.setattr(quality, name, getattr(quality, name))  # restored after the test
    trial._apply(None, 1.0, 0.0, "mnist1d")
    splits = quality.digits_splits(seed=0, images=True)
    parts = [split.tensors for split in (splits.train, splits.val, splits.test)]
    assert [len(y) for _, y in parts] == [3500, 750, 750]
    assert [tuple(x.shape[1:]) for x, _ in parts] == [(1, 40)] * 3
    for _, y in parts:  # stratified: every class within one signal of a tenth
        counts = y.bincount(minlength=10)
        assert int(counts.max() - counts.min()) <= 1, counts
    rows = [{tuple(row.tolist()) for row in x.flatten(1)} for x, _ in parts]
    assert sum(map(len, rows)) == 5000 == len(set().union(*rows))  # disjoint, all 5,000
    again = quality.digits_splits(seed=0, images=True).test.tensors[0]
    other = quality.digits_splits(seed=1, images=True).test.tensors[0]
    assert torch.equal(again, parts[2][0]) and not torch.equal(other, parts[2][0])
    flat = quality.digits_splits(seed=0, images=False).train.tensors[0]
    assert torch.equal(flat, parts[0][0].squeeze(1))
    for model, layer in ((quality.DigitsMLP, nn.Linear), (quality.DigitsCNN, nn.Conv1d)):
        net = model(optimizer="linbreg", lr=0.1, momentum=0.9, seed=0)
        weights = [m.weight for m in net.modules() if isinstance(m, nn.Linear | nn.Conv1d)]
        assert any(isinstance(m, layer) for m in net.modules())
        reg: dict[int, str | None] = {
            id(p): group["reg"] for group in net.param_groups() for p in group["params"]
        }
        assert {id(w) for w in weights} == {p for p, r in reg.items() if r == "l1"}
        assert len(reg) == len(list(net.parameters()))  # each once; the biases: None
        assert {p for p, r in reg.items() if r is None} == {
            id(m.bias) for m in net.modules() if isinstance(m, nn.Linear | nn.Conv1d)
        }
        inputs = parts[0][0][:4] if layer is nn.Conv1d else flat[:4]
        assert net(inputs).shape == (4, 10)


def test_quality_trial_conv_lambda_scale_moves_lambda_between_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--conv-lambda-scale``: conv weights get their own param groups at that
    ``lambda_scale``, so the Bregman optimizers threshold them at the scale times the
    pruner's lambda, every other weight at lambda, biases not at all; a plain optimizer
    (prox) gets the same groups, for the proximal step to read."""
    trial = load_benchmark("quality_trial", monkeypatch)
    from dist_bregman.models import DigitsCNN, OptimizerSettings
    from dist_bregman.optim import lambda_scale

    monkeypatch.setattr(OptimizerSettings, "build", OptimizerSettings.build)
    for name in ("teacher_data", "digits_splits", "optimizer_settings", "bregman_pruner"):
        monkeypatch.setattr(trial.quality, name, getattr(trial.quality, name))
    trial._apply(None, 1.0, 0.0, "digits", 0.5)
    model = DigitsCNN(optimizer="adabreg", lr=0.01, seed=0)
    optimizer = model.optim.build(model.param_groups())
    optimizer.set_lambda(0.2)
    lambdas = {
        id(p): group["lambda"] if group["reg"] is not None else None
        for group in optimizer.param_groups
        for p in group["params"]
    }
    plain = DigitsCNN(optimizer="sgd", lr=0.05, seed=0)
    scales = {
        id(p): lambda_scale(group)
        for group in plain.optim.build(plain.param_groups()).param_groups
        for p in group["params"]
    }
    for net, module in zip(model.net.modules(), plain.net.modules(), strict=True):
        if isinstance(module, nn.Conv2d | nn.Linear):
            expected = 0.5 if isinstance(module, nn.Conv2d) else 1.0
            assert lambdas[id(net.weight)] == pytest.approx(0.2 * expected)
            assert lambdas[id(net.bias)] is None
            assert scales[id(module.weight)] == expected and scales[id(module.bias)] == 1.0
    assert len(lambdas) == len(list(model.parameters()))
    assert len(scales) == len(list(plain.parameters()))


@pytest.mark.timeout(180)
def test_quality_trial_on_mnist1d_quick() -> None:
    """The CNN's Conv1d weights under AdaBreg and the pruner, end to end, and their
    sparsity per weight (``--layers``)."""
    script = ROOT / "benchmarks" / "quality_trial.py"
    command = [sys.executable, str(script), "--quick", "--data", "mnist1d", "--task", "digits-cnn"]
    command += ["--methods", "AdaBreg", "--layers"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    result, layers = done.stdout.splitlines()
    assert result.startswith("90% AdaBreg "), done.stdout
    # --layers: the sparsity of each of the CNN's five weights (three Conv1d, two Linear)
    cells = layers.split("sparsity per weight ")[1].split("% ")
    assert len(cells) == 5 and cells[0].startswith("net.0.weight: "), layers


@pytest.mark.timeout(180)
def test_quality_trial_quick() -> None:
    script = ROOT / "benchmarks" / "quality_trial.py"
    command = [sys.executable, str(script), "--quick", "--examples", "96", "--methods", "GMP"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("90% GMP "), done.stdout


@pytest.mark.timeout(120)
def test_quality_can_choose_on_the_validation_split(tmp_path: Path) -> None:
    """Settings are chosen with ``--split val``; the test split is reported separately."""
    extra = ("--split", "val", "--tasks", "digits-mlp", "teacher-student", "--methods", "dense")
    extra += ("--jobs", "1")
    results = run_quick("quality", tmp_path, *extra)
    assert {r["split"] for r in results["runs"]} == {"val"}
    assert "| val metric |" in (tmp_path / "quality.md").read_text()


@pytest.mark.timeout(240)
def test_the_gpu_check_script_runs_its_steps(tmp_path: Path) -> None:
    """``benchmarks/cuda_check.sh`` is what a lent GPU machine runs, in its one call; here
    its steps run on CPU in quick mode, so a renamed flag or path fails in CI, not there."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path)}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "cuda_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {
        "test_cuda.log",
        "measure.log",
        "step.log",
        "loss.log",
        "loss_term.json",
        "loss_term.md",
        "measure_throughput.json",
        "measure_throughput.md",
        "step_overhead.json",
        "step_overhead.md",
    }
    assert "skipped" in (tmp_path / "test_cuda.log").read_text()  # collected, no GPU here
    assert json.loads((tmp_path / "step_overhead.json").read_text())["steps_per_second"]


@pytest.mark.parametrize(
    "table", sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.md"))
)
def test_readme_shows_the_tables_the_scripts_wrote(table: str) -> None:
    """The README's Results quote ``benchmarks/results/*.md`` row for row: a table re-made
    by a script and not pasted back would leave the README with numbers no script wrote."""
    text = (ROOT / "benchmarks" / "results" / table).read_text()
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    assert tables and len(tables) == text.count("\n|---"), table  # none glued to a caption
    assert all(block.count("\n") > 2 for block in tables), table
    readme = (ROOT / "README.md").read_text()
    for block in tables:
        assert block.rstrip("\n") in readme, table
