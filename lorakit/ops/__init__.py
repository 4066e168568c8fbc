"""Fused operations used on the training hot path."""
from lorakit.ops.attention import restore_attention, short_attention, use_lorakit_attention
from lorakit.ops.grouped import fuse_qkv_projections, unfuse_qkv_projections
from lorakit.ops.linear_cross_entropy import linear_cross_entropy
from lorakit.ops.rmsnorm import fuse_rmsnorms, unfuse_rmsnorms
from lorakit.ops.swiglu import fuse_swiglu_mlps, unfuse_swiglu_mlps

__all__ = ["fuse_qkv_projections", "fuse_rmsnorms", "fuse_swiglu_mlps", "linear_cross_entropy", "restore_attention", "short_attention",
           "unfuse_qkv_projections", "unfuse_rmsnorms", "unfuse_swiglu_mlps", "use_lorakit_attention"]
