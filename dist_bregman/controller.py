"""The framework-free core: measure, decide lambda, make zeros.

Lightning's :class:`~dist_bregman.BregmanPruner` is a thin adapter over this class; a raw
``torchrun`` loop uses it directly (see ``examples/raw_torchrun.py``)::

    controller = SparsityController(model, BregmanConfig(target_sparsity=0.9, verbose=1))
    controller.attach(optimizer)            # proximal step after every optimizer.step()
    for step, (x, y) in enumerate(loader, start=1):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.observe_loss(loss)       # no host sync
        controller.update_if_due(step)      # every update_frequency steps:
                                            #   1 all-reduce + 1 broadcast

Every rank must call :meth:`update_if_due` with the same step: it is a collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dist_bregman import comm, logs
from dist_bregman.config import BregmanConfig, check_number
from dist_bregman.control import LambdaDecision, decide
from dist_bregman.optim import BregmanOptimizer
from dist_bregman.regularizers import GroupL1, Regularizer
from dist_bregman.regularizers import resolve as resolve_regularizer
from dist_bregman.sparsity import SparsityReport, reduce_counts
from dist_bregman.targets import ParameterPairs, Target, resolve

STATE_VERSION = 1


class SparsityController:
    """Holds lambda and the measured set of one model; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: BregmanConfig | None = None,
        parameters_to_prune: ParameterPairs | None = None,
        *,
        regularizer: Regularizer | None = None,
        group: comm.ProcessGroup = None,
    ) -> None:
        self.config = config if config is not None else BregmanConfig()
        self.targets: list[Target] = resolve(model, parameters_to_prune)
        chosen = resolve_regularizer(
            regularizer if regularizer is not None else self.config.regularizer
        )
        assert chosen is not None
        self.regularizer: Regularizer = chosen
        self.group = group
        self.lambda_ = self.config.initial_lambda
        self.last_update_step = 0
        self.last_report: SparsityReport | None = None
        self.sparsity: float | None = None
        """The last measured global sparsity (restored from checkpoints), None before any."""
        self._nonfinite_loss: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._driven: list[BregmanOptimizer] = []
        self._hooked: set[int] = set()
        self._regularized: set[int] = set()
        self.structure = isinstance(self.regularizer, GroupL1)
        """Count all-zero rows/kernels too (on whenever a group regularizer is in play)."""

    # ------------------------------------------------------------------ measuring
    def measure(self) -> SparsityReport:
        """Global sparsity of the targets (a collective: every rank must call it)."""
        report, _ = reduce_counts(
            self.targets,
            zero_tolerance=self.config.zero_tolerance,
            group=self.group,
            structure=self.structure,
        )
        self.last_report, self.sparsity = report, report.sparsity
        return report

    def log_epoch(self, epoch: int) -> SparsityReport:
        """Measure and log ``Epoch N: Sparsity of pruned modules = ...`` (verbose >= 1)."""
        report = self.measure()
        if self.config.verbose >= 1:
            logs.info0(logs.epoch_line(epoch, report.sparsity))
        self._log_details(report)
        return report

    # ------------------------------------------------------------------ lambda
    def observe_loss(self, loss: torch.Tensor | float | None) -> None:
        """Remember, without a host sync, whether a non-finite loss was seen on this rank.

        The flag travels in the next measurement's all-reduce, so every rank learns that
        some rank saw a NaN/Inf and all of them skip that lambda update together.
        """
        if loss is None:
            return
        bad = ~torch.isfinite(torch.as_tensor(loss).detach()).all()
        self._nonfinite_loss = bad if self._nonfinite_loss is None else self._nonfinite_loss | bad

    def update_if_due(self, step: int) -> LambdaDecision | None:
        """Run :meth:`update` when ``step`` is a new multiple of ``update_frequency``."""
        if step <= self.last_update_step or step % self.config.update_frequency != 0:
            return None
        return self.update(step)

    def update(self, step: int) -> LambdaDecision:
        """Measure, let rank 0 apply the lambda rule, broadcast, log. A collective."""
        config = self.config
        flag = self._nonfinite_loss if self._nonfinite_loss is not None else torch.tensor(False)
        self._nonfinite_loss = None
        report, (bad_ranks,) = reduce_counts(
            self.targets,
            zero_tolerance=config.zero_tolerance,
            group=self.group,
            structure=self.structure,
            extra=[flag],
        )
        self.last_report, self.sparsity = report, report.sparsity
        skip = None
        if bad_ranks:
            skip = f"non-finite loss on {bad_ranks} rank(s) since step {self.last_update_step}"
        decision = decide(
            self.lambda_,
            report.sparsity,
            target=config.target_sparsity,
            rate=config.lambda_update_rate,
            min_lambda=config.min_lambda,
            max_lambda=config.max_lambda,
            rule=config.lambda_rule,
            skip_reason=skip,
            group=self.group,
        )
        self._set_lambda(decision.new)
        self.last_update_step = step
        if decision.skipped:
            logs.warn0(
                f"Step {step}: lambda update {decision.reason}; lambda stays {decision.new:.8f}"
            )
        if config.verbose >= 1:
            logs.info0(logs.decision_line(decision))
            logs.info0(logs.step_line(step, report.sparsity, decision.new))
        self._log_details(report)
        return decision

    def _set_lambda(self, value: float) -> None:
        if value != self.lambda_:
            for optimizer in self._driven:
                optimizer.set_lambda(value)
        self.lambda_ = value

    # ------------------------------------------------------------------ the penalty
    def regularization_loss(self) -> torch.Tensor:
        """``lambda * J(theta)`` over the effective weights, for the training loss.

        In ``"loss"`` mode this term is the mechanism: its gradient is the L1 subgradient.
        In ``"prox"`` mode the proximal step already applies the strength once per step,
        so the term is returned as a value whose gradient does not reach the weights:
        adding it reports the true objective and leaves the update exactly unchanged.
        """
        if self.config.mode == "loss":
            return self.lambda_ * self._penalty()
        with torch.no_grad():
            value = self.lambda_ * self._penalty()
        return value.requires_grad_()

    def _penalty(self) -> torch.Tensor:
        terms = [self.regularizer.value(t.effective()).float() for t in self.targets]
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ the proximal step
    def attach(self, *optimizers: torch.optim.Optimizer) -> None:
        """Make these optimizers apply the regularization, with this controller's lambda.

        * A :class:`~dist_bregman.optim.BregmanOptimizer` (LinBreg, AdaBreg, ProxSGD)
          regularizes inside its own step: its regularized param groups get lambda now and
          after every update, through ``set_lambda`` (which keeps its state consistent).
        * Any other optimizer gets the proximal step of ``regularizer`` after every
          ``step()`` (``"prox"`` mode): threshold ``lr * lambda`` with each param group's
          current ``lr``, applied to the tensors the optimizer holds.

        Every trainable target must be held by one of the optimizers. Targets left
        unregularized (frozen, or in a group with ``reg=None``) are measured only, and the
        target must be reachable without them: checked here, with a collective.
        """
        self.detach()
        mode = self.config.mode
        wanted = {id(t.values): t for t in self.targets if t.values.requires_grad}
        held: set[int] = set()
        for optimizer in optimizers:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            ids &= wanted.keys()
            if not ids:
                continue
            held |= ids
            if isinstance(optimizer, BregmanOptimizer):
                if mode == "loss":
                    raise ValueError(
                        f"mode='loss' with {type(optimizer).__name__}: the optimizer already "
                        f"applies the regularizer, the loss term would apply it again; "
                        f"allowed: mode='prox' (the default)"
                    )
                optimizer.set_lambda(self.lambda_)
                self._driven.append(optimizer)
                self._regularized |= ids & {id(p) for p in optimizer.regularized_params()}
                self.structure |= _uses_groups(optimizer)
            elif mode == "prox":
                self._handles.append(optimizer.register_step_post_hook(self._after_step))
                self._hooked |= ids
        missing = [t.name for key, t in wanted.items() if key not in held]
        if missing:
            raise ValueError(
                f"parameters_to_prune: {missing} are trainable but no optimizer holds them; "
                f"allowed: parameters passed to the optimizer, or frozen (requires_grad=False)"
            )
        self._regularized |= self._hooked if mode == "prox" else held
        self._check_reachable()
        self._warn_if_shrinkage_wipes_out(optimizers)

    def _check_reachable(self) -> None:
        """Raise if ``target_sparsity`` needs zeros in tensors nothing regularizes."""
        report = self.measure()
        unregularized = [t for t in self.targets if id(t.values) not in self._regularized]
        if not unregularized:
            return
        fixed, _ = reduce_counts(
            unregularized, zero_tolerance=self.config.zero_tolerance, group=self.group
        )
        reachable = 1.0 - fixed.nonzero / report.total
        if self.config.target_sparsity > reachable:
            names = [t.name for t in unregularized]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(
                f"target_sparsity={self.config.target_sparsity!r} is unreachable: {shown} "
                f"({100 * fixed.total / report.total:.1f}% of the measured elements) are not "
                f"regularized (frozen, or reg=None in the optimizer) and hold "
                f"{fixed.nonzero} nonzeros; allowed: target_sparsity <= {reachable:.6f}, or "
                f"regularize those tensors"
            )

    def _warn_if_shrinkage_wipes_out(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """One pass at attach time. Until the first lambda update the controller cannot
        react; if the proximal steps alone would zero most weights in that time (the seed's
        ``initial_lambda=1.0`` with a usual learning rate does), the network may never
        recover. Say so before training instead of after. (Bregman iterations are not
        checked: their lambda is a threshold on accumulated gradients, not a shrinkage.)"""
        horizon = self.config.update_frequency
        zeroed = total = 0
        with torch.no_grad():
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    threshold = horizon * float(group["lr"]) * self.lambda_
                    for p in group["params"]:
                        if id(p) in self._hooked:
                            zeroed += int(p.abs().le(threshold).sum())
                            total += p.numel()
        if total and zeroed / total > 0.5:
            logs.warn0(
                f"lambda={self.lambda_:g}: before the first lambda update "
                f"(update_frequency={horizon} steps) the proximal steps alone, each shrinking "
                f"by lr * lambda, would zero {100 * zeroed / total:.1f}% of the regularized "
                f"weights. lambda is an L1 coefficient per weight (the units of weight_decay); "
                f"values around 1e-5 to 1e-2 are typical: lower initial_lambda"
            )

    def detach(self) -> None:
        """Forget the optimizers: remove the proximal-step hooks, stop driving lambda."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._driven.clear()
        self._hooked, self._regularized = set(), set()

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.lambda_ == 0.0:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                params = [p for p in group["params"] if id(p) in self._hooked]
                if params:
                    self.regularizer.prox_all_(params, float(group["lr"]) * self.lambda_)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "lambda": self.lambda_,
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda and the step of the last update; refuses a corrupt lambda."""
        lam = check_number(
            "checkpoint lambda",
            state.get("lambda", self.config.initial_lambda),
            low=self.config.min_lambda,
            high=self.config.max_lambda,
        )
        self._set_lambda(lam)
        self.last_update_step = int(state.get("last_update_step", 0))
        sparsity = state.get("sparsity")
        self.sparsity = None if sparsity is None else float(sparsity)

    def _log_details(self, report: SparsityReport) -> None:
        if self.config.verbose >= 1 and report.rows:
            logs.info0(logs.structure_line(report))
        if self.config.verbose >= 2:
            for line in logs.parameter_lines(report):
                logs.info0(line)

    def regularized_names(self) -> Iterable[str]:
        """Names of the targets the proximal step acts on (after :meth:`attach`)."""
        return [t.name for t in self.targets if id(t.values) in self._regularized]


def _uses_groups(optimizer: BregmanOptimizer) -> bool:
    return any(isinstance(resolve_regularizer(g["reg"]), GroupL1) for g in optimizer.param_groups)
