"""LoRA for ``nn.Conv2d``: A is a conv with the base kernel (in -> r), B a 1×1 conv (r -> out).

A: (r, in, kh, kw), B: (out, r, 1, 1), as PEFT stores them. ΔW (out, in, kh, kw) = Σ_r B[:, r] · A[r].

A grouped base conv (``groups`` = G > 1) gets PEFT's layout for it: A stays a full conv over all
``in`` channels, B is a grouped 1×1 conv, (out, r/G, 1, 1), so output group g reads only the
rank channels g·r/G … (g+1)·r/G − 1 (r must be a multiple of G). Its update reaches across the
base's groups: ΔW is a dense (out, in, kh, kw) kernel that the base's (out, in/G, kh, kw) weight
cannot hold, so such an adapter runs unmerged only (PEFT refuses to merge it too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer


@register_layer_type(nn.Conv2d)
class LoraConv2d(LoraLayer):
    """LoRA on a Conv2d layer with zero padding mode (grouped or not)."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d needs padding_mode='zeros', got {base_layer.padding_mode!r}")
        super().__init__(base_layer)

    @property
    def rank_groups(self) -> int:
        return self.base_layer.groups

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.in_channels, *self.base_layer.kernel_size)

    def b_shape(self, r: int) -> tuple[int, ...]:
        groups = self.base_layer.groups
        if r % groups:
            raise ValueError(f"LoRA on a Conv2d with groups={groups} needs a rank divisible by {groups} (B is a "
                             f"grouped 1x1 conv there, {groups} groups of r/{groups} channels, as in PEFT); got r={r}")
        return (self.base_layer.out_channels, r // groups, 1, 1)

    def why_not_mergeable(self) -> str | None:
        groups = self.base_layer.groups
        if groups == 1:
            return super().why_not_mergeable()
        return (f"the Conv2d has groups={groups}: its LoRA update reaches across the groups, which the grouped "
                f"weight cannot hold (run the adapter unmerged)")

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # The base's stride / padding / dilation on A keep the output grid identical to the base's.
        hidden = F.conv2d(x.to(A.dtype), A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, B, groups=base.groups)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """ΔW = B @ A; with groups = G > 1 the dense (out, in, kh, kw) kernel of the whole branch,
        output group g taking its B rows against A's g-th block of r/G rows."""
        groups = self.base_layer.groups
        if groups == 1:
            return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
        A_g = A.reshape(groups, A.shape[0] // groups, *A.shape[1:])  # (G, r/G, in, kh, kw)
        B_g = B[:, :, 0, 0].reshape(groups, B.shape[0] // groups, B.shape[1])  # (G, out/G, r/G)
        return torch.einsum("gor,grikl->goikl", B_g, A_g).flatten(0, 1)
