"""Trial runs of quality.py's tasks on fewer training examples, at scaled lrs: the script
behind the 2026-12-06 sections of quality_trials.md (validation splits, unless ``--split
test`` for a check of what validation showed; nothing here is in the published tables).

    # the few-pair regression before it was a task: 96 of the 1,000 pairs, 300 epochs,
    # every method at 20x the 1,000-pair task's lrs (SGD 0.4, Adam 0.2); the lr grid ran
    # with prox capped at 0.3 (its cap then), the cap trial at 0.1 and 0.03
    python benchmarks/quality_trial.py --task teacher-student --examples 96 --epochs 300 \\
        --lr-mult 20 --prox-cap 0.3
    # digits with a tenth of the training images (126), 300 epochs, the shipped lrs
    python benchmarks/quality_trial.py --task digits-mlp --examples 126 --epochs 300
    # MNIST-1D (the dev extra installs mnist1d) in place of digits: the same settings
    python benchmarks/quality_trial.py --task digits-mlp --data mnist1d --epochs 30
    # its CNN with the convolution weights at lambda_scale 0.5 (LinBreg, AdaBreg, prox)
    python benchmarks/quality_trial.py --task digits-cnn --data mnist1d --epochs 30 \\
        --conv-lambda-scale 0.5

Each worker process replaces quality.py's data, lr, prox and lambda settings by the ones
asked for (``_apply``, the pool's initializer); this process is left as it is.

``--data mnist1d``: the digits tasks on MNIST-1D (Greydanus, 2020; the ``mnist1d``
package generates it, no download), a harder 10-class task of 5,000 signals of length
40 on which a dense MLP stays far below a CNN: the digits models with 40 inputs
(``SignalMLP``) and with 1-D convolutions (``SignalCNN``), each seed its own stratified
70/15/15 split of the 5,000 (as digits), the signals as the package scales them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import statistics
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import quality
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from dist_bregman import BregmanPruner, measure_sparsity
from dist_bregman.digits import Splits
from dist_bregman.models import DigitsClassifier, OptimizerSettings


def _first(data: TensorDataset, examples: int | None) -> TensorDataset:
    x, y = data.tensors
    return TensorDataset(x[:examples], y[:examples])


@functools.cache
def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 MNIST-1D signals and labels, as the package makes them by default (its
    fixed seed; it reseeds Python's and numpy's global generators, restored here)."""
    from mnist1d.data import get_dataset_args, make_dataset

    states = random.getstate(), np.random.get_state()
    data = make_dataset(get_dataset_args())
    random.setstate(states[0])
    np.random.set_state(states[1])
    return np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])


def mnist1d_splits(seed: int, images: bool) -> Splits:
    """A stratified 70/15/15 split of MNIST-1D drawn by ``seed``; ``images``: ``(1, 40)``."""
    x, y = _mnist1d()
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.15, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.15 / 0.85, random_state=seed, stratify=y_rest
    )

    def dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor(features, dtype=torch.float32)
        inputs = inputs.unsqueeze(1) if images else inputs
        return TensorDataset(inputs, torch.as_tensor(labels, dtype=torch.long))

    return Splits(dataset(x_train, y_train), dataset(x_val, y_val), dataset(x_test, y_test))


class _SignalClassifier(DigitsClassifier):
    """The digits models' steps and param groups (Conv1d weights regularized too)."""

    def __init__(self, optimizer: str, lr: float, momentum: float) -> None:
        super().__init__(OptimizerSettings(name=optimizer, lr=lr, momentum=momentum))


class SignalMLP(_SignalClassifier):
    """``DigitsMLP``'s 256-128 hidden layers on 40 inputs."""

    def __init__(self, optimizer: str, lr: float, momentum: float, seed: int) -> None:
        super().__init__(optimizer, lr, momentum)
        torch.manual_seed(seed)
        sizes = [40, 256, 128]
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


class SignalCNN(_SignalClassifier):
    """Three 1-D convolutions of 32 channels (two 2x max-pools), a hidden Linear of 64."""

    def __init__(self, optimizer: str, lr: float, momentum: float, seed: int) -> None:
        super().__init__(optimizer, lr, momentum)
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Flatten(),
            nn.Linear(32 * 10, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )


def _scale_conv_lambda(scale: float) -> None:
    """Give convolution weights (``ndim >= 3``) their own param groups at ``lambda_scale``
    ``scale`` (the library's key): the pruner still drives one lambda to the global target,
    and LinBreg/AdaBreg's ``set_lambda`` and the proximal step (prox) apply ``scale`` times
    it to the convolutions, moving sparsity between the layers. The peers' optimizers get
    the same groups, which nothing reads without a pruner."""
    build = OptimizerSettings.build

    def split(self: OptimizerSettings, params: Any) -> torch.optim.Optimizer:
        groups = []
        for group in params:
            for conv in (True, False):
                chosen = [p for p in group["params"] if (p.ndim >= 3) == conv]
                if chosen:
                    groups.append(
                        {**group, "params": chosen} | ({"lambda_scale": scale} if conv else {})
                    )
        return build(self, groups)

    OptimizerSettings.build = split


