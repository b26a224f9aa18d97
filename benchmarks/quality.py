"""Accuracy at a given sparsity: dist_bregman's methods against the tools users pick instead.

    python benchmarks/quality.py --quick                  # seconds: CI smoke
    python benchmarks/quality.py --out benchmarks/results # 4 tasks x 3 targets x 10 seeds
    python benchmarks/quality.py --from-json FILE.json --out DIR # the report again, no run

Tasks (all data ships in a package or is generated; no download):

* ``digits-mlp``: scikit-learn's digits, ``DigitsMLP`` 64-256-128-10; test accuracy.
* ``digits-cnn``: the same images as 1x8x8, ``DigitsCNN``; test accuracy.
* ``teacher-student``: linear regression ``y = W* x + noise`` whose teacher ``W*`` (16 x 128)
  has exactly the target's share of zeros, fitted on 1,000 pairs; test error (relative MSE)
  and the F1 of the student's support against the teacher's.
* ``teacher-student-few``: the same teachers fitted on 96 pairs, fewer than the 128 inputs
  (the compressed-sensing regime: the data alone do not determine the weights, the sparse
  support must); as many optimizer steps as the 1,000-pair task (``task_epochs``).

Methods, each with the same epochs, data order and initial weights per seed:

* ``dense``: SGD with momentum, no pruning (the reference accuracy);
* ``ModelPruning``: Lightning's, global L1 unstructured, the cubic schedule of GMP turned
  into Lightning's per-event amounts (Lightning prunes a fraction *of what is left*, so
  ``a_t = 1 - (1 - s_t) / (1 - s_{t-1})``), no lottery-ticket reset;
* ``GMP``: ``SafeModelPruning`` with the cubic schedule (Zhu & Gupta, 2017);
* ``dense (Adam)``, ``ModelPruning (Adam)``, ``GMP (Adam)``: the same with Adam (each
  side at its own best lr on validation), AdaBreg's like-for-like references (AdaBreg at
  lambda 0 is Adam; with SGD references alone, Adam's own lead over SGD on digits read as
  AdaBreg's);
* ``BregmanPruner (prox)``: SGD with momentum, proximal L1 step, adaptive lambda;
* ``LinBreg`` and ``AdaBreg`` (Bungert et al., 2022), lambda driven by the pruner, from a
  sparse start: on digits, one dense epoch (``WARM_EPOCHS``, part of the run's epochs, with
  shrinkage off), then the smallest weights zeroed down to the target and the optimizer
  restarted (the pruner's ``magnitude_start_at``); on the regression, zero.

Pruning schedules end at 60% of the epochs; the rest fine-tunes with the masks held. The
Bregman methods freeze their support at the same step (``freeze_support_at``) and refit
the surviving weights without shrinkage for the rest.
Runs go to a pool of worker processes (one torch thread each); wall time is one run's fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import machine, write
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dist_bregman import BregmanPruner, SafeModelPruning, measure_sparsity
from dist_bregman.digits import digits_splits
from dist_bregman.models import DigitsCNN, DigitsMLP, OptimizerSettings
from dist_bregman.pruning import PruningConfig, scheduled_amount
from dist_bregman.targets import resolve

TASKS = ("digits-mlp", "digits-cnn", "teacher-student", "teacher-student-few")


@dataclass(frozen=True)
class Regression:
    """What differs between the regression tasks (both: 1,000 test and validation pairs)."""

    pairs: int
    """Training pairs."""
    sgd_lr: float
    """SGD's lr (LinBreg's and prox's too, see ``optimizer_settings``)."""
    adam_lr: float
    """Adam's and AdaBreg's lr."""


