"""Trial runs of quality.py's tasks on fewer training examples, at scaled lrs: the script
behind the 2026-12-06 sections of quality_trials.md (validation splits; nothing here is in
the published tables).

    # the few-pair regression before it was a task: 96 of the 1,000 pairs, 300 epochs,
    # every method at 20x the 1,000-pair task's lrs (SGD 0.4, Adam 0.2); the lr grid ran
    # with prox capped at 0.3 (its cap then), the cap trial at 0.1 and 0.03
    python benchmarks/quality_trial.py --task teacher-student --examples 96 --epochs 300 \\
        --lr-mult 20 --prox-cap 0.3
    # digits with a tenth of the training images (126), 300 epochs, the shipped lrs
    python benchmarks/quality_trial.py --task digits-mlp --examples 126 --epochs 300

Each worker process replaces quality.py's data, lr and prox settings by the ones asked
for (``_apply``, the pool's initializer); this process is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import quality
from torch.utils.data import TensorDataset

from dist_bregman import BregmanPruner


def _first(data: TensorDataset, examples: int) -> TensorDataset:
    x, y = data.tensors
    return TensorDataset(x[:examples], y[:examples])


def _apply(examples: int, lr_mult: float, prox_cap: float) -> None:
    """Replace quality.py's training data, lrs and prox cap in this (worker) process."""
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
    parser.add_argument("--examples", type=int, required=True, help="training examples kept")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr-mult", type=float, default=1.0)
    parser.add_argument("--prox-cap", type=float, default=0.0, help="0: quality.py's cap")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(quality.METHODS))
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 2
    runs = quality.plan([args.task], args.methods, args.targets, args.seeds, args.epochs, "val")
    setting = (args.examples, args.lr_mult, args.prox_cap)
    with ProcessPoolExecutor(2, get_context("spawn"), _apply, setting) as pool:
        done = list(pool.map(quality.execute, runs))
    done = quality.list_dense_under_every_target(done, args.targets)
    for row in quality.summarize(done):
        scale = 1 if quality.regression(row["task"]) else 100
        f1 = "" if row["f1"] is None else f" F1 {row['f1']:.3f} ({row['exact']})"
        best = "" if row["vs_best"] is None else f" vs best {scale * row['vs_best']:+.4f}"
        metric = f"{scale * row['metric']:.4f}"
        print(f"{100 * row['target']:.0f}% {row['method']:22s} {metric}{best}{f1}")


if __name__ == "__main__":
    main()
