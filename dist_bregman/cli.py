"""The ``dist-bregman`` command: LightningCLI on the digits job, then a summary and a report.

    dist-bregman fit                                  # the default job (digits.yaml here)
    dist-bregman fit --config configs/digits_linbreg.yaml
    python -m dist_bregman fit --trainer.max_epochs=5

Without ``--config`` or ``--model`` a subcommand runs the default job, ``digits.yaml`` in
this package (``configs/digits.yaml`` in the repository links to it), so an installed
package runs it from any directory; other options still apply on top of it.

After ``fit`` it tests the final (sparse) weights, prints test accuracy, final sparsity and
final lambda, and writes ``summary.json``, ``sparsity_lambda.png`` and
``model_sparse.safetensors`` (a sharded model's whole weights gathered first) with its
dense-vs-sparse byte report beside the logger's ``metrics.csv``
(``runs/<name>/version_N/`` with the default config). Sparsity is
measured over the BregmanPruner's set, else a SafeModelPruning's, else the discovered
weights; lambda and its plot need a BregmanPruner.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from dist_bregman import comm
from dist_bregman.callbacks.bregman import BregmanPruner
from dist_bregman.callbacks.pruning import SafeModelPruning
from dist_bregman.export import export_sparse, gather_state_dict
from dist_bregman.report import plot_sparsity_lambda, write_summary
from dist_bregman.shards import locate
from dist_bregman.sparsity import reduce_counts
from dist_bregman.strategies import DeepSpeedLauncherEnvironment


class BregmanCLI(LightningCLI):
    """LightningCLI whose ``fit`` ends with a test of the sparse model and a report."""

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, reading its ranks from the ``deepspeed`` launcher when it started
        this process (unless the config names a cluster environment)."""
        if DeepSpeedLauncherEnvironment.detect():
            configured = self._get(self.config_init, "trainer", default={}).get("plugins")
            plugins = configured if isinstance(configured, list) else [configured]
            plugins = [p for p in plugins if p is not None]
            if not any(isinstance(p, ClusterEnvironment) for p in plugins):
                kwargs["plugins"] = [*plugins, DeepSpeedLauncherEnvironment()]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` as given. :func:`main` passes the command line itself (with the
        default job put in), which LightningCLI took for a mistake and warned about at the
        top of every run: "args parameter is intended to run from within Python"."""
        if isinstance(args, list):
            self.config = parser.parse_args(args)
        else:
            super().parse_arguments(parser, args)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        accuracy = float(results[0].get("test/acc", float("nan"))) if results else float("nan")
        summary: dict[str, float | int | str | None] = {"test_accuracy": accuracy}
        line = f"test accuracy {100 * accuracy:.2f}%"
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        pruner = next((c for c in callbacks if isinstance(c, BregmanPruner)), None)
        pruning = next((c for c in callbacks if isinstance(c, SafeModelPruning)), None)
        controller = pruner.controller if pruner is not None else None
        # Every rank runs after_fit: the measurement below is a collective.
        if pruner is not None and controller is not None:
            placements = controller.placements
            report = controller.measure()
            target: float | None = pruner.config.target_sparsity
        else:  # SafeModelPruning alone, or no pruner: its set, else the discovered weights
            wrapped = trainer.strategy.model or self.model
            pairs = pruning.parameters_to_prune if pruning is not None else None
            placements = locate(wrapped, pairs)
            report, _ = reduce_counts(placements, agree=True)
            target = None
            if pruning is not None:  # where its schedule ends
                config = pruning.config
                target = config.final_amount if config.scheduled_pruning else config.amount
        summary |= {
            "final_sparsity": report.sparsity,
            "target_sparsity": target,
            "nonzero": report.nonzero,
            "total": report.total,
        }
        line += f" | final sparsity {100 * report.sparsity:.3f}%"
        if target is not None:
            line += f" (target {100 * target:.1f}%)"
        if controller is not None:
            summary["final_lambda"] = controller.lambda_
            line += f" | final lambda {controller.lambda_:.8f}"
        if report.node_sparsity is not None:
            summary |= {"zero_rows": report.zero_rows, "rows": report.rows}
            line += f" | zero rows {report.zero_rows}/{report.rows}"
        if report.kernel_sparsity is not None:
            summary |= {"zero_kernels": report.zero_kernels, "kernels": report.kernels}
            line += f" | zero kernels {report.zero_kernels}/{report.kernels}"
        # Collectives, so every rank runs them: trainer.log_dir under DDP, and the gathering
        # of a sharded model's whole weights for the export.
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        whole = None
        if any(p.sharded for p in placements):
            whole = gather_state_dict(trainer.strategy.model or self.model)
        if not comm.is_rank_zero():
            return
        folder.mkdir(parents=True, exist_ok=True)
        summary["global_step"] = trainer.global_step
        path = folder / "model_sparse.safetensors"
        layers = export_sparse(self.model, path, state_dict=whole)
        summary["export_dense_bytes"] = sum(layer.dense_bytes for layer in layers)
        summary["export_sparse_bytes"] = sum(layer.sparse_bytes for layer in layers)
        write_summary(folder, summary)
        metrics = folder / "metrics.csv"
        if metrics.exists() and pruner is not None:
            plot_sparsity_lambda(
                metrics, pruner.config.target_sparsity, folder / "sparsity_lambda.png"
            )
        print(f"\n== dist-bregman summary == {line}\n   report: {folder}", flush=True)


DEFAULT_JOB = Path(__file__).with_name("digits.yaml")
"""The default job's config: an MLP on scikit-learn's digits, 90% sparse (``make run``)."""

SUBCOMMANDS = ("fit", "validate", "test", "predict")

DESCRIPTION = (
    "Train a model to a target sparsity with Bregman regularization (LightningCLI). A "
    "subcommand without --config or --model runs the default job: an MLP on scikit-learn's "
    "digits, 90% sparse (dist-bregman fit)."
)


def with_default_job(args: list[str]) -> list[str]:
    """``args`` with ``--config DEFAULT_JOB`` after the subcommand when they name neither a
    config nor a model (LightningCLI would stop: "the following arguments are required:
    fit.model")."""
    if not args or args[0] not in SUBCOMMANDS:
        return args
    named = any(a in ("-c", "--config") or a.startswith(("--config=", "--model")) for a in args)
    return args if named else [args[0], "--config", str(DEFAULT_JOB), *args[1:]]


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dist-bregman`` and ``python -m dist_bregman``."""
    cli = BregmanCLI(
        args=with_default_job(sys.argv[1:] if args is None else args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False, "description": DESCRIPTION},
    )
    # Release the trainer (and the wrappers holding process groups) before the groups go:
    # gloo teardown at interpreter exit was seen to abort or hang (see comm.shutdown).
    del cli
    gc.collect()
    comm.shutdown()


if __name__ == "__main__":
    main()
