"""The errors a run can end with, so callers (and tests) can tell them apart, and how their
messages name many tensors."""

from __future__ import annotations

from collections.abc import Sequence


class NonFiniteError(RuntimeError):
    """NaN or Inf in the weights (or in a state about to be checkpointed), seen by every
    rank together: the run stops before anything is decided from, or saved with, them."""


class RankDisagreementError(RuntimeError):
    """Ranks hold different lambdas or parameter sets (``check_agreement_every``)."""


def first_names(names: Sequence[str], most: int) -> str:
    """``names`` joined by commas, the first ``most`` of them and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
