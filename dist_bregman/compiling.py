"""Calls that run eagerly under ``torch.compile``, without importing Dynamo at import.

The loss term calls the C++ kernels (and, sharded, an all-reduce), which Dynamo cannot
trace: a compiled ``training_step`` that traced into it warned about each and broke its
graph there anyway. ``torch.compiler.disable`` says so up front, but applied as a decorator
it imports Dynamo with ``dist_bregman`` (0.5 s a process here, a third of the import). A
torch optimizer, DDP or Lightning imports Dynamo anyway; a script that only measures a
checkpoint never does. So :func:`eager` disables at the first call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_T = TypeVar("_T")


def eager(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` under ``torch.compiler.disable``, wrapped at its first call. Called first
    inside a compiled function, Dynamo breaks the graph at ``disable`` (a function it
    skips, silently) and the call runs eagerly all the same."""
    disabled: Callable[_P, _T] | None = None

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call
