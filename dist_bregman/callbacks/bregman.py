"""``BregmanPruner``: the seed's Lightning callback, as an adapter over the core.

All decisions live in :class:`~dist_bregman.controller.SparsityController`; this class only
maps Lightning's hooks onto it: build it at ``on_fit_start`` (after ``configure_model`` and
the strategy's wrapping), hook the proximal step onto the optimizers Lightning built,
measure at each epoch start, update lambda every ``update_frequency`` optimizer steps
(``trainer.global_step``), log to every Lightning logger, and carry the state in
checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dist_bregman import logs
from dist_bregman.callbacks.averaging import check_averaging
from dist_bregman.callbacks.metrics import log_on_host
from dist_bregman.callbacks.namespaces import callback_classes
from dist_bregman.compiling import eager
from dist_bregman.config import BregmanConfig, FreezeHold, LambdaRule, Mode, OnNonFinite
from dist_bregman.controller import SparsityController
from dist_bregman.targets import ParameterPairs, shared_targets, validate_pairs


class BregmanPruner(Callback):
    """Drive the model to ``target_sparsity`` with an adaptive L1 (Bregman) penalty.

    Every ``update_frequency`` optimizer steps the global sparsity is measured (one
    all-reduce; every rank gets the same number), rank 0 applies
    ``lambda += lambda_update_rate * (target_sparsity - sparsity)`` clamped to
    ``[min_lambda, max_lambda]``, and broadcasts the result. In the default ``mode="prox"``
    a proximal (soft-thresholding) step with threshold ``lr * lambda`` follows every
    optimizer step and makes exact zeros; see :class:`~dist_bregman.config.BregmanConfig`.

    Add :meth:`get_regularization_loss` to the loss in ``training_step`` as the seed does; in
    ``"prox"`` mode it adds the penalty's value without a second dose of its gradient.
    """

    def __init__(
        self,
        target_sparsity: float = 0.8,
        initial_lambda: float = 1.0,
        lambda_update_rate: float = 0.001,
        update_frequency: int = 100,
        parameters_to_prune: ParameterPairs | None = None,
        verbose: int = 0,
        *,
        min_lambda: float = 0.0,
        max_lambda: float = 100.0,
        lambda_rule: LambdaRule = "additive",
        mode: Mode = "prox",
        regularizer: str = "l1",
        zero_tolerance: float = 0.0,
        on_nonfinite: OnNonFinite = "skip",
        guard_steps: bool = False,
        check_agreement_every: int = 0,
        freeze_support_at: int = 0,
        freeze_hold: FreezeHold = "target",
        magnitude_start_at: int = 0,
        name: str | None = None,
    ) -> None:
        self.config = BregmanConfig(
            target_sparsity=target_sparsity,
            initial_lambda=initial_lambda,
            lambda_update_rate=lambda_update_rate,
            update_frequency=update_frequency,
            min_lambda=min_lambda,
            max_lambda=max_lambda,
            lambda_rule=lambda_rule,
            mode=mode,
            regularizer=regularizer,
            zero_tolerance=zero_tolerance,
            verbose=verbose,
            on_nonfinite=on_nonfinite,
            guard_steps=guard_steps,
            check_agreement_every=check_agreement_every,
            freeze_support_at=freeze_support_at,
            freeze_hold=freeze_hold,
            magnitude_start_at=magnitude_start_at,
            name=name,
        )
        self._metrics = "bregman/" if name is None else f"bregman/{name}/"
        self.parameters_to_prune = (
            None if parameters_to_prune is None else validate_pairs(parameters_to_prune)
        )
        self.controller: SparsityController | None = None
        self._model: torch.nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._averaging: list[str] = []
        """The Trainer's weight-averaging callbacks (all keeping the zeros)."""
        self._fitted_by: int | None = None
        """``id`` of the Trainer whose ``fit`` set this pruner up (see
        :meth:`get_regularization_loss`), until that fit's teardown: an id outlives its
        object, and a Trainer made after the old one is freed may get the same one."""

    # ------------------------------------------------------------------ public surface
    @property
    @override
    def state_key(self) -> str:
        """Where a checkpoint keeps this callback's state: the class name as Lightning's
        default (so unnamed checkpoints load), with the ``name`` of a named one: two
        pruners in one Trainer need two keys."""
        if self.config.name is None:
            return super().state_key
        return self._generate_state_key(name=self.config.name)

    @property
    def current_lambda(self) -> float:
        """Lambda now: identical on every rank."""
        if self.controller is not None:
            return self.controller.lambda_
        if self._pending_state is not None:
            return float(self._pending_state.get("lambda", self.config.initial_lambda))
        return self.config.initial_lambda

    @property
    def current_sparsity(self) -> float | None:
        """The last measured global sparsity in [0, 1], or None before the first."""
        return None if self.controller is None else self.controller.sparsity

    @eager  # a compiled training_step runs it eagerly (dist_bregman.compiling)
    def get_regularization_loss(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """``lambda * J(theta)`` to add to the loss in ``training_step`` (see the class doc).

        Refused while training in a Trainer that was not given this pruner as a callback:
        the term alone prunes nothing (no proximal step, no lambda updates, no zeros held),
        and the run would train dense without a word, sparsity at 0.000% throughout.
        "Given" is read at ``setup``, not from ``trainer.callbacks``: Lightning's learning
        rate and batch size finders swap that list out during their trial steps. Reporting
        the term elsewhere (another Trainer's ``test``) is fine."""
        trainer = _trainer_of(pl_module)
        if getattr(trainer, "training", False) and id(trainer) != self._fitted_by:
            raise RuntimeError(
                f"get_regularization_loss: this BregmanPruner is not among the Trainer's "
                f"callbacks, so nothing would prune (no proximal step, lambda fixed at "
                f"{self.current_lambda:g}); allowed: pass it to the Trainer too, "
                f"pl.Trainer(callbacks=[pruner, ...]), as the model's self.bregman_pruner"
            )
        return self._controller(pl_module).regularization_loss()

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A new fit resolves the targets afresh (the model may be new, or pruned since the
        # last fit) at on_fit_start; lambda and the step of the last update carry over (see
        # on_train_start). validate/test keep the controller (and what attach learned)
        # unless the model changed.
        if stage == "fit":
            self._fitted_by = id(trainer)
        stale = self.controller is not None and self._model is not pl_module
        if self.controller is not None and (stage == "fit" or stale):
            self._pending_state = self.controller.state_dict()
            self.controller = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolved here, not at setup: configure_model, where Lightning's pattern for large
        # models makes the layers, runs after setup. The strategy has wrapped the model by
        # now (DDP, FSDP, a DeepSpeed engine): read the layouts from the wrapper, and act
        # through the optimizers it built.
        self._averaging = check_averaging(trainer, "BregmanPruner")
        controller = self._controller(pl_module)
        controller.bind(trainer.strategy.model or pl_module)
        # A finetuning callback unfreezes frozen layers later (and the controller follows
        # the optimizer's new groups): a target out of reach now holds lambda, not the fit.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        finetuning = any(isinstance(c, callback_classes("BaseFinetuning")) for c in callbacks)
        controller.attach(*trainer.optimizers, strict=not finetuning)
        for other in callbacks:
            if isinstance(other, BregmanPruner) and other is not self and other.controller:
                _check_apart(self.config.name, controller, other.config.name, other.controller)
        self._guard_weights_only_saves(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A new Trainer counts steps from 0 again, while the last update's step (carried
        # over from an earlier fit) belongs to the old count: kept, no update would run until
        # the new count passed it. (Here, not in on_fit_start: a resumed run's step is
        # restored from its checkpoint only after that hook.)
        controller = self._controller(pl_module)
        if trainer.global_step < controller.last_update_step:
            controller.last_update_step = trainer.global_step

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._controller(pl_module).log_epoch(trainer.current_epoch)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        controller = self._controller(pl_module)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            controller.observe_loss(loss)
        controller.update_if_due(trainer.global_step)
        if controller.stop_requested:
            self._stop(trainer, controller)
        report = controller.last_report
        values = {"lambda": controller.lambda_, "sparsity": controller.sparsity}
        if report is not None:
            values.update(
                node_sparsity=report.node_sparsity, kernel_sparsity=report.kernel_sparsity
            )
        for name, value in values.items():
            if value is not None:  # at every step: on a GPU a Python number would sync
                log_on_host(
                    pl_module, self._metrics + name, value, prog_bar=name in ("lambda", "sparsity")
                )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        controller = self._controller(pl_module)
        controller.follow_groups()  # layers unfrozen since the last step get shrunk too
        if not self.config.guard_steps or _grad_scaler(trainer) is not None:
            return
        if not controller.gradients_finite([optimizer], trainer.global_step + 1):
            controller.drop_step([optimizer])

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every rank dumps the checkpoint; refuse (on all of them) to save NaN/Inf weights.
        self._controller(pl_module).check_finite_state(checkpoint.get("state_dict", {}))

    def _guard_weights_only_saves(self, trainer: pl.Trainer) -> None:
        """Refuse weights-only checkpoints of NaN/Inf weights too.

        For those (``ModelCheckpoint(save_weights_only=True)``,
        ``save_checkpoint(weights_only=True)``) Lightning calls no callback's
        ``on_save_checkpoint``: between two measurements such a checkpoint was written from
        NaN weights. This Trainer's ``save_checkpoint`` (every rank calls it) checks the
        model's parameters and buffers first, as they are on each rank (a local pass and
        one all-reduce; no gathering of sharded weights).
        """
        if "save_checkpoint" in vars(trainer):  # guarded at an earlier fit
            return
        save = trainer.save_checkpoint

        def save_checkpoint(
            filepath: Any, weights_only: bool | None = None, storage_options: Any = None
        ) -> None:
            if weights_only:
                module = trainer.lightning_module
                tensors = chain(module.named_parameters(), module.named_buffers())
                self._controller(module).check_finite_state(dict(tensors))
            save(filepath, weights_only, storage_options)

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

    def _stop(self, trainer: pl.Trainer, controller: SparsityController) -> None:
        """``on_nonfinite="stop"``: the bad step never reached the weights (dropped by the
        guard) or only the loss was bad; save a checkpoint of the clean state and stop."""
        controller.stop_requested = False
        path = Path(trainer.default_root_dir) / f"bregman-stop-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        logs.warn0(controller.labelled(f"on_nonfinite='stop': saved {path} and stopping the run"))
        trainer.should_stop = True

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A weight-averaging callback has copied its average into the model by now: measure
        # the model the fit hands back, so that current_sparsity is its sparsity.
        if self._averaging and self.controller is not None:
            report = self.controller.measure()
            if self.config.verbose >= 1:
                held = " and ".join(self._averaging)
                line = f"Fit end: the model holds the {held} average: sparsity "
                logs.info0(self.controller.labelled(line + logs.percent(report.sparsity)))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.controller is not None:
            self.controller.detach()
        if stage == "fit":
            self._fitted_by = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.controller is not None:
            return self.controller.state_dict()
        return dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    # ------------------------------------------------------------------ internals
    def _controller(self, pl_module: torch.nn.Module) -> SparsityController:
        if self.controller is None:
            self.controller = SparsityController(pl_module, self.config, self.parameters_to_prune)
            self._model = pl_module
            if self._pending_state is not None:
                self.controller.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.controller


def _trainer_of(module: torch.nn.Module) -> object | None:
    """The Trainer ``module`` is attached to, or None (outside a fit, or not Lightning's)."""
    try:
        return module.trainer
    except (RuntimeError, AttributeError):  # LightningModule's "not attached to a Trainer"
        return None


def _grad_scaler(trainer: pl.Trainer) -> object | None:
    """The GradScaler of ``precision="16-mixed"``, if any. It already drops every step whose
    unscaled gradients hold Inf/NaN and lowers its scale: overflow is how it calibrates
    (its first steps from a scale of 65536 often overflow), not bad data. The guard leaves
    those steps to it, or each overflow would count as a bad step and, with
    ``on_nonfinite="stop"``, end the run. A NaN loss is still caught at the lambda update."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _check_apart(
    name: str | None,
    controller: SparsityController,
    other_name: str | None,
    other: SparsityController,
) -> None:
    """Refuse two pruners on one weight (two lambdas would shrink it, each steering it to
    its own target) or driving one Bregman optimizer (it holds one lambda for all its
    regularized groups: each pruner's update would overwrite the other's)."""
    names = f"BregmanPruner(name={name!r}) and BregmanPruner(name={other_name!r})"
    shared = shared_targets(controller.targets, other.targets)
    if shared:
        raise ValueError(
            f"parameters_to_prune: {names} both measure and shrink {shared[:5]}; allowed: "
            f"each weight in one pruner's parameters_to_prune"
        )
    driven = {id(o) for o, _ in other.attachment.driven}
    both = [type(o).__name__ for o, _ in controller.attachment.driven if id(o) in driven]
    if both:
        raise ValueError(
            f"{names} both drive one {both[0]}, which holds one lambda for all its "
            f"regularized groups; allowed: one BregmanPruner per Bregman optimizer, or a plain "
            f"optimizer (each pruner's proximal step acts on its own weights)"
        )
