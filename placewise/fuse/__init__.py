"""Optimizer fusion: the update of a standard torch optimizer fused into backward or the next forward."""

from placewise.fuse.api import fuse_optimizer
from placewise.fuse.optimizer import MODES, FusedOptimizer
from placewise.fuse.sizing import BucketChoice

__all__ = ["MODES", "BucketChoice", "FusedOptimizer", "fuse_optimizer"]
