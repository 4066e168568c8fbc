"""Fused operations used on the training hot path."""
from lorakit.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
