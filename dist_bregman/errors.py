"""The errors a run can end with, so callers (and tests) can tell them apart."""

from __future__ import annotations


class NonFiniteError(RuntimeError):
    """NaN or Inf in the weights (or in a state about to be checkpointed), seen by every
    rank together: the run stops before anything is decided from, or saved with, them."""


class RankDisagreementError(RuntimeError):
    """Ranks hold different lambdas or parameter sets (``check_agreement_every``)."""
