"""LoRA for GPT-2's ``Conv1D`` (transformers): a Linear whose weight is stored transposed, (in, out).

A and B keep the Linear shapes (A: (r, in), B: (out, r)) — that is what PEFT writes with
``fan_in_fan_out=True`` — so only the merged ΔW needs a transpose.
"""
from __future__ import annotations

import torch

from lorakit.layers import register_layer_type
from lorakit.layers.linear import LoraLinear

try:  # transformers is a dependency, but keep the core importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


if Conv1D is not None:

    @register_layer_type(Conv1D)
    class LoraConv1D(LoraLinear):
        """LoRA on GPT-2's Conv1D: forward as a Linear, merge into the (in, out) weight."""

        def a_shape(self, r: int) -> tuple[int, ...]:
            return (r, self.base_layer.weight.shape[0])

        def b_shape(self, r: int) -> tuple[int, ...]:
            return (self.base_layer.nf, r)

        def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            return (B @ A).T