# The lrs (quality_trials.md): on the 96 pairs the peers' best of a grid on validation,
# SGD 0.4 of 0.01 to 0.8 (at 0.8 the dense fit diverged), Adam 0.1 of 0.005 to 0.2; on
# the 1,000 pairs (every method reaches the oracle's error) not swept.
REGRESSIONS = {
    "teacher-student": Regression(pairs=1000, sgd_lr=0.02, adam_lr=0.01),
    "teacher-student-few": Regression(pairs=96, sgd_lr=0.4, adam_lr=0.1),
}
ADAM = " (Adam)"
"""Suffix of a reference method trained with Adam instead of SGD with momentum: AdaBreg
at lambda 0 is Adam, so these are its like-for-like dense run and peers."""
METHODS = (
    "dense",
    "ModelPruning",
    "GMP",
    "dense" + ADAM,
    "ModelPruning" + ADAM,
    "GMP" + ADAM,
    "BregmanPruner (prox)",
    "LinBreg",
    "AdaBreg",
)
BREGMAN = ("BregmanPruner (prox)", "LinBreg", "AdaBreg")
PEERS = ("ModelPruning", "GMP", "ModelPruning" + ADAM, "GMP" + ADAM)
"""The tools users would pick instead, with either optimizer; the goal is to be ahead."""
TRACE_EVERY = 10  # steps between two points of the sparsity/lambda trajectory
BATCH = 32
MOMENTUM = 0.9
WARM_EPOCHS = 1
"""LinBreg/AdaBreg on digits: dense epochs (shrinkage off) before the magnitude cut that
starts them (``magnitude_start_at``); part of the run's epochs."""


# ---------------------------------------------------------------------------- the regression
class TeacherStudent(pl.LightningModule):
    """A linear student ``16 x 128`` fitted by MSE to a sparse linear teacher."""

    def __init__(self, optim: OptimizerSettings, zero_init: bool, seed: int) -> None:
        super().__init__()
        self.optim = optim
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(128, 16, bias=False))
        if zero_init:  # the inverse scale space starts from nothing and grows the support
            nn.init.zeros_(self.net[0].weight)
        self.pruner: BregmanPruner | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        found = [c for c in self.trainer.callbacks if isinstance(c, BregmanPruner)]  # type: ignore[attr-defined]
        self.pruner = found[0] if found else None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.pruner is not None:
            loss = loss + self.pruner.get_regularization_loss(self)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optim.build([{"params": list(self.parameters()), "reg": self.optim.reg}])


def regression(task: str) -> bool:
    """A teacher-student task (metric: relative MSE, lower is better; a teacher per target)."""
    return task in REGRESSIONS


def teacher_data(
    sparsity: float, seed: int, pairs_to_fit: int = 1000
) -> tuple[torch.Tensor, TensorDataset, TensorDataset, TensorDataset]:
    """The teacher (exactly ``sparsity`` zeros, nonzeros of magnitude >= 0.5) and
    ``pairs_to_fit`` training / 1,000 test / 1,000 validation pairs with noise of standard
    deviation 0.1. Fewer training pairs are the first of the 1,000 (same teacher, same
    test set)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.zeros(16 * 128)
    keep = round((1 - sparsity) * teacher.numel())
    support = torch.randperm(teacher.numel(), generator=generator)[:keep]
    magnitude = 0.5 + torch.rand(keep, generator=generator)
    sign = torch.randint(0, 2, (keep,), generator=generator) * 2 - 1
    teacher[support] = magnitude * sign
    teacher = teacher.view(16, 128)

    def pairs(n: int) -> TensorDataset:
        x = torch.randn(n, 128, generator=generator)
        y = x @ teacher.T + 0.1 * torch.randn(n, 16, generator=generator)
        return TensorDataset(x, y)

    train, test = pairs(1000), pairs(1000)
    x, y = train.tensors
    return teacher, TensorDataset(x[:pairs_to_fit], y[:pairs_to_fit]), test, pairs(1000)


# ---------------------------------------------------------------------------- one run
@dataclass
class Run:
    task: str
    method: str
    target: float
    seed: int
    epochs: int
    split: str = "test"
    """Where ``metric`` is measured: ``"test"``, or ``"val"`` for choosing settings."""
    metric: float = math.nan
    sparsity: float = math.nan
    f1: float | None = None
    found: float | None = None
    """Bregman methods: the sparsity shrinkage had reached at the freeze, before the held
    set was made exactly the target (how much of the target the method found itself)."""
    seconds: float = math.nan
    trace: list[tuple[int, float, float | None]] = field(default_factory=list)
    """(step, sparsity, lambda or None) every ``TRACE_EVERY`` steps."""


class Trace(pl.Callback):
    """Sparsity (and lambda, where a pruner holds one) against the optimizer step."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        step = trainer.global_step
        if step % TRACE_EVERY:
            return
        pruners = [c for c in trainer.callbacks if isinstance(c, BregmanPruner)]  # type: ignore[attr-defined]
        lam = pruners[0].current_lambda if pruners else None
        self.run.trace.append((step, measure_sparsity(pl_module).sparsity, lam))


