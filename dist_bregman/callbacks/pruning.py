"""``SafeModelPruning``: scheduled magnitude pruning, safe under every strategy.

An adapter over :class:`~dist_bregman.pruning.MagnitudePruner`: prune at the end of every
``prune_every`` epochs (or steps) to the scheduled amount, keep the masks through every
optimizer step, re-derive them on resume, and release them at the end of ``fit``.
Where it differs from Lightning's ``ModelPruning``: the amount is the fraction of the set
that is zero after the event (not a fraction of what is left, which compounds), masks are
computed from every rank's shards and are identical everywhere, and there is no
lottery-ticket copy taken before DDP broadcasts the weights.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dist_bregman import logs
from dist_bregman.callbacks.averaging import check_averaging
from dist_bregman.callbacks.metrics import log_on_host
from dist_bregman.config import check_name
from dist_bregman.pruning import (
    MagnitudePruner,
    PruningConfig,
    PruningEvent,
    Schedule,
    scheduled_amount,
)
from dist_bregman.targets import ParameterPairs, shared_targets, validate_pairs


class SafeModelPruning(Callback):
    """Scheduled magnitude pruning (``amount`` -> ``final_amount`` over ``epochs_to_ramp``).

    Works beside :class:`~dist_bregman.BregmanPruner` in one ``Trainer``: zeros either of
    them makes count toward the other's numbers, and both report the same sparsity for
    the same parameters. See :class:`~dist_bregman.pruning.PruningConfig` for every setting.
    """

    def __init__(
        self,
        amount: float = 0.5,
        scheduled_pruning: bool = False,
        final_amount: float | None = None,
        epochs_to_ramp: int = 10,
        *,
        schedule: Schedule = "cubic",
        structured: bool = False,
        dim: int = 0,
        norm: float = 1.0,
        use_global: bool = True,
        parameters_to_prune: ParameterPairs | None = None,
        prune_every: int = 1,
        prune_unit: Literal["epoch", "step"] = "epoch",
        make_permanent_at_end: bool = True,
        verbose: int = 0,
        name: str | None = None,
    ) -> None:
        self.config = PruningConfig(
            amount=amount,
            scheduled_pruning=scheduled_pruning,
            final_amount=final_amount,
            epochs_to_ramp=epochs_to_ramp,
            schedule=schedule,
            structured=structured,
            dim=dim,
            norm=norm,
            use_global=use_global,
            prune_every=prune_every,
            prune_unit=prune_unit,
            make_permanent_at_end=make_permanent_at_end,
            verbose=verbose,
        )
        self.parameters_to_prune = (
            None if parameters_to_prune is None else validate_pairs(parameters_to_prune)
        )
        check_name("name", name)
        self.name = name
        """Names this callback where several prune one model (each its own weights, e.g.
        filters of the convolutions and elements of the linear layers): ``[name]`` starts
        its log lines and it keys the checkpoint state and logged metrics."""
        self._metrics = "pruning/" if name is None else f"pruning/{name}/"
        self.pruner: MagnitudePruner | None = None
        self.last_event: int | None = None
        """The epoch (or step) of the last pruning event."""
        self.last: PruningEvent | None = None
        """The last pruning event of this process (None before it, also after a resume)."""
        self._amount: float | None = None
        self._averaging: list[str] = []
        """The Trainer's weight-averaging callbacks (all keeping the zeros)."""
        self._pruned_at_step: int | None = None
        """The step this fit last pruned at: ``global_step`` stays put over the micro-batches
        of one optimizer step (gradient accumulation), and one event is due per step."""

    @property
    def current_amount(self) -> float | None:
        """The amount of the last pruning event (restored from checkpoints), or None
        before the first."""
        return self._amount

    @property
    @override
    def state_key(self) -> str:
        """The class name as Lightning's default (unnamed checkpoints load), with the
        ``name`` of a named one: two callbacks in one Trainer need two keys."""
        if self.name is None:
            return super().state_key
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolved at each fit, here: after configure_model (where Lightning's pattern for
        # large models makes the layers) and the strategy's wrapping.
        self._averaging = check_averaging(trainer, "SafeModelPruning")
        pruner = self.pruner = MagnitudePruner(pl_module, self.config, self.parameters_to_prune)
        pruner.bind(trainer.strategy.model or pl_module)
        pruner.attach(*trainer.optimizers)
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(other, SafeModelPruning) and other is not self and other.pruner:
                shared = shared_targets(pruner.targets, other.pruner.targets)
                if shared:
                    raise ValueError(
                        f"parameters_to_prune: SafeModelPruning(name={self.name!r}) and "
                        f"SafeModelPruning(name={other.name!r}) both prune {shared[:5]}; "
                        f"allowed: each weight in one of their parameters_to_prune"
                    )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming mid-schedule: the weights are restored by now, their zeros are the masks.
        if self.last_event is not None:
            self._pruner().derive_masks()
        # A resume continues the step count (an event at the restored step was made); a new
        # Trainer counts from 0 again, and its event at the last event's step is a new one.
        resumed_at_event = (
            self.config.prune_unit == "step" and trainer.global_step == self.last_event
        )
        self._pruned_at_step = self.last_event if resumed_at_event else None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.config.prune_unit == "epoch"
            and (trainer.current_epoch + 1) % self.config.prune_every == 0
        ):
            self._event(trainer.current_epoch, pl_module)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        due = step > 0 and step % self.config.prune_every == 0 and step != self._pruned_at_step
        if self.config.prune_unit == "step" and due:
            self._event(step, pl_module)
            self._pruned_at_step = step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.pruner is not None:
            self.pruner.follow_groups()  # layers unfrozen since the last step keep their zeros

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A weight-averaging callback has copied its average into the model by now, and an
        # average last updated before the last pruning event (SWA updates at epoch starts,
        # EMA after each step; epoch events come at epoch ends) lacks its zeros: make them.
        if self._averaging and self.pruner is not None and self.pruner.active:
            self.pruner.enforce()
        if self.config.make_permanent_at_end and self.pruner is not None:
            self.pruner.release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruner is not None:
            self.pruner.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "last_event": self.last_event, "amount": self.current_amount}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_event = state_dict.get("last_event")
        amount = state_dict.get("amount")
        self._amount = None if amount is None else float(amount)

    # ------------------------------------------------------------------ internals
    def _event(self, unit: int, pl_module: pl.LightningModule) -> None:
        amount = scheduled_amount(unit, self.config)
        if self._amount is not None:
            # The schedule only rises, so this changes nothing within one run or on a
            # resume; a new Trainer counts epochs and steps from 0 again, and its first
            # amounts would free zeros the schedule had already reached.
            amount = max(amount, self._amount)
        event = self._pruner().prune(amount)
        self.last, self.last_event, self._amount = event, unit, amount
        report, config = event.report, self.config
        label = "" if self.name is None else f"[{self.name}] "
        if report.nonfinite:  # NaN/Inf sort above every magnitude: they are never pruned
            logs.warn0(
                f"{label}SafeModelPruning: {config.prune_unit} {unit}: {report.nonfinite} "
                f"non-finite (NaN/Inf) weight elements on rank(s) {list(report.nonfinite_ranks)}"
                f"; they are kept, not pruned (lower the learning rate, or clip gradients)"
            )
        if config.verbose:
            scope = "global" if config.use_global else "per tensor"
            kind = "structured" if config.structured else "unstructured"
            zeros = f"{report.total - report.nonzero}/{report.total} zero"
            sparsity = logs.percent(report.sparsity)
            logs.info0(
                f"{label}SafeModelPruning: {config.prune_unit} {unit}: pruned to "
                f"{100 * amount:.3f}% ({scope}, {kind}); sparsity {sparsity} ({zeros})"
            )
        log_on_host(pl_module, self._metrics + "amount", amount)
        log_on_host(pl_module, self._metrics + "sparsity", report.sparsity)

    def _pruner(self) -> MagnitudePruner:
        if self.pruner is None:
            raise RuntimeError("SafeModelPruning is used before Trainer.fit set it up")
        return self.pruner
