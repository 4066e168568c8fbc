"""LoRA for ``nn.Embedding``: e(i) = W[i] + s · (Aᵀ[i]) Bᵀ, A: (r, num_embeddings), B: (dim, r).

PEFT names these ``lora_embedding_A`` / ``lora_embedding_B`` on disk (no ``.weight``), and starts A at
zero and B random — the reverse of Linear — since a row lookup of a zero A gives a zero update too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer


@register_layer_type(nn.Embedding)
class LoraEmbedding(LoraLayer):
    """LoRA on an Embedding table (num_embeddings, dim)."""

    disk_names = ("lora_embedding_A", "lora_embedding_B")
    supports_dropout = False  # the input is token ids

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.num_embeddings)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.embedding_dim, r)

    def init_ab(self, A: torch.Tensor, B: torch.Tensor, r: int) -> None:
        nn.init.zeros_(A)
        nn.init.normal_(B)

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # Look up rows of Aᵀ (num_embeddings, r) with the base layer's padding and gradient settings.
        # (dense gradients for A even when the base's are sparse: a sparse gradient of Aᵀ cannot be
        # transposed back to A's layout.) Never with its max_norm: F.embedding renormalises the looked-up
        # rows of the table in place, which would rewrite A at every forward.
        rows = F.embedding(x, A.T, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, False)
        return rows @ B.T

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).T
