"""Optimizer fusion: the update of a standard torch optimizer fused into backward or the next forward."""

from placewise.fuse.fused import MODES, FusedOptimizer, fuse_optimizer

__all__ = ["MODES", "FusedOptimizer", "fuse_optimizer"]
