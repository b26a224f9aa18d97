"""Lightning adapters over the framework-free core."""

from dist_bregman.callbacks.bregman import BregmanPruner

__all__ = ["BregmanPruner"]