def _record_layers() -> None:
    """After each fit, keep the sparsity of every measured weight on the run (``layers``,
    name to sparsity; an attribute beside the dataclass fields, so it travels back from
    the worker but stays out of the JSON)."""
    fit = quality._fit

    def fit_and_record(module: Any, loader: Any, epochs: int, callbacks: list[Any]) -> None:
        fit(module, loader, epochs, callbacks)
        report = measure_sparsity(module)
        run = next(c.run for c in callbacks if isinstance(c, quality.Trace))
        run.layers = {name: 1 - nz / n for name, (nz, n) in report.per_parameter.items()}

    quality._fit = fit_and_record


def _apply(
    examples: int | None,
    lr_mult: float,
    prox_cap: float,
    data: str = "digits",
    conv_lambda_scale: float = 1.0,
    layers: bool = False,
) -> None:
    """Replace quality.py's training data, lrs and prox cap in this (worker) process."""
    if conv_lambda_scale != 1.0:
        _scale_conv_lambda(conv_lambda_scale)
    if layers:
        _record_layers()
    if data == "mnist1d":
        quality.digits_splits = mnist1d_splits
        quality.DigitsMLP, quality.DigitsCNN = SignalMLP, SignalCNN
    teacher_data, digits_splits = quality.teacher_data, quality.digits_splits
    optimizer_settings, bregman_pruner = quality.optimizer_settings, quality.bregman_pruner

    def fewer_pairs(sparsity: float, seed: int, pairs_to_fit: int = 1000) -> Any:
        teacher, train, test, val = teacher_data(sparsity, seed, pairs_to_fit)
        return teacher, _first(train, examples), test, val

    def fewer_images(seed: int, images: bool) -> Any:
        splits = digits_splits(seed=seed, images=images)
        return dataclasses.replace(splits, train=_first(splits.train, examples))

    def scaled(task: str, method: str) -> Any:
        settings = optimizer_settings(task, method)
        return dataclasses.replace(settings, lr=settings.lr * lr_mult)

    def capped(
        task: str, method: str, target: float, freeze_at: int, start_at: int = 0
    ) -> BregmanPruner:
        pruner = bregman_pruner(task, method, target, freeze_at, start_at)
        if method == "BregmanPruner (prox)" and prox_cap:
            pruner.config = dataclasses.replace(pruner.config, max_lambda=prox_cap)
        return pruner

    quality.teacher_data, quality.digits_splits = fewer_pairs, fewer_images
    quality.optimizer_settings, quality.bregman_pruner = scaled, capped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=quality.TASKS, default="teacher-student")
    parser.add_argument("--examples", type=int, default=None, help="training examples kept")
    parser.add_argument("--data", choices=("digits", "mnist1d"), default="digits")
    parser.add_argument(
        "--conv-lambda-scale",
        type=float,
        default=1.0,
        help="conv weights' lambda_scale (LinBreg, AdaBreg, prox)",
    )
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr-mult", type=float, default=1.0)
    parser.add_argument("--prox-cap", type=float, default=0.0, help="0: quality.py's cap")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(quality.METHODS))
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON, MD, PNG")
    parser.add_argument("--name", default="trial", help="file name stem of what it writes")
    parser.add_argument("--layers", action="store_true", help="print each weight's sparsity")
    parser.add_argument(
        "--split", choices=("val", "test"), default="val", help="test: a check, never a choice"
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 2
    runs = quality.plan(
        [args.task], args.methods, args.targets, args.seeds, args.epochs, args.split
    )
    setting = (args.examples, args.lr_mult, args.prox_cap, args.data, args.conv_lambda_scale)
    setting += (args.layers,)
    with ProcessPoolExecutor(2, get_context("spawn"), _apply, setting) as pool:
        done = list(pool.map(quality.execute, runs))
    done = quality.list_dense_under_every_target(done, args.targets)
    if args.out is not None:  # the runs, a table and plots, as quality.py writes them
        runs = [dataclasses.asdict(run) for run in done]
        quality.report({"epochs": args.epochs, "runs": runs}, args.out, args.name)
    for row in quality.summarize(done):
        scale, places = (1, 4) if quality.regression(row["task"]) else (100, 2)
        f1 = "" if row["f1"] is None else f" F1 {row['f1']:.3f} ({row['exact']})"
        gaps = ""
        for key in ("vs_dense", "vs_peer", "vs_best"):
            if key == "vs_dense" and quality.tool(row["method"]) == "dense":
                continue
            gap = quality._gap(row, key, scale, places)
            name = row.get(key.removeprefix("vs_"))
            gaps += f" {key} {gap}" + (f" ({name})" if name else "") if gap else ""
        metric = f"{scale * row['metric']:.{places}f}"
        print(f"{100 * row['target']:.0f}% {row['method']:22s} {metric}{gaps}{f1}")
    if args.layers:  # each method's mean sparsity per weight over its seeds
        for target in args.targets:
            for method in args.methods:
                group = [
                    r.layers
                    for r in done
                    if (r.method, r.target) == (method, target) and hasattr(r, "layers")
                ]
                if not group:  # a dense run copied under another target
                    continue
                means = {k: statistics.fmean(g[k] for g in group) for k in group[0]}
                cells = " ".join(f"{k}: {100 * v:.1f}%" for k, v in means.items())
                print(f"{100 * target:.0f}% {method:22s} sparsity per weight {cells}")


if __name__ == "__main__":
    main()
