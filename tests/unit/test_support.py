"""The swap rule of a frozen support (:func:`dist_bregman.support.plan_swap`), against its
closed form: after a swap the held zeros are exactly the target, or, once no held zero is
left to free, every zero beyond those never freed."""

from __future__ import annotations

import pytest

from dist_bregman.support import Swap, plan_swap


def test_no_swap_while_the_zeros_are_the_held_set_or_nothing_is_held() -> None:
    assert plan_swap(held=36, zeros=36, untried=36) is None
    assert plan_swap(held=36, zeros=30, untried=36) is None  # below: the freeze's top-up
    assert plan_swap(held=0, zeros=5, untried=0) is None


def test_a_swap_frees_the_last_never_freed_zeros_one_for_each_that_did_not_regrow() -> None:
    """36 held, 44 zeros: the 8 freed at the freeze (places 36-43) did not regrow; they are
    held now and the last 8 never freed (places 28-35) are freed instead."""
    assert plan_swap(held=36, zeros=44, untried=36) == Swap((28, 36), 28, exhausted=False)
    # four of those regrew, four did not: 40 zeros, the next four freed are places 24-27
    assert plan_swap(held=36, zeros=40, untried=28) == Swap((24, 28), 24, exhausted=False)


def test_once_zeros_that_did_not_regrow_fill_the_held_set_all_untried_are_freed() -> None:
    assert plan_swap(held=36, zeros=78, untried=36) == Swap((0, 36), 0, exhausted=True)
    assert plan_swap(held=36, zeros=40, untried=4) == Swap((0, 4), 0, exhausted=True)


@pytest.mark.parametrize("held", [1, 7, 36])
def test_every_swap_holds_exactly_the_target_or_frees_all_that_is_left(held: int) -> None:
    for untried in range(held + 1):
        for zeros in range(held + 1, 3 * held + 3):
            swap = plan_swap(held, zeros, untried)
            assert swap is not None
            start, end = swap.free
            assert end == untried and 0 <= start <= end  # only never-freed zeros are freed
            assert swap.untried == start  # ... and the first ones stay never freed
            held_now = zeros - (end - start)
            if swap.exhausted:
                assert start == 0 and held_now >= held
            else:
                assert held_now == held and start > 0
