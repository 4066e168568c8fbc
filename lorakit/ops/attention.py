"""Attention for short sequences on CPU: two batched matmuls instead of the flash kernel.

PyTorch's CPU ``scaled_dot_product_attention`` runs a blocked ("flash") kernel. In bf16 its
backward is slow at the sequence lengths of instruction or classification fine-tuning (tens to
about a hundred tokens): with the embedded model's heads, batch 8 x 64 tokens, one layer's forward
+ backward takes ~7 ms, against ~3.5 ms for the plain formula softmax(q kᵀ · s + mask) v with
batched matmuls in float32 (benchmarks/attention.py; in fp32, and for forward only, the two are
even or SDPA wins, so those keep SDPA). This module provides that formula as one autograd node:

- grouped-query attention without ``repeat_kv`` copies: the query heads that share a key/value head
  are stacked along the rows, so (batch, kv heads, group · queries, head dim) @ kᵀ does every group
  in one matmul, and dL/dk, dL/dv sum over the group for free;
- scores, softmax, the output's product and the softmax gradient in float32 (float64 stays
  float64), as the flash kernel does for bf16 inputs; the three backward products whose results
  are rounded to half precision anyway (dL/dq, dL/dk, dL/dv) run in half precision from rounded
  probabilities and score gradients, as the flash kernel's backward does (fp32 accumulation;
  ~4x faster than float32 matmuls on this repo's CPU);
- saved for backward: q, k and v as they came and the float32 probabilities (batch, heads,
  queries, keys), which at these lengths is about what the flash kernel saves.

``attention_forward`` has the signature of transformers' attention interface and is registered as
``"lorakit"`` by ``use_lorakit_attention(model)``; it takes this path when gradients are needed,
the inputs are bf16 or fp16, the keys number at most ``SHORT_ATTENTION_MAX_KEYS`` and nothing exotic
is asked (attention dropout, soft-capping, sinks, a sliding window, a head mask, a KV cache longer
than the queries); otherwise it calls transformers' SDPA function unchanged. Gradients equal SDPA's (tests
compare them in float64, calling ``ShortAttention`` directly).
"""
from __future__ import annotations

from typing import Any

import torch

#: Longest key sequence that takes the matmul path; above it the flash kernel is as fast or faster
#: and saves less (its saved state grows with queries, not queries x keys). Measured on a 2-core
#: AVX-512 CPU (benchmarks/attention.py): bf16 forward + backward 0.3-0.5x SDPA's time up to 128
#: keys; at 192 keys 0.7-1.1x over runs, at 256 keys 1.1x.
SHORT_ATTENTION_MAX_KEYS = 128
_HALF = (torch.bfloat16, torch.float16)

