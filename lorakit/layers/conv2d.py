"""LoRA for ``nn.Conv2d``: A is a conv with the base kernel (in -> r), B a 1×1 conv (r -> out).

A: (r, in, kh, kw), B: (out, r, 1, 1), as PEFT stores them. ΔW (out, in, kh, kw) = Σ_r B[:, r] · A[r].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer


@register_layer_type(nn.Conv2d)
class LoraConv2d(LoraLayer):
    """LoRA on a Conv2d layer with ``groups == 1`` and zero padding mode."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on Conv2d needs groups=1, got groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d needs padding_mode='zeros', got {base_layer.padding_mode!r}")
        super().__init__(base_layer)

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.in_channels, *self.base_layer.kernel_size)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.out_channels, r, 1, 1)

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # The base's stride / padding / dilation on A keep the output grid identical to the base's.
        hidden = F.conv2d(x.to(A.dtype), A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, B)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
