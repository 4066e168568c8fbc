"""LoRA for ``nn.Linear``: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, A: (r, in), B: (out, r)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer
from lorakit.layers.fused import fused_lora_add


@register_layer_type(nn.Linear)
class LoraLinear(LoraLayer):
    """LoRA on a Linear layer; the base weight is (out, in), so ΔW = B @ A as is."""

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.out_features, r)

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls, (.., in) -> (.., r) -> (.., out): O(r·(in+out)) per token, no (out, in) matrix.
        return F.linear(F.linear(x.to(A.dtype), A), B)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # One fused autograd node: in-place addmm, no saved dropout copy (see layers/fused.py).
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return fused_lora_add(result, x, self.lora_A[name], self.lora_B[name], self.scaling[name], p, self.training)