def tool(method: str) -> str:
    """The method without its optimizer: ``"GMP (Adam)"`` -> ``"GMP"``."""
    return method.removesuffix(ADAM)


def on_adam(method: str) -> bool:
    """Adam-based: AdaBreg and the ``(Adam)`` references. The others take SGD's step (prox
    and LinBreg: SGD with momentum, and LinBreg at lambda 0 is that heavy ball)."""
    return method == "AdaBreg" or method.endswith(ADAM)


def dense_of(method: str) -> str:
    """The dense run a method is compared with: the one with its optimizer."""
    return "dense" + ADAM if on_adam(method) else "dense"


def task_epochs(task: str, epochs: int) -> int:
    """The epochs a task trains for ``epochs`` nominal ones: a regression on fewer pairs
    trains proportionally more epochs, for the same number of optimizer steps."""
    if not regression(task):
        return epochs
    steps = math.ceil(REGRESSIONS["teacher-student"].pairs / BATCH)
    return epochs * steps // math.ceil(REGRESSIONS[task].pairs / BATCH)


def ramp_epochs(epochs: int) -> int:
    return max(int(0.6 * epochs), 1)


def lightning_amounts(target: float, epochs: int) -> Callable[[int], float]:
    """Lightning's per-epoch amount (a fraction of the remaining weights) that follows the
    same cubic schedule of total sparsity as GMP."""
    config = PruningConfig(
        amount=0.0, scheduled_pruning=True, final_amount=target, epochs_to_ramp=ramp_epochs(epochs)
    )

    def amount(epoch: int) -> float:
        now = scheduled_amount(epoch, config)
        before = scheduled_amount(epoch - 1, config) if epoch > 0 else 0.0
        return 0.0 if now <= before else 1.0 - (1.0 - now) / (1.0 - before)

    return amount


# Settings of the Bregman methods, chosen by trial runs (all since the first few on
# validation splits); what each was chosen over, with the numbers, is in
# quality_trials.md. In short: lambda moves multiplicatively every 10 steps; prox's lambda
# is capped (3e-3 on digits) so shrinkage finds most of the target and the freeze's
# magnitude selection the rest (0.3 on the regression, where shrinkage finds nearly all of
# it; capped at 1.0, lambda rose past 0.5 and zeroed some of the teacher's smallest
# weights); LinBreg and AdaBreg start at 0.01 on digits from a magnitude cut
# (``WARM_EPOCHS``), and LinBreg takes SGD's step (``optimizer_settings``).
def bregman_pruner(
    task: str, method: str, target: float, freeze_at: int, start_at: int = 0
) -> BregmanPruner:
    """The support is frozen at ``freeze_at`` (where the magnitude pruners' schedules end):
    the rest of the run refits the surviving weights without shrinkage. ``start_at``: the
    step of the magnitude cut that ends a dense warm-up (``magnitude_start_at``; 0: none)."""
    digits = not regression(task)
    if method == "BregmanPruner (prox)":
        initial, high = (1e-3, 3e-3) if digits else (1e-2, 0.1)
    else:
        initial, high = (0.01 if digits else 0.1), 10.0
    return BregmanPruner(
        target_sparsity=target,
        initial_lambda=initial,
        lambda_rule="multiplicative",
        lambda_update_rate=2.0,
        min_lambda=1e-6,
        max_lambda=high,
        update_frequency=10,
        magnitude_start_at=start_at,
        freeze_support_at=freeze_at,
    )


