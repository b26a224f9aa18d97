"""The callbacks for the standalone ``pytorch_lightning`` package, in Python and in YAML.

Lightning 2.x is one trainer published under two names with classes of their own:
``lightning`` (``lightning.pytorch``), whose classes ``dist_bregman.BregmanPruner`` and the
others extend, and ``pytorch-lightning`` (which ``lightning`` installs too). A
``pytorch_lightning`` Trainer runs ``dist_bregman.BregmanPruner`` given in Python, but that
package's ``LightningCLI`` refuses it in a YAML config ("does not correspond to a subclass
of Callback"), and Lightning's ``WeightAveraging`` cannot set up a ``pytorch_lightning``
model. The classes here are the same callbacks, built on ``pytorch_lightning``'s classes as
well::

    from dist_bregman.pytorch_lightning import BregmanPruner, SafeModelPruning

    trainer:
      callbacks:
        - class_path: dist_bregman.pytorch_lightning.BregmanPruner
          init_args: {target_sparsity: 0.9}

They run under a ``lightning.pytorch`` Trainer too, and checkpoints carry their state under
the same keys as the ``dist_bregman`` classes'.
"""

from __future__ import annotations

import pytorch_lightning
from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging

from dist_bregman.callbacks import bregman, pruning
from dist_bregman.callbacks.sparse_averaging import KeepSupportEMA, KeepSupportSWA

__all__ = [
    "BregmanPruner",
    "SafeModelPruning",
    "SparseStochasticWeightAveraging",
    "SparseWeightAveraging",
]


# The two Callback bases' hooks are typed with their own package's Trainer and
# LightningModule, which mypy reports as incompatible definitions: at run time they are the
# same no-op hooks, and ours override them.
class BregmanPruner(bregman.BregmanPruner, pytorch_lightning.Callback):  # type: ignore[misc]
    """:class:`dist_bregman.BregmanPruner`, also a ``pytorch_lightning`` callback."""


class SafeModelPruning(pruning.SafeModelPruning, pytorch_lightning.Callback):  # type: ignore[misc]
    """:class:`dist_bregman.SafeModelPruning`, also a ``pytorch_lightning`` callback."""


class SparseWeightAveraging(KeepSupportEMA, WeightAveraging):
    """:class:`dist_bregman.SparseWeightAveraging` on ``pytorch_lightning``'s
    ``WeightAveraging``."""


class SparseStochasticWeightAveraging(KeepSupportSWA, StochasticWeightAveraging):
    """:class:`dist_bregman.SparseStochasticWeightAveraging` on ``pytorch_lightning``'s
    ``StochasticWeightAveraging``."""
