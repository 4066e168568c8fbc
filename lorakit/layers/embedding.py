"""LoRA for ``nn.Embedding``: e(i) = W[i] + s · (Aᵀ[i]) Bᵀ, A: (r, num_embeddings), B: (dim, r)
(times ``embed_scale`` on a scaled embedding, which multiplies its lookups by that factor).

PEFT names these ``lora_embedding_A`` / ``lora_embedding_B`` on disk (no ``.weight``), and starts A at
zero and B random — the reverse of Linear — since a row lookup of a zero A gives a zero update too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer


def embed_scale(base: nn.Module) -> torch.Tensor | float | None:
    """The factor a scaled embedding (``*ScaledWordEmbedding`` in transformers: Gemma, BART, ...)
    multiplies its output by (its ``embed_scale``: a number or a one-element tensor), or None.

    Raises:
        ValueError: ``embed_scale`` is a tensor of more than one element (how the base applies it
            is then unknown).
    """
    scale = getattr(base, "embed_scale", None)
    if scale is None or isinstance(scale, (int, float)):
        return scale
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
    raise ValueError(f"{type(base).__name__}.embed_scale is {shape}, not a number: lorakit cannot tell how "
                     "the embedding applies it, so it cannot scale the LoRA update to match")


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

    def init_gaussian(self, A: torch.Tensor, B: torch.Tensor, r: int) -> None:
        """As ``init_ab``: PEFT initialises an embedding's adapter so whatever the init name."""
        self.init_ab(A, B, r)

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # Look up rows of Aᵀ (num_embeddings, r) with the base layer's padding and gradient settings.
        # (dense gradients for A even when the base's are sparse: a sparse gradient of Aᵀ cannot be
        # transposed back to A's layout.) Never with its max_norm: F.embedding renormalises the looked-up
        # rows of the table in place, which would rewrite A at every forward.
        rows = F.embedding(x, A.T, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, False)
        out = rows @ B.T
        scale = embed_scale(base)
        # a scaled embedding (Gemma's, BART's, ...) multiplies its lookups by embed_scale in its forward,
        # so the update's rows are scaled too: then merged (W + ΔW, looked up, scaled) equals unmerged,
        # as in PEFT 0.21 (which applies it after the LoRA scaling; the order is rounding only)
        return out if scale is None else out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (B @ A).T  # (PEFT's merge forms this product: merged weights equal to the bit, float64 too)

    def norm_delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # PEFT's DoRA forward forms Aᵀ Bᵀ for the column norm; laid out like the weight (num, dim), its
        # sum with the weight at every forward is also ~3x faster than with the transposed view of B A
        # (0.06 s vs 0.21 s at 49152 x 576, one thread: DoRA on an Embedding ran 1.5x PEFT's time)
        return A.T @ B.T
