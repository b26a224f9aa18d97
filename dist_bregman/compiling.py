"""Calls that run eagerly under ``torch.compile``, without importing Dynamo at import.

The calls a training step makes into the library (the loss term, the loss kept for the
next check, the lambda update, the measurement) run C++ kernels, host-side decisions and
collectives, which Dynamo cannot trace: a compiled step that traced into them warned about
each, recompiled as the step number changed, and broke its graph there anyway.
``torch.compiler.disable`` says so up front, but applied as a decorator it imports Dynamo
with ``dist_bregman`` (0.5 s a process here, a third of the import). A torch optimizer,
DDP or Lightning imports Dynamo anyway; a script that only measures a checkpoint never
does. So :func:`eager` disables at the first call (about 0.3 us a call after that).
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
