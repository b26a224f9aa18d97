"""The lambda rule against closed-form answers, and the seed's log lines."""

from __future__ import annotations

import math

import pytest

from dist_bregman import logs
from dist_bregman.control import LambdaDecision, decide, next_lambda

BOUNDS = {"min_lambda": 0.0, "max_lambda": 10.0}


def test_seed_example_12_543_percent_against_80_from_1_at_rate_0_001() -> None:
    decision = next_lambda(1.0, 0.12543, target=0.8, rate=0.001, **BOUNDS)
    assert decision.new == pytest.approx(1.0 + 0.001 * (0.8 - 0.12543), abs=0)
    assert f"{decision.new:.8f}" == "1.00067457"
    assert logs.decision_line(decision) == (
        "Sparsity 12.543% vs target 80.0% → Lambda ↗ 1.00000000 → 1.00067457"
    )
    assert logs.step_line(100, 0.12543, decision.new) == "Step 100: Sparsity=12.543%, lambda=1.0007"
    assert logs.epoch_line(0, 0.12543) == "Epoch 0: Sparsity of pruned modules = 12.543%"


def test_above_target_lowers_lambda_and_at_target_keeps_it() -> None:
    down = next_lambda(1.0, 0.9, target=0.8, rate=0.01, **BOUNDS)
    assert down.new == pytest.approx(0.999) and down.arrow == "↘"
    same = next_lambda(1.0, 0.8, target=0.8, rate=0.01, **BOUNDS)
    assert same.new == 1.0 and same.arrow == "→" and same.reason == "rule"
    assert "Lambda → 1.00000000 → 1.00000000" in logs.decision_line(same)


def test_clamps_report_which_bound() -> None:
    low = next_lambda(0.001, 1.0, target=0.0, rate=1.0, min_lambda=0.0005, max_lambda=1.0)
    assert (low.new, low.reason) == (0.0005, "clamped to min_lambda")
    high = next_lambda(0.99, 0.0, target=1.0, rate=1.0, min_lambda=0.0, max_lambda=1.0)
    assert (high.new, high.reason) == (1.0, "clamped to max_lambda")


def test_multiplicative_rule_is_exp_of_the_error() -> None:
    decision = next_lambda(
        2e-4, 0.5, target=0.9, rate=2.0, min_lambda=1e-6, max_lambda=1.0, rule="multiplicative"
    )
    assert decision.new == pytest.approx(2e-4 * math.exp(2.0 * 0.4), rel=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_sparsity_never_moves_lambda(bad: float) -> None:
    decision = next_lambda(0.3, bad, target=0.8, rate=0.1, **BOUNDS)
    assert decision.new == 0.3 and decision.skipped


def test_decide_without_process_group_is_the_rule_and_honours_skips() -> None:
    args = {"target": 0.8, "rate": 0.001, **BOUNDS}
    assert decide(1.0, 0.12543, **args) == next_lambda(1.0, 0.12543, **args)
    skipped = decide(1.0, 0.12543, skip_reason="non-finite loss on 1 rank(s)", **args)
    assert skipped.new == 1.0 and skipped.skipped and isinstance(skipped, LambdaDecision)