_NAME = "lorakit"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class ShortAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v for q (B, H, S, D) and k, v (B, KV, T, D), H a multiple of KV.

    ``mask``: None, a boolean (True = attend) or an additive float tensor broadcastable to
    (B, 1 or H, S, T); ``causal``: also mask keys after each query (S == T). Returns (B, H, S, D)
    in q's dtype. Rows with every key masked give zeros (not NaN).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float, causal: bool) -> torch.Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):  # the float32 matmuls stay float32
            return ShortAttention._forward(ctx, q, k, v, mask, scale, causal)

    @staticmethod
    def _forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, causal: bool) -> torch.Tensor:
        B, H, S, D = q.shape
        KV, T = k.shape[1], k.shape[2]
        G = H // KV
        acc = _acc_dtype(q.dtype)
        qg = q.reshape(B, KV, G * S, D).to(acc)
        kf = k.to(acc)
        scores = torch.matmul(qg, kf.transpose(-1, -2)).mul_(scale)             # (B, KV, G·S, T)
        s5 = scores.view(B, KV, G, S, T)
        # Masks are added as 0 / -inf floats: several times faster than masked_fill_ on the scores.
        if mask is not None:
            m = _group_view(mask, B, KV, G, S, T)
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=acc, device=m.device).masked_fill_(~m, float("-inf"))
            s5.add_(m.to(acc))
        if causal:
            upper = torch.ones(S, T, dtype=torch.bool, device=q.device).triu_(T - S + 1)
            s5.add_(torch.zeros(S, T, dtype=acc, device=q.device).masked_fill_(upper, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        if mask is not None:
            probs.nan_to_num_(0.0)  # a row with every key masked: no attention, zero output
        out = torch.matmul(probs, v.to(acc))                                     # (B, KV, G·S, D)
        # q, k and v are kept as they came (half precision: half the bytes of float32 copies).
        ctx.save_for_backward(q.reshape(B, KV, G * S, D), k, v, probs)
        ctx.scale = scale
        return out.view(B, H, S, D).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qg, k, v, probs = ctx.saved_tensors
        B, KV, GS, D = qg.shape
        H = grad_out.shape[1]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        acc = probs.dtype
        # Products whose result is rounded to the input's half precision anyway (dL/dv, dL/dq, dL/dk)
        # run in that precision from rounded probabilities and score gradients, as the flash kernel
        # does (fp32 accumulation inside the matmul; ~4x faster than float32 here). dL/dP, which the
        # softmax gradient subtracts from its row sum, stays in float32 like the scores.
        low = qg.dtype if qg.dtype in _HALF else acc
        g = grad_out.reshape(B, KV, GS, D)
        grad_q = grad_k = grad_v = None
        if need_v:
            grad_v = torch.matmul(probs.to(low).transpose(-1, -2), g.to(low)).to(v.dtype)   # (B, KV, T, D)
        if need_q or need_k:
            dp = torch.matmul(g.to(acc), v.to(acc).transpose(-1, -2))                       # (B, KV, G·S, T)
            # dL/dscores = P ⊙ (dP − rowsum(dP ⊙ P)), then the score scale
            row = (dp * probs).sum(-1, keepdim=True)
            ds = dp.sub_(row).mul_(probs).mul_(ctx.scale).to(low)
            if need_q:
                grad_q = torch.matmul(ds, k.to(low)).view(B, H, GS * KV // H, D).to(qg.dtype)
            if need_k:
                grad_k = torch.matmul(ds.transpose(-1, -2), qg.to(low)).to(k.dtype)          # (B, KV, T, D)
        return grad_q, grad_k, grad_v, None, None, None


def _group_view(mask: torch.Tensor, B: int, KV: int, G: int, S: int, T: int) -> torch.Tensor:
    """A (B|1, 1|H, S|1, T) mask as a view broadcastable to scores (B, KV, G, S, T)."""
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-D (batch, heads, queries, keys), got shape {tuple(mask.shape)}")
    b, h = mask.shape[0], mask.shape[1]
    if h == 1:
        return mask.reshape(b, 1, 1, mask.shape[2], mask.shape[3])
    return mask.reshape(b, KV, G, mask.shape[2], mask.shape[3])


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """``ShortAttention`` with argument checks; q (B, H, S, D), k and v (B, KV, T, D) -> (B, H, S, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"expected q (B, H, S, D) and k = v (B, KV, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} key/value heads")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention with more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    return ShortAttention.apply(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else float(scale), causal)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function: the matmul path for short half-precision sequences
    that need gradients, else transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    S, T = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and S > 1
    exotic = (dropout or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None
              or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
              or kwargs.get("position_bias") is not None or kwargs.get("head_mask") is not None
              or kwargs.get("output_attentions"))
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if (exotic or not needs_grad or query.dtype not in _HALF or T > SHORT_ATTENTION_MAX_KEYS
            or (causal and S != T) or query.device.type != "cpu"
            or query.shape[1] % key.shape[1] or key.shape[-1] != value.shape[-1]
            or (attention_mask is not None and attention_mask.dim() != 4)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = ShortAttention.apply(query, key, value, attention_mask, scale, causal)
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register ``"lorakit"`` with transformers' attention and mask interfaces (SDPA's mask format).

    Returns False when this transformers version has no attention interface.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(_NAME, attention_forward)
    AttentionMaskInterface.register(_NAME, sdpa_mask)
    return True


def use_lorakit_attention(model: Any) -> bool:
    """Switch a transformers model that uses SDPA to ``attention_forward``; returns whether it did.

    Models on another implementation (eager, flash, flex) or that cannot switch are left as they are.
    ``restore_attention(model)`` switches back.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    if not register():
        return False
    try:
        model.set_attn_implementation(_NAME)
    except (ValueError, KeyError, ImportError, AttributeError, NotImplementedError):
        return False
    return getattr(model.config, "_attn_implementation", None) == _NAME


def restore_attention(model: Any) -> None:
    """Put a model switched by ``use_lorakit_attention`` back on SDPA."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == _NAME:
        model.set_attn_implementation("sdpa")
