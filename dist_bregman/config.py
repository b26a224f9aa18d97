"""The pruner's settings, checked once, at construction.

A bad value fails here, before any process group or data loader exists, with the field's
name, the value given and what is allowed: a typo must not surface as a hang or a silent
no-op hours into a multi-node job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["prox", "loss"]
MODES: tuple[str, ...] = ("prox", "loss")
LambdaRule = Literal["additive", "multiplicative"]
LAMBDA_RULES: tuple[str, ...] = ("additive", "multiplicative")
OnNonFinite = Literal["skip", "stop"]
ON_NONFINITE: tuple[str, ...] = ("skip", "stop")
FreezeHold = Literal["target", "found"]
FREEZE_HOLDS: tuple[str, ...] = ("target", "found")


@dataclass(kw_only=True, slots=True)
class BregmanConfig:
    """Settings of :class:`~dist_bregman.controller.SparsityController`."""

    target_sparsity: float = 0.8
    """Fraction of the measured elements to drive to exactly zero, in [0, 1]."""
    initial_lambda: float = 1.0
    """Starting L1 coefficient: the proximal step shrinks each weight by ``lr * lambda``."""
    lambda_update_rate: float = 0.001
    """Gain of the lambda rule; >= 0 (0 freezes lambda). See ``lambda_rule``."""
    lambda_rule: LambdaRule = "additive"
    """``"additive"``: the seed rule ``lambda += rate * (target - sparsity)``.
    ``"multiplicative"``: the same integral rule on log(lambda),
    ``lambda *= exp(rate * (target - sparsity))``, whose gain does not depend on lambda's
    scale: use it when the right lambda is unknown within orders of magnitude."""
    update_frequency: int = 100
    """Optimizer steps between two measurements and lambda updates; >= 1."""
    min_lambda: float = 0.0
    """Lower clamp for lambda; >= 0 (a negative L1 coefficient would grow weights)."""
    max_lambda: float = 100.0
    """Upper clamp for lambda; finite and >= ``min_lambda``."""
    mode: Mode = "prox"
    """``"prox"``: exact zeros by a proximal step after each optimizer step, and the loss
    term is a value without gradient. ``"loss"``: the seed's loss term carries the L1
    gradient and nothing else acts (zeros are then only approximate)."""
    regularizer: str = "l1"
    """J for the proximal step and the loss term: ``"l1"`` (elements), ``"group_l1"``
    (whole rows: neurons, filters) or ``"group_l1_kernels"`` (ConvNd kernels). A Bregman
    optimizer (LinBreg, AdaBreg, ProxSGD) uses its own param groups' ``reg`` instead."""
    zero_tolerance: float = 0.0
    """Elements with ``|x| <= zero_tolerance`` count as zero; 0 counts exact zeros only."""
    verbose: int = 0
    """0 silent, 1 the seed's log lines on rank 0, 2 adds one line per parameter."""
    on_nonfinite: OnNonFinite = "skip"
    """What a NaN/Inf loss or gradient on any rank does, once every rank knows of it:
    ``"skip"`` drops that optimizer step (with ``guard_steps``) and that lambda update, and
    goes on; ``"stop"`` does the same, then saves a checkpoint (Lightning) and stops. Either
    way lambda is never updated from such a step, and non-finite *weights* always stop the
    run with :class:`~dist_bregman.errors.NonFiniteError` (nothing clean is left to go on
    from). See the README, "Bad numbers"."""
    guard_steps: bool = False
    """Check every step's gradients before the optimizer step (one pass over the gradients
    and, distributed, one 8-byte all-reduce per step) so a bad step is dropped on every
    rank before it reaches the weights. Off: a bad loss is still caught, at the next lambda
    update, without per-step cost, but its step has already been applied. Under Lightning's
    ``precision="16-mixed"`` the GradScaler drops such steps itself (overflow is routine
    there), so the callback leaves them to it."""
    freeze_support_at: int = 0
    """Optimizer step from which the support is frozen; 0: never. From then on lambda
    stops moving and the shrinkage is off (the proximal step and the Bregman optimizers'
    thresholds use 0), and the zeros present at that step are held by masks in the tensors
    the optimizers step. The surviving weights then fine-tune without the L1 bias that
    shrinkage leaves on them (debiasing, like refitting a LASSO's support), as magnitude
    pruning fine-tunes after its last pruning event. Typical: 60-80% of the run."""
    freeze_hold: FreezeHold = "target"
    """Which zeros the freeze holds. ``"target"``: exactly the ``target_sparsity`` share
    of the smallest magnitudes, one element at a time (the zeros shrinkage made, topped up,
    or with the surplus freed to regrow; a freed zero still zero at the next lambda update
    got no gradient, and is held again while another held zero is freed in its place), so
    the run ends at the target. ``"found"``: the zeros shrinkage made, as they are, so the
    run ends where lambda's control left it (near the target). With a group regularizer
    those zeros are whole rows or kernels (with a ``zero_tolerance``, also the single
    weights within it, made exactly zero), and ``"found"`` keeps them so:
    an elementwise top-up would zero single weights of live neurons, a release would
    revive parts of dead ones, and neither removes a neuron."""
    magnitude_start_at: int = 0
    """Optimizer step at which a dense warm-up ends; 0: none. Until then the shrinkage is
    off (as after the freeze) and lambda does not move. At that step the measured weights
    are cut by magnitude (the ``target_sparsity`` share with the smallest magnitudes
    zeroed: one exact, unstructured cut over all ranks), the Bregman optimizers forget
    their state (they restart from the cut as freshly built ones would), and shrinkage
    starts at ``initial_lambda``. LinBreg and AdaBreg only grow weights (inverse scale
    space), so they need a sparse start; this one is cut from a briefly trained network
    instead of drawn before any data was seen (see ``dist_bregman.init``). An epoch of
    steps is typical; it must come before ``freeze_support_at``."""
    check_agreement_every: int = 0
    """Debug: every N lambda updates, check that all ranks hold the same lambda, the same
    measured parameter set and the same replicas (the sums of every replicated tensor,
    which each rank then reads whole), raising
    :class:`~dist_bregman.errors.RankDisagreementError` naming the ranks that differ (one
    ``all_gather_object``; nothing in one process); 0 turns it off."""
    name: str | None = None
    """Names this controller where several drive one model (each its own weights and
    target, e.g. the encoder at 90% and the head at 50%): ``[name]`` starts its log lines,
    and :class:`~dist_bregman.BregmanPruner` keys its checkpoint state and logged metrics by
    it. None: the seed's unnamed lines and keys."""

    def __post_init__(self) -> None:
        check_number("target_sparsity", self.target_sparsity, low=0.0, high=1.0)
        check_number("lambda_update_rate", self.lambda_update_rate, low=0.0)
        check_number("min_lambda", self.min_lambda, low=0.0)
        check_number("max_lambda", self.max_lambda, low=0.0)
        if self.min_lambda > self.max_lambda:
            raise ValueError(
                f"min_lambda={self.min_lambda!r} > max_lambda={self.max_lambda!r}: "
                f"expected min_lambda <= max_lambda"
            )
        check_number(
            "initial_lambda", self.initial_lambda, low=self.min_lambda, high=self.max_lambda
        )
        check_int("update_frequency", self.update_frequency, low=1)
        check_number("zero_tolerance", self.zero_tolerance, low=0.0)
        check_choice("mode", self.mode, MODES)
        check_choice("lambda_rule", self.lambda_rule, LAMBDA_RULES)
        check_choice("regularizer", self.regularizer, ("l1", "group_l1", "group_l1_kernels"))
        if self.lambda_rule == "multiplicative" and self.min_lambda <= 0.0:
            raise ValueError(
                f"min_lambda={self.min_lambda!r} with lambda_rule='multiplicative': expected "
                f"min_lambda > 0 (a multiplicative rule can never leave lambda = 0)"
            )
        check_choice("verbose", self.verbose, (0, 1, 2))
        check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        check_choice("guard_steps", self.guard_steps, (True, False))
        check_int("check_agreement_every", self.check_agreement_every, low=0)
        check_int("freeze_support_at", self.freeze_support_at, low=0)
        check_int("magnitude_start_at", self.magnitude_start_at, low=0)
        check_choice("freeze_hold", self.freeze_hold, FREEZE_HOLDS)
        check_name("name", self.name)
        if self.freeze_support_at and self.magnitude_start_at >= self.freeze_support_at:
            raise ValueError(
                f"magnitude_start_at={self.magnitude_start_at!r} with freeze_support_at="
                f"{self.freeze_support_at!r}: expected magnitude_start_at < freeze_support_at "
                f"(the support is found between the two), or freeze_support_at=0"
            )


def check_number(
    name: str, value: object, *, low: float | None = None, high: float | None = None
) -> float:
    """A finite real number in ``[low, high]``, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}: expected a real number, got {type(value).__name__}")
    allowed = _range_text(low, high)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number {allowed}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r}: expected a number {allowed}")
    return float(value)


def check_int(name: str, value: object, *, low: int) -> int:
    """An ``int`` (not a bool) ``>= low``, else ``TypeError``/``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
    return value


NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_name(name: str, value: object) -> None:
    """None, or a name made of letters, digits, ``_``, ``.`` and ``-`` (it becomes part of
    metric keys such as ``bregman/<name>/lambda`` and of checkpoint keys)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r}: expected None or a str, got {type(value).__name__}")
    if NAME.fullmatch(value) is None:
        raise ValueError(
            f"{name}={value!r}: expected None or a non-empty str of letters, digits, '_', '.' "
            f"and '-'"
        )


def check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """``value`` is one of ``allowed`` (compared with type, so ``True`` is not ``1``)."""
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else "(any)"
