"""Sparsity-inducing regularizers J: value, subgradient and proximal map. Pure torch.

The proximal map of ``t * J`` is what makes exact zeros: a gradient step on ``|x|`` only
oscillates around zero, while ``prox_{t|.|}(x) = sign(x) * max(|x| - t, 0)`` lands on it.
Nothing here communicates; under sharding each rank applies these to its local elements,
which is exact for elementwise J.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch


class Regularizer(ABC):
    """A convex, nonnegative J with a cheap proximal map."""

    name: str = "regularizer"

    @abstractmethod
    def value(self, x: torch.Tensor) -> torch.Tensor:
        """``J(x)`` as a 0-d tensor, differentiable in ``x``."""

    @abstractmethod
    def subgradient(self, x: torch.Tensor) -> torch.Tensor:
        """An element of the subdifferential ``dJ(x)`` (0 where J is not differentiable)."""

    @abstractmethod
    def prox_(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """Replace ``x`` by ``argmin_z 0.5*||z - x||^2 + threshold * J(z)``, in place."""

    def prox_all_(self, tensors: Iterable[torch.Tensor], threshold: float) -> None:
        """:meth:`prox_` on each tensor (one threshold, e.g. one optimizer param group)."""
        for x in tensors:
            self.prox_(x, threshold)


class L1(Regularizer):
    """``J(x) = sum |x_i|``: elementwise sparsity; its prox is soft-thresholding."""

    name = "l1"

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().sum()

    def subgradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.sign()

    def prox_(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        # x - clamp(x, -t, t) is sign(x) * max(|x| - t, 0), with exact zeros where |x| <= t.
        return x.sub_(x.clamp(-threshold, threshold))
