"""How lambda moves: a pure decision, then rank 0's decision enacted everywhere.

:func:`next_lambda` is the seed's integral rule and nothing else: it takes numbers and returns
the new value with the reason, so it is tested against closed-form answers. :func:`decide`
runs it on rank 0 and broadcasts the result, so ranks never diverge even if their inputs or
their floating-point paths ever differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_bregman import comm


@dataclass(frozen=True, slots=True)
class LambdaDecision:
    """One lambda update: inputs, result and why."""

    old: float
    new: float
    sparsity: float
    target: float
    reason: str
    """``"rule"``, ``"clamped to min_lambda"``, ``"clamped to max_lambda"``, or why the
    update was skipped (lambda unchanged)."""

    @property
    def skipped(self) -> bool:
        """True when bad inputs kept lambda where it was."""
        return self.reason.startswith("skipped")

    @property
    def arrow(self) -> str:
        """↗ when lambda rose, ↘ when it fell, → when unchanged."""
        if self.new > self.old:
            return "↗"
        return "↘" if self.new < self.old else "→"


def next_lambda(
    current: float,
    sparsity: float,
    *,
    target: float,
    rate: float,
    min_lambda: float,
    max_lambda: float,
    rule: str = "additive",
) -> LambdaDecision:
    """The seed rule ``clamp(current + rate * (target - sparsity), min, max)``, or with
    ``rule="multiplicative"`` ``clamp(current * exp(rate * (target - sparsity)), min, max)``.

    A non-finite sparsity leaves lambda unchanged (a NaN must never reach a checkpoint).
    """
    if not math.isfinite(sparsity):
        return LambdaDecision(current, current, sparsity, target, "skipped: non-finite sparsity")
    if rule == "multiplicative":
        proposed = current * math.exp(rate * (target - sparsity))
    else:
        proposed = current + rate * (target - sparsity)
    if proposed < min_lambda:
        return LambdaDecision(current, min_lambda, sparsity, target, "clamped to min_lambda")
    if proposed > max_lambda:
        return LambdaDecision(current, max_lambda, sparsity, target, "clamped to max_lambda")
    return LambdaDecision(current, proposed, sparsity, target, "rule")


def decide(
    current: float,
    sparsity: float,
    *,
    target: float,
    rate: float,
    min_lambda: float,
    max_lambda: float,
    rule: str = "additive",
    skip_reason: str | None = None,
    group: comm.ProcessGroup = None,
) -> LambdaDecision:
    """Rank 0 decides, every rank of ``group`` receives the identical value.

    ``skip_reason`` (which every rank must agree on, e.g. from an all-reduced flag) keeps
    lambda unchanged. Ranks other than 0 adopt rank 0's value bit for bit.
    """
    if skip_reason is not None:
        decision = LambdaDecision(current, current, sparsity, target, f"skipped: {skip_reason}")
    else:
        decision = next_lambda(
            current,
            sparsity,
            target=target,
            rate=rate,
            min_lambda=min_lambda,
            max_lambda=max_lambda,
            rule=rule,
        )
    new = comm.broadcast_float(decision.new, group)
    if new == decision.new:
        return decision
    return LambdaDecision(current, new, sparsity, target, "from rank 0")
