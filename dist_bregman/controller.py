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

``model`` is the model as wrapped for training (DDP, FSDP1, FSDP2, a DeepSpeed engine or
its module): the controller reads each measured tensor's layout from it, see
:mod:`dist_bregman.shards`. If the model is wrapped after the controller is built, call
:meth:`bind` with the wrapped model before :meth:`attach`. Every rank must call
:meth:`attach`, :meth:`measure` and :meth:`update_if_due` alike: they are collectives.
The calls a training step makes (those above, :meth:`regularization_loss`,
:meth:`follow_groups`, :meth:`gradients_finite`, :meth:`drop_step`) run eagerly inside a
compiled step (:func:`~dist_bregman.compiling.eager`): host-side decisions, C++ kernels
and collectives, which Dynamo would only break its graph on, and warn about.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from dist_bregman import comm, kernels, logs
from dist_bregman.attachment import Attachment
from dist_bregman.compiling import eager
from dist_bregman.config import BregmanConfig, check_number
from dist_bregman.control import LambdaDecision, decide
from dist_bregman.errors import NonFiniteError, RankDisagreementError, first_names
from dist_bregman.guards import LossWatch, nonfinite_ranks
from dist_bregman.holders import deepspeed_wrapper, groups_key
from dist_bregman.pruning import MagnitudePruner, PruningConfig
from dist_bregman.regularizers import L1, GroupL1, Regularizer
from dist_bregman.regularizers import resolve as resolve_regularizer
from dist_bregman.shards import Placement, Replicated, local_views, place
from dist_bregman.shards.replicated import check_replicas
from dist_bregman.shards.zero import partitions
from dist_bregman.sparsity import SparsityReport, check_same_tensors, reduce_counts
from dist_bregman.support import HeldSupport
from dist_bregman.targets import ParameterPairs, Target, check_writable, left_out, resolve

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
        self.group = group  # (its first rank logs)
        self.targets: list[Target] = resolve(model, parameters_to_prune)
        if parameters_to_prune is None and (missed := left_out(model, self.targets)):
            self._warn(missed)
        if self.config.mode == "prox":
            check_writable(
                self.targets,
                "the proximal step or a Bregman optimizer's update",
                also="mode='loss' (its penalty reaches the originals through autograd), ",
            )
        elif self.config.freeze_support_at or self.config.magnitude_start_at:
            check_writable(self.targets, "the mask of freeze_support_at or magnitude_start_at")
        chosen = resolve_regularizer(
            regularizer if regularizer is not None else self.config.regularizer
        )
        assert chosen is not None
        self.regularizer: Regularizer = chosen
        self.lambda_ = self.config.initial_lambda
        self.last_update_step = 0
        self.last_report: SparsityReport | None = None
        self.sparsity: float | None = None
        """The last measured global sparsity (restored from checkpoints), None before any."""
        self.losses = LossWatch()
        """Non-finite losses seen on this rank since the last update (:meth:`observe_loss`)."""
        self.updates = 0
        """Lambda updates run so far in this process (paces ``check_agreement_every``)."""
        self.stop_requested = False
        """Set when a non-finite loss or gradient was seen with ``on_nonfinite="stop"``:
        the training loop should save a checkpoint and end (Lightning's adapter does)."""
        self.skipped_steps = 0
        """Optimizer steps dropped by :meth:`gradients_finite` (``guard_steps``)."""
        self.started = not self.config.magnitude_start_at
        """Shrinkage has started (at once, or at ``magnitude_start_at``, from the cut)."""
        self.frozen = False
        """The support is frozen (``freeze_support_at``): no shrinkage, zeros held."""
        self.found_sparsity: float | None = None
        """The sparsity shrinkage had reached when the support was frozen (before the
        held set was made exactly the target): how much of the target it found itself."""
        self._model: nn.Module = model
        self._optimizers: tuple[Any, ...] = ()
        self._groups: tuple[tuple[int, int], ...] = ()
        self.out_of_reach: str | None = None
        """Why ``target_sparsity`` cannot be reached by the regularized tensors now (set
        by ``attach(strict=False)``): lambda updates are skipped meanwhile, or the integral
        rule would wind lambda up against weights it cannot reach."""
        self.placements: list[Placement] = []
        self._checked: list[Placement] | None = None
        """The placements :func:`check_same_tensors` found alike on every rank."""
        self.attachment = Attachment([], self.regularizer, self.config.mode, self._lambda)
        self.held = HeldSupport(self.config, self._magnitude_pruner, self._info, self._warn)
        """The zeros held after the freeze (:mod:`dist_bregman.support`)."""
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Read the measured tensors' layouts from ``model`` as wrapped for training (FSDP1
        metadata lives on the wrapper). Lightning calls this with ``strategy.model``."""
        self.detach()
        self._model = model
        self.placements = place(model, self.targets)
        self.attachment = Attachment(
            self.placements, self.regularizer, self.config.mode, self._lambda
        )
        sharded = [p.target.name for p in self.placements if p.sharded]
        if self.config.mode == "loss" and sharded:
            raise ValueError(
                f"mode='loss' needs every measured tensor whole on each rank (one process, "
                f"DDP, ZeRO-1/2), but {sharded[:3]} are sharded; allowed: mode='prox', which "
                f"makes the zeros in the shards the optimizer holds"
            )

    @property
    def structure(self) -> bool:
        """Count all-zero rows/kernels too: on whenever a group regularizer is in play."""
        return isinstance(self.regularizer, GroupL1) or self.attachment.uses_groups

    @property
    def shrinking(self) -> bool:
        """Shrinkage is on: after the dense warm-up (if any), before the freeze (if any)."""
        return self.started and not self.frozen

    @property
    def _unchecked(self) -> bool:
        """Whether :meth:`attach` has not yet checked that every rank measures these
        placements' tensors: until it has, each measurement checks that within its own
        all-reduce (a controller kept only to measure is never attached)."""
        return self._checked is not self.placements

    def _check_layouts(self) -> None:
        """Before :meth:`attach` (whose set-up check does it), across ranks: refuse whole
        replicas that the model, wrapped since they were placed, no longer holds
        (:func:`~dist_bregman.shards.replicated.check_replicas`; every rank alike)."""
        if self._unchecked and comm.get_world_size(self.group) > 1:
            check_replicas(self.placements)

    def _lambda(self) -> float:
        """The strength the optimizers apply: lambda while shrinking, else 0."""
        return self.lambda_ if self.shrinking else 0.0

    # ------------------------------------------------------------------ measuring
    @eager
    def measure(self) -> SparsityReport:
        """Global sparsity of the targets (a collective: every rank must call it)."""
        return self._measure()[0]

    def _measure(self, extra: Sequence[torch.Tensor] = ()) -> tuple[SparsityReport, list[int]]:
        """:meth:`measure`, and ``extra`` summed over ranks in the same all-reduce."""
        self._check_layouts()
        report, sums = reduce_counts(
            self.placements,
            zero_tolerance=self.config.zero_tolerance,
            group=self.group,
            structure=self.structure,
            extra=extra,
            agree=self._unchecked,
        )
        self.last_report, self.sparsity = report, report.sparsity
        return report, sums

    def log_epoch(self, epoch: int) -> SparsityReport:
        """Measure and log ``Epoch N: Sparsity of pruned modules = ...`` (verbose >= 1)."""
        report = self.measure()
        if self.config.verbose >= 1:
            self._info(logs.epoch_line(epoch, report.sparsity))
        self._log_details(report)
        return report

    # ------------------------------------------------------------------ lambda
    @eager
    def observe_loss(self, loss: torch.Tensor | float | None) -> None:
        """Remember, without a host sync, whether a non-finite loss was seen on this rank
        (:class:`~dist_bregman.guards.LossWatch`). The flag travels in the next
        measurement's all-reduce, so every rank learns that some rank saw a NaN/Inf and all
        of them skip that lambda update together."""
        self.losses.observe(loss)

    @eager
    def update_if_due(self, step: int) -> LambdaDecision | None:
        """Nothing before ``magnitude_start_at``, the cut at it (:meth:`start_from_cut`);
        freeze the support when ``step`` reaches ``freeze_support_at``; run :meth:`update`
        when ``step`` is a new multiple of ``update_frequency``."""
        if not self.started:
            if step < self.config.magnitude_start_at:
                return None
            self.start_from_cut(step)
        freeze_at = self.config.freeze_support_at
        if freeze_at and step >= freeze_at and not self.frozen:
            self.freeze_support(step)
        if step <= self.last_update_step or step % self.config.update_frequency != 0:
            return None
        return self.update(step)

    def update(self, step: int) -> LambdaDecision:
        """Measure, let rank 0 apply the lambda rule, broadcast, log; after the freeze,
        hold freed zeros that did not regrow (:meth:`HeldSupport.settle`). A collective."""
        config = self.config
        flag = self.losses.take()
        self._check_layouts()
        report, (loss_bits,) = reduce_counts(
            self.placements,
            zero_tolerance=config.zero_tolerance,
            group=self.group,
            structure=self.structure,
            extra=[comm.rank_bit(flag, self.group)],
            agree=self._unchecked,
        )
        if report.nonfinite:
            message = (
                f"Step {step}: {report.nonfinite} non-finite (NaN/Inf) weight elements on "
                f"rank(s) {list(report.nonfinite_ranks)}; lambda stays {self.lambda_:.8f} and "
                f"the run stops (the last checkpoint saved before this is clean). Lower the "
                f"learning rate, or (without DeepSpeed) set guard_steps=True to drop bad steps "
                f"before they land"
            )
            self._warn(message)
            raise NonFiniteError(message)
        self.last_report, self.sparsity = report, report.sparsity
        if self.frozen:
            self.held.settle(step, report)
        self.updates += 1
        every = config.check_agreement_every
        if every and self.updates % every == 0 and comm.get_world_size(self.group) > 1:
            self.check_agreement()  # before the broadcast, which would hide a divergence
        skip = "support frozen" if self.frozen else None
        if self.out_of_reach is not None and skip is None:
            skip = "target out of reach of the regularized tensors"
        if loss_bits:
            ranks = comm.ranks_from_bits(loss_bits, self.group)
            skip = f"non-finite loss on rank(s) {ranks} since step {self.last_update_step}"
            self.stop_requested |= config.on_nonfinite == "stop"
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
        if decision.skipped and (loss_bits or not (self.frozen or self.out_of_reach)):
            self._warn(
                f"Step {step}: lambda update {decision.reason}; lambda stays {decision.new:.8f}"
            )
        if config.verbose >= 1:
            self._info(logs.decision_line(decision))
            self._info(logs.step_line(step, report.sparsity, decision.new))
        self._log_details(report)
        return decision

    # ------------------------------------------------------------------ the phases
    def start_from_cut(self, step: int) -> None:
        """End the dense warm-up: zero the ``target_sparsity`` share of the smallest
        magnitudes (exact, over all ranks, in the weights and in the tensors the optimizers
        step), make the Bregman optimizers forget ``v`` and their moments so they start
        from the cut (state kept from the dense phase would put the dense weights back at
        their next step), and turn the shrinkage on at the current lambda. The zeros are
        not held: the Bregman optimizers regrow what the data asks for. A collective."""
        cut = self._magnitude_pruner()
        report = cut.prune(self.config.target_sparsity).report
        cut.detach()
        self.attachment.restart()
        self.started = True
        self.attachment.set_lambda(self._lambda())
        self.last_report, self.sparsity = report, report.sparsity
        self._info(
            f"Step {step}: dense warm-up over: cut by magnitude to sparsity "
            f"{100 * report.sparsity:.3f}% (target {100 * self.config.target_sparsity:.1f}%); "
            f"shrinkage on at lambda {self.lambda_:.8f}"
        )

    def freeze_support(self, step: int) -> None:
        """From now on: lambda stays, no shrinkage, and the support's zeros are held.

        The L1 shrinkage that finds the support also pulls every surviving weight toward 0
        by about lambda; with the support fixed and the shrinkage off, training refits the
        survivors (as a refit on a LASSO's support does). With ``freeze_hold="target"`` the
        held set is the ``target_sparsity`` share of the smallest magnitudes, chosen exactly
        over all ranks: the zeros shrinkage made (they are the smallest), topped up with the
        smallest survivors if sparsity is still below target, or with the surplus zeros left
        free to regrow if it overshot (those that do not regrow are swapped for held ones
        at the following updates, see :mod:`dist_bregman.support`). So the run ends at the
        target, not wherever lambda's last oscillation left it. With ``"found"`` it is the zeros
        shrinkage made, as they are (whole rows under a group regularizer). Masks are
        enforced after every optimizer step in the tensors it steps (the machinery of
        :class:`~dist_bregman.SafeModelPruning`, so under every strategy). A collective:
        every rank calls it at the same step (as :meth:`update_if_due` does).
        """
        report = self.measure()
        found = self.found_sparsity = report.sparsity
        self.frozen = True
        self.attachment.set_lambda(0.0)
        held = self.held.freeze(step, report)
        target = self.config.target_sparsity
        self._info(
            f"Step {step}: support frozen: shrinkage found sparsity {100 * found:.3f}%; "
            f"{held} of {report.total} weights ({100 * held / report.total:.3f}%, target "
            f"{100 * target:.1f}%) held at zero from here, others free; shrinkage off, "
            f"lambda stays {self.lambda_:.8f}"
        )

    def _magnitude_pruner(self) -> MagnitudePruner:
        """Magnitude pruning of the targets, acting also in the tensors the attached
        optimizers step (and, until detached, after each of their steps)."""
        pairs = [(t.module, t.attr) for t in self.targets]
        pruner = MagnitudePruner(self._model, PruningConfig(amount=0.0), pairs, group=self.group)
        pruner.attach(*self._optimizers, check=False)  # the same tensors: checked at attach
        return pruner

    # ------------------------------------------------------------------ bad numbers
    @eager
    def gradients_finite(self, optimizers: Iterable[Any], step: int) -> bool:
        """Whether every rank's gradients are finite, the same answer on every rank.

        Call it after ``backward()`` and before ``optimizer.step()`` (a collective when
        distributed: one 8-byte all-reduce). On False, drop the step on every rank: the
        Lightning adapter sets the gradients to None (torch optimizers then skip every
        parameter) and the proximal step of that step is skipped too; a raw loop simply
        does not call ``optimizer.step()`` (see :meth:`drop_step`). Logged with the step and
        the ranks that saw the bad numbers. Not for a loop with a ``torch.amp.GradScaler``:
        ``scaler.step`` already skips a step whose gradients overflow, which is routine there.
        """
        grads = [
            p.grad
            for optimizer in optimizers
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        ranks = nonfinite_ranks(grads, self.group)
        if not ranks:
            return True
        self.skipped_steps += 1
        self.stop_requested |= self.config.on_nonfinite == "stop"
        self._warn(
            f"Step {step}: non-finite gradient on rank(s) {ranks}: optimizer step dropped on "
            f"every rank (on_nonfinite={self.config.on_nonfinite!r}); lambda stays "
            f"{self.lambda_:.8f}"
        )
        return False

    @eager
    def drop_step(self, optimizers: Iterable[Any]) -> None:
        """Make the coming ``optimizer.step()`` a no-op: gradients to None (torch optimizers
        skip parameters without one) and no proximal step after it."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
            self.attachment.skip_next_step(optimizer)

    def check_finite_state(self, state: Mapping[str, Any]) -> None:
        """Raise :class:`NonFiniteError` on every rank if any rank's ``state`` (e.g. a
        checkpoint's ``state_dict``: local shards included) or, under ZeRO-3, its parameter
        partitions (what DeepSpeed saves; the state dict shows empty tensors) hold NaN/Inf.
        A collective."""
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += partitions(self._model)
        ranks = nonfinite_ranks(tensors, self.group)
        if ranks:
            message = (
                f"refusing to save a checkpoint: NaN/Inf in the model state on rank(s) {ranks}"
            )
            self._warn(message)
            raise NonFiniteError(message)

    def check_agreement(self) -> None:
        """Raise :class:`RankDisagreementError` on every rank unless all ranks hold the same
        lambda, the same measured/regularized parameter set and the same replicas. A
        collective (debug)."""
        mine = (self.lambda_, self.fingerprint(), self.replica_sums())
        everyone = cast(
            "list[tuple[float, str, list[tuple[str, tuple[int, ...], str, str]]]]",
            comm.all_gather_object(mine, self.group),
        )
        reference = everyone[0]
        ranks = comm.global_ranks(self.group, list(range(len(everyone))))  # as messages say
        differ = [rank for rank, value in enumerate(everyone) if value[:2] != reference[:2]]
        if differ:
            shown = ", ".join(
                f"rank {ranks[rank]}: lambda={everyone[rank][0]!r} set={everyone[rank][1]}"
                for rank in [0, *differ]
            )
            raise RankDisagreementError(
                f"ranks {[ranks[r] for r in differ]} disagree with rank {ranks[0]} ({shown})"
            )
        # Each copy (a whole replica, or a shard's replicas) against its first holder's.
        first_holder: dict[tuple[str, tuple[int, ...]], tuple[int, tuple[str, str]]] = {}
        drifted: list[tuple[int, int, str]] = []  # (rank, first holder it differs from, name)
        for rank, value in enumerate(everyone):
            for name, copies, total, squares in value[2]:
                first, sums = first_holder.setdefault((name, copies), (rank, (total, squares)))
                if sums != (total, squares) and (not drifted or drifted[-1][0] != rank):
                    drifted.append((rank, first, name))
        if drifted:
            _, first, name = drifted[0]
            raise RankDisagreementError(
                f"ranks {[ranks[r] for r, _, _ in drifted]} hold other values than rank "
                f"{ranks[first]} in replicated tensors (first: {name}): the replicas drifted "
                f"apart, and a count reads one of them. "
                f"Gradients are averaged only for the parameters DDP was built with (one "
                f"frozen then and unfrozen since never is), and ranks must not change the "
                f"weights on their own; allowed: replicas stepped alike (rebuild DDP after "
                f"unfreezing)"
            )

    def replica_sums(self) -> list[tuple[str, tuple[int, ...], str, str]]:
        """Each measured tensor that this rank holds in copies: its name, the global ranks
        holding this rank's copy (``()``: every rank, a whole replica as DDP keeps it; else
        the replicas of a shard under HSDP / HYBRID_SHARD within :attr:`group`), and the
        float64 sum and sum of squares of the effective values this rank holds, as hex
        strings: equal on the ranks of a copy while the copies are (strings, so that NaN
        sums compare equal too)."""
        members = comm.group_members(self.group)
        held: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
        with torch.no_grad():
            for placement in self.placements:
                if isinstance(placement, Replicated):
                    held.append((placement.target.name, (), placement.target.effective()))
                    continue
                copies = tuple(r for r in placement.copies if members is None or r in members)
                if len(copies) > 1 and (values := placement.local().effective()) is not None:
                    held.append((placement.target.name, copies, values))
            if not held:
                return []
            device = held[0][2].device
            sums = [
                torch.stack([v.double().sum(), v.double().square().sum()]).to(device)
                for _, _, v in held
            ]
            numbers = torch.stack(sums).tolist()  # the one host synchronisation
        return [
            (name, copies, total.hex(), squares.hex())
            for (name, copies, _), (total, squares) in zip(held, numbers, strict=True)
        ]

    def fingerprint(self) -> str:
        """Short hash of the measured tensors (names, global sizes) and which of them are
        regularized: equal on every rank of a healthy job."""
        regularized = self.attachment.regularized
        described = [
            (p.target.name, p.global_numel, i in regularized) for i, p in enumerate(self.placements)
        ]
        return hashlib.sha256(repr(described).encode()).hexdigest()[:16]

    def _set_lambda(self, value: float) -> None:
        if value != self.lambda_:
            self.lambda_ = value
            self.attachment.set_lambda(self._lambda())

    # ------------------------------------------------------------------ the penalty
    @eager
    def regularization_loss(self) -> torch.Tensor:
        """``lambda * J(theta)`` over the effective weights, for the training loss (0 during
        the dense warm-up and once the support is frozen: the penalty is off). Each weight's
        term is weighted by the ``lambda_scale`` of the param group holding it (1 unless set;
        :func:`~dist_bregman.optim.lambda_scale`), as the proximal step's threshold is.

        In ``"loss"`` mode this term is the mechanism: its gradient is the L1 subgradient.
        In ``"prox"`` mode the proximal step already applies the strength once per step,
        so the term is returned as a value whose gradient does not reach the weights:
        adding it reports the true objective and leaves the update exactly unchanged.
        """
        strength = self._lambda()
        if not strength:
            # Off (warm-up, frozen support): zero, without reading a weight. Every rank has
            # the same lambda, so under sharding all skip the all-reduce alike.
            return torch.zeros((), requires_grad=True)
        if self.config.mode == "loss":
            return strength * self._penalty()
        with torch.no_grad():
            value = strength * self._penalty()
        return value.requires_grad_()

    def _penalty(self) -> torch.Tensor:
        """``J`` of the effective weights. Whole tensors (one process, DDP, ZeRO-1/2):
        computed locally, differentiable where autograd is on. Sharded: each rank's owned
        elements, summed with one all-reduce (a value: there is no full tensor to
        differentiate)."""
        scales = self.attachment.scales()
        if not any(p.sharded for p in self.placements):
            return self._value([t.tensors() for t in self.targets], scales)
        pieces: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        grouped = isinstance(self.regularizer, GroupL1)
        for placement, view in zip(
            self.placements, local_views(self.placements, self.group), strict=True
        ):
            if grouped and view.values is not None and not view.rows_whole:
                raise ValueError(
                    f"{placement.target.name}: {self.regularizer.spec} needs whole rows, but "
                    f"this strategy splits it into flat shards; allowed: regularizer='l1'"
                )
            pieces.append((view.values, view.mask))
        local = self._value(pieces, scales)
        return comm.all_reduce_sum(local.reshape(1), self.group)[0]

    def _value(
        self,
        pieces: list[tuple[torch.Tensor | None, torch.Tensor | None]],
        scales: list[float],
    ) -> torch.Tensor:
        """``sum scale * J(values * mask)`` over ``(values, mask)`` pieces (values None:
        nothing here), float32, differentiable in the values where autograd is on. L1 over
        contiguous CPU float32/float64 tensors is summed by the C++ kernel in one read, in
        float64 (``x.abs().sum()`` per tensor writes and reads a full-size temporary:
        1.8-7.2x a plain read at 10-200 M weights against the kernel's 0.8-1.0x,
        ``benchmarks/loss_term.py``), its gradient from
        :class:`~dist_bregman.kernels.AbsSumGradient`; the rest with torch ops
        (:meth:`~dist_bregman.regularizers.Regularizer.values`: on a GPU in multi-tensor
        kernels)."""
        terms: list[torch.Tensor] = []
        summed = [False] * len(pieces)
        if isinstance(self.regularizer, L1):
            sums = kernels.abs_sum_many([v for v, _ in pieces], [m for _, m in pieces])
            if sums is not None:
                summed = [bool(flag) for flag in sums[1].tolist()]
            if sums is not None and any(summed):
                # Its columns are 0 where it did not sum: one weighted sum takes them all.
                total = (sums[0] * torch.tensor(scales, dtype=torch.float64)).sum().float()
                if torch.is_grad_enabled():  # loss mode: the L1 gradient, written once
                    held = [i for i, done in enumerate(summed) if done]
                    total = kernels.AbsSumGradient.apply(
                        total,
                        [scales[i] for i in held],
                        [pieces[i][1] for i in held],
                        *[pieces[i][0] for i in held],
                    )
                terms.append(total)
        rest = [
            (values if mask is None else values * mask, scale)
            for (values, mask), scale, done in zip(pieces, scales, summed, strict=True)
            if values is not None and not done
        ]
        found = self.regularizer.values([effective for effective, _ in rest])
        terms += [
            _scaled(term.float(), scale) for term, (_, scale) in zip(found, rest, strict=True)
        ]
        if not terms:  # nothing held here (a rank that owns no elements)
            return torch.zeros((), dtype=torch.float32)
        # The terms' own device; a host term joins accelerator ones without a sync (a plain
        # copy to CUDA would wait for the queue, at every step).
        device = next((t.device for t in terms if t.device.type != "cpu"), terms[0].device)
        return torch.stack([comm.to_device(t, device) for t in terms]).sum()

    # ------------------------------------------------------------------ the optimizers
    def attach(self, *optimizers: Any, strict: bool = True) -> None:
        """Make these optimizers apply the regularizer with this controller's lambda.

        Plain torch optimizers get the proximal step after every ``step()``; LinBreg,
        AdaBreg and ProxSGD (also as DeepSpeed client optimizers) are driven through
        ``set_lambda``; DeepSpeed wrappers (ZeRO-1/2/3, fp16/bf16) are looked through to
        the fp32 tensors they step. See :mod:`dist_bregman.attachment`. Every trainable
        target must be held by one of them; targets left unregularized (frozen, or
        ``reg=None``) are measured only, and the target must be reachable without them:
        checked here, with a collective. ``strict=False`` (layers frozen now and unfrozen
        later, see :meth:`follow_groups`) warns instead and holds lambda until it is.
        """
        wrapped = [type(o).__name__ for o in optimizers if deepspeed_wrapper(o) is not None]
        if self.config.guard_steps and wrapped:
            raise ValueError(
                f"guard_steps=True with DeepSpeed's {wrapped[0]}: it steps with gradients in "
                f"its own buffers (after backward p.grad is None, or a bf16 copy under "
                f"BF16_Optimizer), which the guard neither checks nor empties, so it could "
                f"never drop a step; allowed: guard_steps=False under DeepSpeed ZeRO "
                f"or fp16/bf16 (a step that makes weights non-finite still stops the run at "
                f"the next measurement, before lambda or a checkpoint is touched), or "
                f"guard_steps=True with a torch optimizer (one process, DDP, FSDP)"
            )
        self.detach()
        if self._unchecked:  # once per bind (follow_groups reattaches)
            check_same_tensors(self.placements, self.group)
            self._checked = self.placements
        self._optimizers = optimizers
        self._groups = groups_key(optimizers)
        self.attachment.attach(optimizers)
        # What the proximal steps alone would zero before the first lambda update, counted
        # in the measurement's all-reduce: one rank's own share is no estimate where it
        # holds one end of the model (ZeRO-1/2's flat partitions: rank 0 saw 96% where
        # the model had 52%, measured).
        horizon = self.config.update_frequency
        shrinking = self.attachment.shrinkage_counts(horizon) if self.shrinking else []
        report, counts = self._measure(shrinking)
        self.out_of_reach = self._check_reachable(report)
        if self.out_of_reach is not None:
            if strict:
                raise ValueError(self.out_of_reach)
            self._warn(f"{self.out_of_reach}: lambda is held until it is reachable")
        if self.frozen:  # resumed after the freeze: the zeros in the weights are the support
            self.held.rehold(lambda: report)  # (nothing has stepped since that measurement)
        share = self.attachment.shrinkage_share(counts) if shrinking else 0.0
        if share > 0.5:
            self._warn(
                f"lambda={self.lambda_:g}: before the first lambda update "
                f"(update_frequency={self.config.update_frequency} steps) the proximal steps "
                f"alone, each shrinking by lr * lambda, would zero {100 * share:.1f}% of the "
                f"regularized weights. lambda is an L1 coefficient per weight (the units of "
                f"weight_decay); values around 1e-5 to 1e-2 are typical: lower initial_lambda"
            )

    @eager
    def follow_groups(self) -> bool:
        """Attach again (non-strictly) if the optimizers' param groups changed since
        :meth:`attach`: a finetuning callback unfreezing layers adds their parameters as a
        new group, which would otherwise get no proximal step (and no held zeros). Returns
        whether it did; a collective then, on every rank alike (the groups change on all).
        """
        if not self._optimizers or groups_key(self._optimizers) == self._groups:
            return False
        self.attach(*self._optimizers, strict=False)
        return True

    def _check_reachable(self, report: SparsityReport) -> str | None:
        """Why ``target_sparsity`` needs zeros in tensors nothing regularizes (``report``:
        the measured set now), or None."""
        regularized, scales = self.attachment.regularized, self.attachment.scales()
        unregularized = [
            p for i, p in enumerate(self.placements) if i not in regularized or scales[i] == 0
        ]
        if not unregularized:
            return None
        fixed, _ = reduce_counts(
            unregularized, zero_tolerance=self.config.zero_tolerance, group=self.group
        )
        reachable = 1.0 - fixed.nonzero / report.total
        if self.config.target_sparsity <= reachable:
            return None
        names = [p.target.name for p in unregularized]
        shown = first_names(names, 5)
        return (
            f"target_sparsity={self.config.target_sparsity!r} is unreachable: {shown} "
            f"({100 * fixed.total / report.total:.1f}% of the measured elements) are not "
            f"regularized (frozen, reg=None or lambda_scale=0 in the optimizer) and hold "
            f"{fixed.nonzero} nonzeros; allowed: target_sparsity <= {reachable:.6f}, or "
            f"regularize those tensors"
        )

    def detach(self) -> None:
        """Forget the optimizers: remove the proximal-step hooks, stop driving lambda, stop
        holding a frozen support's zeros."""
        self.attachment.detach()
        self.held.release()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "lambda": self.lambda_,
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
            "frozen": self.frozen,
            "started": self.started,
            "found_sparsity": self.found_sparsity,
            "untried": self.held.untried,
            "tried_all": self.held.tried_all,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda and the step of the last update; refuses a corrupt lambda
        (non-finite, negative, not a number) and clamps one outside this run's
        ``[min_lambda, max_lambda]`` into it, with a warning: resuming with new bounds is
        a user's decision, as the clamp at every update is."""
        config = self.config
        saved = check_number("checkpoint lambda", state.get("lambda", config.initial_lambda), low=0)
        lam = min(max(saved, config.min_lambda), config.max_lambda)
        if lam != saved:
            self._warn(
                f"checkpoint lambda {saved:.8f} is outside this run's [min_lambda, max_lambda] "
                f"= [{config.min_lambda:g}, {config.max_lambda:g}]: resuming at {lam:.8f}"
            )
        self.lambda_ = lam  # reaches the optimizers below, once the phase is restored
        self.last_update_step = int(state.get("last_update_step", 0))
        self.started = bool(state.get("started", True))  # older checkpoints: no warm-up
        untried = state.get("untried")  # older checkpoints: not kept (every zero is held)
        self.held.untried = None if untried is None else int(untried)
        self.held.tried_all = bool(state.get("tried_all", False))
        # The held set is rebuilt from the checkpoint's count and the zeros in the weights
        # (loaded with it), also when this controller was frozen already: what it held last
        # is not what the checkpoint held (a rollback). A collective when frozen.
        self.frozen = bool(state.get("frozen", False))
        self.held.release()
        if self.frozen and self._optimizers:
            self.held.rehold(self.measure)
        self.attachment.set_lambda(self._lambda())
        sparsity = state.get("sparsity")
        self.sparsity = None if sparsity is None else float(sparsity)
        found = state.get("found_sparsity")  # a run resumed after its freeze still reports it
        self.found_sparsity = None if found is None else float(found)

    def _log_details(self, report: SparsityReport) -> None:
        if self.config.verbose >= 1 and report.rows:
            self._info(logs.structure_line(report))
        if self.config.verbose >= 2:
            for line in logs.parameter_lines(report):
                self._info(line)

    def _info(self, message: str) -> None:
        logs.info0(self.labelled(message), self.group)

    def _warn(self, message: str) -> None:
        logs.warn0(self.labelled(message), self.group)

    def labelled(self, message: str) -> str:
        """``message`` as this controller's log line: ``[name] message`` when it has a
        name (see :attr:`~dist_bregman.config.BregmanConfig.name`)."""
        return message if self.config.name is None else f"[{self.config.name}] {message}"

    def regularized_names(self) -> Iterable[str]:
        """Names of the targets some optimizer regularizes (after :meth:`attach`)."""
        regularized = self.attachment.regularized
        return [p.target.name for i, p in enumerate(self.placements) if i in regularized]


def _scaled(term: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * term``, without an extra op in the autograd graph at the usual scale 1."""
    return term if scale == 1.0 else term * scale
