"""dist_bregman: drive a PyTorch model to a target sparsity with Bregman regularization.

One sparsity number for the whole job (mask-aware, replicas counted once, shards summed
without padding, one all-reduce), lambda decided on rank 0 and broadcast, and proximal steps
that make exact zeros in the tensors the optimizer holds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dist_bregman.averaging import KeepSupport
from dist_bregman.config import BregmanConfig
from dist_bregman.control import LambdaDecision, next_lambda
from dist_bregman.controller import SparsityController
from dist_bregman.param_groups import regularized_groups
from dist_bregman.pruning import MagnitudePruner, PruningConfig
from dist_bregman.regularizers import L1, Regularizer
from dist_bregman.sparsity import SparsityReport, measure_sparsity

if TYPE_CHECKING:
    from dist_bregman.callbacks.bregman import BregmanPruner
    from dist_bregman.callbacks.pruning import SafeModelPruning
    from dist_bregman.callbacks.sparse_averaging import (
        SparseStochasticWeightAveraging,
        SparseWeightAveraging,
    )

_LIGHTNING = {
    "BregmanPruner": "dist_bregman.callbacks.bregman",
    "SafeModelPruning": "dist_bregman.callbacks.pruning",
    "SparseStochasticWeightAveraging": "dist_bregman.callbacks.sparse_averaging",
    "SparseWeightAveraging": "dist_bregman.callbacks.sparse_averaging",
}
"""The Lightning callbacks, imported on first use: the core (the controller, counting,
regularizers, optimizers) imports without Lightning, so a raw torchrun or DeepSpeed loop
neither installs it (it is the ``lightning`` extra) nor pays for importing it
(``benchmarks/import_time.py`` on 2 cores: 4.2 s a process instead of 8.3 s)."""


def __getattr__(name: str) -> object:
    module = _LIGHTNING.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_bregman' has no attribute {name!r}")
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "lightning":
            raise
        raise ModuleNotFoundError(
            f"dist_bregman.{name} is a Lightning callback and Lightning is not installed: "
            "pip install 'dist_bregman[lightning]' (the core runs without it)",
            name=error.name,
        ) from error
    value = getattr(imported, name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "L1",
    "BregmanConfig",
    "BregmanPruner",
    "KeepSupport",
    "LambdaDecision",
    "MagnitudePruner",
    "PruningConfig",
    "Regularizer",
    "SafeModelPruning",
    "SparseStochasticWeightAveraging",
    "SparseWeightAveraging",
    "SparsityController",
    "SparsityReport",
    "measure_sparsity",
    "next_lambda",
    "regularized_groups",
]
__version__ = "0.1.0"
