"""Lightning adapters over the framework-free core."""

from dist_bregman.callbacks.bregman import BregmanPruner
from dist_bregman.callbacks.pruning import SafeModelPruning

__all__ = ["BregmanPruner", "SafeModelPruning"]