def optimizer_settings(task: str, method: str) -> OptimizerSettings:
    # SGD's lr on digits: 0.05, level with 0.02 on validation, where 0.1 diverged
    # (quality_trials.md); the regressions': see REGRESSIONS.
    lr = REGRESSIONS[task].sgd_lr if regression(task) else 0.05
    if method == "LinBreg":
        # LinBreg's momentum averages (1 - b) * lr * g into v; at lr / (1 - b) the active
        # weights move exactly as SGD's heavy ball moves them at lr: the same step size.
        return OptimizerSettings(
            name="linbreg", lr=lr / (1 - MOMENTUM), momentum=MOMENTUM, reg="l1"
        )
    if on_adam(method):
        # Adam's lr on digits, each side at its best of 0.002 / 0.005 / 0.01 on validation
        # (quality_trials.md): AdaBreg at lr / 5 (0.02 diverged on the CNN), the (Adam)
        # references at lr / 10 (at lr / 5 the dense MLP lost a point). The regressions': see
        # REGRESSIONS.
        if regression(task):
            adam_lr = REGRESSIONS[task].adam_lr
        else:
            adam_lr = lr / (5 if method == "AdaBreg" else 10)
        name = "adabreg" if method == "AdaBreg" else "adam"
        return OptimizerSettings(name=name, lr=adam_lr, reg="l1")
    return OptimizerSettings(name="sgd", lr=lr, momentum=MOMENTUM)


def execute(run: Run) -> Run:
    torch.set_num_threads(1)
    pl.seed_everything(run.seed, verbose=False)
    settings = optimizer_settings(run.task, run.method)
    inverse_scale = run.method in ("LinBreg", "AdaBreg")  # these grow from a sparse start
    teacher = None
    epochs = task_epochs(run.task, run.epochs)
    if regression(run.task):
        teacher, train, test, val = teacher_data(run.target, run.seed, REGRESSIONS[run.task].pairs)
        test = val if run.split == "val" else test
        module: pl.LightningModule = TeacherStudent(settings, inverse_scale, run.seed)
    else:
        # Each seed draws its own stratified split: one fixed 270-image test set had put
        # the same runs 1.6 points apart on validation and test (see the README).
        splits = digits_splits(seed=run.seed, images=run.task == "digits-cnn")
        train, test = splits.train, splits.val if run.split == "val" else splits.test
        common = {
            "optimizer": settings.name,
            "lr": settings.lr,
            "momentum": settings.momentum,
            "seed": run.seed,
        }
        module = DigitsMLP(**common) if run.task == "digits-mlp" else DigitsCNN(**common)
    pairs = [(t.module, "weight") for t in resolve(module)]
    loader = DataLoader(train, batch_size=BATCH, shuffle=True)
    start = time.perf_counter()
    callbacks: list[pl.Callback] = [Trace(run)]
    pruner: BregmanPruner | None = None
    if tool(run.method) == "ModelPruning":
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=pairs,
                amount=lightning_amounts(run.target, epochs),
                use_global_unstructured=True,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        )
    elif tool(run.method) == "GMP":
        callbacks.append(
            SafeModelPruning(
                amount=0.0,
                scheduled_pruning=True,
                final_amount=run.target,
                epochs_to_ramp=ramp_epochs(epochs),
                parameters_to_prune=pairs,
            )
        )
    elif run.method in BREGMAN:
        # Frozen at the step where the magnitude schedules end.
        freeze_at = ramp_epochs(epochs) * len(loader)
        start_at = 0
        if inverse_scale and teacher is None:  # a short run (--quick) cuts before its freeze
            start_at = min(WARM_EPOCHS * len(loader), freeze_at // 2)
        pruner = bregman_pruner(run.task, run.method, run.target, freeze_at, start_at)
        callbacks.append(pruner)
    _fit(module, loader, epochs, callbacks)
    run.seconds = time.perf_counter() - start
    module.eval()
    x, y = test.tensors
    with torch.no_grad():
        out = module(x)
    if teacher is None:
        run.metric = float((out.argmax(dim=1) == y).float().mean())
    else:
        run.metric = float(((out - y) ** 2).sum() / (y**2).sum())
        found, truth = module.net[0].weight.detach() != 0, teacher != 0
        hits = int((found & truth).sum())
        run.f1 = 2 * hits / max(int(found.sum()) + int(truth.sum()), 1)
    run.sparsity = measure_sparsity(module).sparsity
    if pruner is not None and pruner.controller is not None:
        run.found = pruner.controller.found_sparsity
    return run


def _fit(
    module: pl.LightningModule, loader: DataLoader, epochs: int, callbacks: list[pl.Callback]
) -> None:
    """Train ``epochs`` on one CPU thread, no logging or checkpoints."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)


# ---------------------------------------------------------------------------- reporting
def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, target, method), and paired gaps: to the dense
    run of the same seed and optimizer, and for a Bregman method to the better peer of its
    cell with its optimizer (``peer``) and to the better of all peers (``best``)."""
    rows = []
    keys = sorted({(r.task, r.target, r.method) for r in runs}, key=_order)
    by_seed = {(r.task, r.target, r.method, r.seed): r.metric for r in runs}
    for task, target, method in keys:
        group = [r for r in runs if (r.task, r.target, r.method) == (task, target, method)]
        metrics = [r.metric for r in group]
        # Paired with the run of the same seed (same split, data order, init): the spread
        # between splits cancels, so these are the comparisons the goal asks for.
        gaps = _paired(group, dense_of(method), by_seed)
        peer = best = None
        if method in BREGMAN:
            same = [p for p in PEERS if on_adam(p) == on_adam(method)]
            peer = _better_peer(group, by_seed, same)
            best = _better_peer(group, by_seed, list(PEERS))
        peer_gaps = _paired(group, peer, by_seed)
        best_gaps = _paired(group, best, by_seed)
        rows.append(
            {
                "task": task,
                "target": target,
                "method": method,
                "seeds": len(group),
                "metric": statistics.fmean(metrics),
                "metric_std": statistics.pstdev(metrics),
                "vs_dense": statistics.fmean(gaps) if gaps else None,
                "vs_dense_se": _standard_error(gaps),
                "peer": peer,
                "vs_peer": statistics.fmean(peer_gaps) if peer_gaps else None,
                "vs_peer_se": _standard_error(peer_gaps),
                "best": best,
                "vs_best": statistics.fmean(best_gaps) if best_gaps else None,
                "vs_best_se": _standard_error(best_gaps),
                "sparsity": statistics.fmean(r.sparsity for r in group),
                "distance": statistics.fmean(abs(r.sparsity - target) for r in group),
                "f1": _mean([r.f1 for r in group]),
                "exact": _exact([r.f1 for r in group]),
                "found": _mean([r.found for r in group]),
                "seconds": statistics.fmean(r.seconds for r in group),
            }
        )
    return rows


def _better_peer(
    group: list[Run], by_seed: dict[tuple[str, float, str, int], float], peers: list[str]
) -> str | None:
    """The one of ``peers`` with the better mean in ``group``'s cell (higher accuracy,
    lower regression error), among those that ran every seed of ``group``; None if none
    did. Peers whose means tie (on digits, the same number of test images right in all,
    up to float32 rounding) are decided against the method: the one against which its
    paired margin in standard errors (mean / SE, positive when the method is better) is
    the least favourable to it, so a tie never picks the flattering comparison."""
    task, target = group[0].task, group[0].target
    sign = -1.0 if regression(task) else 1.0  # the direction of "better"
    means = {}
    for peer in peers:
        values = [by_seed.get((task, target, peer, r.seed)) for r in group]
        known = [v for v in values if v is not None]
        if known and len(known) == len(values):
            means[peer] = sign * statistics.fmean(known)
    if not means:
        return None
    top = max(means.values())
    tied = [p for p in means if math.isclose(means[p], top, rel_tol=1e-6, abs_tol=1e-12)]

    def margin(peer: str) -> float:
        gaps = _paired(group, peer, by_seed)
        error = _standard_error(gaps)
        lead = sign * statistics.fmean(gaps)
        if error:
            return lead / error
        return math.copysign(math.inf, lead) if lead else 0.0  # the same gap on every seed

    return min(tied, key=margin)


def _paired(
    group: list[Run], other: str | None, by_seed: dict[tuple[str, float, str, int], float]
) -> list[float]:
    """Per seed, the run's metric minus ``other``'s in the same cell, for the seeds
    ``other`` ran (none if there is no other)."""
    if other is None:
        return []
    keys = [(r, (r.task, r.target, other, r.seed)) for r in group]
    return [r.metric - by_seed[key] for r, key in keys if key in by_seed]


def _standard_error(values: list[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n))."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _exact(f1s: list[float | None]) -> int | None:
    """Seeds whose support is the teacher's exactly (F1 1), or None without a teacher."""
    known = [f1 for f1 in f1s if f1 is not None]
    return sum(f1 == 1.0 for f1 in known) if known else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _order(key: tuple[str, float, str]) -> tuple[int, float, int]:
    task, target, method = key
    return TASKS.index(task), target, METHODS.index(method)


def markdown(
    rows: list[dict[str, Any]], epochs: int, seeds: int, split: str = "test", where: str = ""
) -> str:
    adam_lr = optimizer_settings("digits-mlp", "GMP" + ADAM).lr
    adabreg_lr = optimizer_settings("digits-mlp", "AdaBreg").lr
    lines = [
        f"Quality at a target sparsity, {epochs} epochs, mean ± std over {seeds} seed(s), on "
        f"{where or machine()}. digits: {split} accuracy (%); teacher-student (1,000 pairs) "
        f"and teacher-student-few (96 pairs, fewer than the 128 inputs; as many steps): "
        f"{split} relative MSE and support F1 (the mean; in brackets the seeds whose support is "
        f"exactly the teacher's). A digits dense run is listed under every target for "
        f"comparison; the regression's teacher has the target's sparsity, so its dense runs "
        f"are one per target. found: the sparsity a Bregman method's shrinkage had reached "
        f"when its support was frozen; the held set is then made exactly the target "
        f"(magnitude top-up, or release). "
        f"vs dense: the mean difference from the dense run of the same seed and optimizer ± "
        f"its standard error (digits: points; regression: relative MSE). (Adam): the "
        f"reference trained with Adam (lr {adam_lr:g} on digits; AdaBreg's {adabreg_lr:g}, "
        f"each the best of three on validation), not SGD with momentum; AdaBreg at lambda 0 "
        f"is Adam, prox and LinBreg at lambda 0 that SGD. vs peer: the same "
        f"for a Bregman method against the better of ModelPruning and GMP with its optimizer "
        f"in its cell (by mean; of two that tie, the one less favourable to the method in "
        f"standard errors), named; vs best: against the better of all four. "
        f"Each seed has its own digits split.",
        "",
        f"| task | target | method | {split} metric | vs dense | vs peer | vs best | sparsity "
        f"| distance | found | F1 | fit s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        scale, places = (1, 4) if regression(row["task"]) else (100, 2)
        metric = f"{scale * row['metric']:.{places}f} ± {scale * row['metric_std']:.{places}f}"
        gap = "" if tool(row["method"]) == "dense" else _gap(row, "vs_dense", scale, places)
        versus = _gap(row, "vs_peer", scale, places)
        versus += f" ({row['peer']})" if versus else ""
        best = _gap(row, "vs_best", scale, places)
        best += f" ({row['best']})" if best else ""
        f1 = "" if row["f1"] is None else f"{row['f1']:.3f} ({row['exact']}/{row['seeds']})"
        found = "" if row["found"] is None else f"{100 * row['found']:.2f}%"
        lines.append(
            f"| {row['task']} | {100 * row['target']:.0f}% | {row['method']} | {metric} | {gap} "
            f"| {versus} | {best} | {100 * row['sparsity']:.2f}% | {100 * row['distance']:.2f} "
            f"| {found} | {f1} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _gap(row: dict[str, Any], key: str, scale: float, places: int) -> str:
    """``mean ± standard error`` of a paired gap, or "" where there is none."""
    if row[key] is None:
        return ""
    text = f"{scale * row[key]:+.{places}f}"
    if row[f"{key}_se"] is not None:
        text += f" ± {scale * row[f'{key}_se']:.{places}f}"
    return text


def plot(rows: list[dict[str, Any]], runs: list[Run], out: Path, name: str = "quality") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4))
    for ax, task in zip(axes, TASKS, strict=True):
        # Each regression target has its own teacher, dense fit included: plotted against
        # the teacher's sparsity, so each method's error sits beside that teacher's dense fit.
        x = "target" if regression(task) else "sparsity"
        for method in METHODS:
            points = sorted(
                (r[x], r["metric"]) for r in rows if r["task"] == task and r["method"] == method
            )
            if points:
                xs, ys = zip(*points, strict=True)
                style = "o-" if method in BREGMAN else "^:" if on_adam(method) else "s--"
                ax.plot([100 * x for x in xs], ys, style, label=method)
        ax.set_title(task)
        ax.set_xlabel(
            "teacher's sparsity = target (%)" if x == "target" else "achieved sparsity (%)"
        )
        metric = "relative MSE" if regression(task) else "accuracy"
        if regression(task):  # dense fits of 96 pairs err 100x more than pruned ones
            ax.set_yscale("log")
        ax.set_ylabel(f"{runs[0].split if runs else 'test'} {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}_accuracy.png", dpi=120)
    plt.close(fig)

    shown = [r for r in runs if r.task == "digits-mlp" and r.method in BREGMAN and r.seed == 0]
    target = 0.9 if any(r.target == 0.9 for r in shown) else (shown[0].target if shown else 0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in shown:
        if r.target != target or not r.trace:
            continue
        steps = [t[0] for t in r.trace]
        top.plot(steps, [100 * t[1] for t in r.trace], label=r.method)
        bottom.plot(steps, [t[2] for t in r.trace], label=r.method)
    top.axhline(100 * target, color="k", lw=0.8, ls=":")
    top.set_ylabel("sparsity (%)")
    bottom.set_ylabel("lambda")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    top.set_title(f"digits-mlp, target {100 * target:.0f}%, seed 0")
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}_trajectory.png", dpi=120)
    plt.close(fig)


def plan(
    tasks: list[str], methods: list[str], targets: list[float], seeds: int, epochs: int, split: str
) -> list[Run]:
    """The runs to train. A digits dense run does not depend on the target: one per seed,
    at the first target. The regression's teacher has the target's sparsity (its data
    depend on the target), so its dense runs are one per seed and target."""
    return [
        Run(task, method, target, seed, epochs, split)
        for task in tasks
        for target in targets
        for method in methods
        for seed in range(seeds)
        if tool(method) != "dense" or regression(task) or target == targets[0]
    ]


def list_dense_under_every_target(done: list[Run], targets: list[float]) -> list[Run]:
    """``done`` with each digits dense run copied under the other targets, so every cell
    has its dense reference (the regression's dense runs are already per target)."""
    digits_dense = [r for r in done if tool(r.method) == "dense" and not regression(r.task)]
    return done + [Run(**{**asdict(r), "target": t}) for r in digits_dense for t in targets[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="target 90%%, 1 seed, 2 epochs")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="measure on the validation split (choose settings there) or the test split",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (1: in this one)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON, MD, PNG")
    parser.add_argument(
        "--name", default="quality", help="file name stem of what it writes (NAME.json, ...)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-make the table and plots from the runs in a quality.json (runs nothing)",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        report(json.loads(args.from_json.read_text()), args.out, args.name)
        return
    if args.quick:
        args.epochs, args.seeds, args.targets = 2, 1, [0.9]
    runs = plan(args.tasks, args.methods, args.targets, args.seeds, args.epochs, args.split)
    if args.jobs == 1:  # in this process: a worker would import torch and Lightning again
        done = [execute(run) for run in runs]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(execute, runs))
    done = list_dense_under_every_target(done, args.targets)
    report(
        {"epochs": args.epochs, "machine": machine(), "runs": [asdict(r) for r in done]},
        args.out,
        args.name,
    )


def report(results: dict[str, Any], out: Path | None, name: str = "quality") -> None:
    """Summary, table and plots from the raw runs (``results["runs"]``): what a run writes,
    and what ``--from-json`` re-makes from a run's JSON when the report changes."""
    runs = [Run(**{**r, "trace": [tuple(t) for t in r["trace"]]}) for r in results["runs"]]
    rows = summarize(runs)
    seeds = len({r.seed for r in runs})
    where = results.get("machine", "")  # JSONs before 2026-12-04 do not name the machine
    table = markdown(rows, results["epochs"], seeds, runs[0].split, where)
    write(out, name, {**results, "summary": rows}, table, indent=None)
    if out is not None:
        plot(rows, runs, out, name)


if __name__ == "__main__":
    main()
