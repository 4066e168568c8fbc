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
- causal attention runs in blocks of ``QUERY_BLOCK`` queries, each against the keys up to its last
  query only, which skips most of the masked upper triangle: at 256 tokens and blocks of 64, 5/8 of
  the full products and of the saved probabilities;
- saved for backward: q, k and v as they came and the float32 probabilities (batch, heads,
  queries, keys; the blocks' parts of it when causal) — more than the flash kernel saves (its
  output and one log-sum-exp per row), ~6 MB per layer at 4 x 256 tokens with this model's heads.

``attention_forward`` has the signature of transformers' attention interface and is registered as
``"lorakit"`` by ``use_lorakit_attention(model)``; it takes this path when gradients are needed,
the inputs are bf16 or fp16, the keys number at most ``SHORT_ATTENTION_MAX_KEYS`` (any mask) or
``CAUSAL_ATTENTION_MAX_KEYS`` (causal: no mask, or a boolean one that lets no query see a later key,
as causal masks with padding are) and nothing exotic is asked (attention dropout, soft-capping,
sinks, a sliding window, a head mask, a KV cache longer than the queries); otherwise it calls
transformers' SDPA function unchanged. Gradients equal SDPA's (tests compare them in float64,
calling ``ShortAttention`` directly).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from lorakit.layers.fused import first_order_only

#: Longest key sequence that takes the matmul path with any mask; above it the flash kernel is as
#: fast or faster and saves less (its saved state grows with queries, not queries x keys). Measured
#: on a 2-core AVX-512 CPU (benchmarks/attention.py): bf16 forward + backward 0.3-0.5x SDPA's time
#: up to 128 keys; with one block of queries, 0.7-1.1x at 192 keys and 1.1-1.4x at 256.
SHORT_ATTENTION_MAX_KEYS = 128
#: Longest key sequence for causal attention, which runs in blocks of ``QUERY_BLOCK`` queries
#: (``_query_blocks``): at 4 x 256 tokens, bf16 forward + backward 0.7-0.8x SDPA's time (one block:
#: 1.1-1.4x), the probabilities saved 5/8 of one block's.
CAUSAL_ATTENTION_MAX_KEYS = 256
QUERY_BLOCK = 64
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
        blocks = _query_blocks(S, T, causal)
        q5 = q.reshape(B, KV, G, S, D)
        kf, vf = k.to(acc), v.to(acc)
        m5 = None
        if mask is not None:
            m5 = _group_view(mask, B, KV, G, S, T)
            if m5.dtype == torch.bool:
                # added as 0 / -inf floats: several times faster than masked_fill_ on the scores
                m5 = torch.zeros(m5.shape, dtype=acc, device=m5.device).masked_fill_(~m5, float("-inf"))
            else:
                m5 = m5.to(acc)
        out = torch.empty(B, KV, G, S, D, dtype=acc, device=q.device) if len(blocks) > 1 else None
        probs_list = []
        for s0, e, kend in blocks:
            n = e - s0
            qb = q5[:, :, :, s0:e].reshape(B, KV, G * n, D).to(acc)
            scores = torch.matmul(qb, kf[:, :, :kend].transpose(-1, -2)).mul_(scale)   # (B, KV, G·n, kend)
            s5 = scores.view(B, KV, G, n, kend)
            if m5 is not None:
                s5.add_(m5[..., s0:e, :kend] if m5.shape[-2] > 1 else m5[..., :kend])
            if causal:  # query s0 + i sees keys up to s0 + i + T - S, i.e. kend - n + i within the block
                upper = torch.ones(n, kend, dtype=torch.bool, device=q.device).triu_(kend - n + 1)
                s5.add_(torch.zeros(n, kend, dtype=acc, device=q.device).masked_fill_(upper, float("-inf")))
            probs = torch.softmax(scores, dim=-1)
            if mask is not None:
                probs.nan_to_num_(0.0)  # a row with every key masked: no attention, zero output
            ob = torch.matmul(probs, vf[:, :, :kend])                                  # (B, KV, G·n, D)
            if out is None:
                out = ob
            else:
                out[:, :, :, s0:e] = ob.view(B, KV, G, n, D)
            probs_list.append(probs)
        # q, k and v are kept as they came (half precision: half the bytes of float32 copies).
        ctx.save_for_backward(q5, k, v, *probs_list)
        ctx.scale, ctx.blocks = scale, blocks
        return out.view(B, H, S, D).to(q.dtype)

    @staticmethod
    @first_order_only('attention', 'undo it with lorakit.ops.restore_attention(model)')
    @once_differentiable  # higher-order gradients: a clear error, not silently wrong ones
    def backward(ctx, grad_out: torch.Tensor):
        q5, k, v, *probs_list = ctx.saved_tensors
        B, KV, G, S, D = q5.shape
        T = k.shape[2]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        acc = probs_list[0].dtype
        blocks = ctx.blocks
        # Products whose result is rounded to the input's half precision anyway (dL/dv, dL/dq, dL/dk)
        # run in that precision from rounded probabilities and score gradients, as the flash kernel
        # does (fp32 accumulation inside the matmul; ~4x faster than float32 here). dL/dP, which the
        # softmax gradient subtracts from its row sum, stays in float32 like the scores.
        low = q5.dtype if q5.dtype in _HALF else acc
        g5 = grad_out.reshape(B, KV, G, S, D)
        one = len(blocks) == 1
        # several query blocks: dL/dk and dL/dv summed over the blocks in float32, rounded once. One
        # block (the short sequences of the demo) takes each product as it is: zero-filled float32
        # sums and the copies into them made 8 x 64 bf16 forward + backward ~12% slower (2.43 vs 2.14 ms)
        grad_q = torch.empty(B, KV, G, S, D, dtype=q5.dtype, device=q5.device) if need_q and not one else None
        grad_k = torch.zeros(B, KV, T, D, dtype=acc, device=k.device) if need_k and not one else None
        grad_v = torch.zeros(B, KV, T, D, dtype=acc, device=v.device) if need_v and not one else None
        kl, vf = k.to(low), v.to(acc)
        for (s0, e, kend), probs in zip(blocks, probs_list):
            n = e - s0
            gb = g5[:, :, :, s0:e].reshape(B, KV, G * n, D)
            if need_v:
                gv = torch.matmul(probs.to(low).transpose(-1, -2), gb.to(low))              # (B, KV, kend, D)
                if one:
                    grad_v = gv.to(v.dtype)
                else:
                    grad_v[:, :, :kend] += gv
            if need_q or need_k:
                dp = torch.matmul(gb.to(acc), vf[:, :, :kend].transpose(-1, -2))            # (B, KV, G·n, kend)
                # dL/dscores = P ⊙ (dP − rowsum(dP ⊙ P)), then the score scale
                row = (dp * probs).sum(-1, keepdim=True)
                ds = dp.sub_(row).mul_(probs).mul_(ctx.scale).to(low)
                if need_q:
                    gq = torch.matmul(ds, kl[:, :, :kend])                                   # (B, KV, G·n, D)
                    if one:
                        grad_q = gq.to(q5.dtype)
                    else:
                        grad_q[:, :, :, s0:e] = gq.view(B, KV, G, n, D)
                if need_k:
                    qb = q5[:, :, :, s0:e].reshape(B, KV, G * n, D).to(low)
                    gk = torch.matmul(ds.transpose(-1, -2), qb)                              # (B, KV, kend, D)
                    if one:
                        grad_k = gk.to(k.dtype)
                    else:
                        grad_k[:, :, :kend] += gk
        H = KV * G
        if grad_q is not None:
            grad_q = grad_q.reshape(B, H, S, D)
        if grad_k is not None:
            grad_k = grad_k.to(k.dtype)
        if grad_v is not None:
            grad_v = grad_v.to(v.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def _query_blocks(S: int, T: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each query block: causal attention needs the keys only up
    to its block's last query, so blocks of ``QUERY_BLOCK`` queries skip most of the masked upper
    triangle's work (and its saved probabilities): 5/8 of the full product at 4 blocks."""
    if not causal or S <= QUERY_BLOCK:
        return [(0, S, T)]
    return [(s0, min(S, s0 + QUERY_BLOCK), min(S, s0 + QUERY_BLOCK) + T - S) for s0 in range(0, S, QUERY_BLOCK)]


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
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention here needs as many queries as keys, got {q.shape[2]} queries and "
                         f"{k.shape[2]} keys (with a KV cache, pass the mask instead)")
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
    if (not causal and S == T and SHORT_ATTENTION_MAX_KEYS < T <= CAUSAL_ATTENTION_MAX_KEYS
            and attention_mask is not None and _is_causal_mask(attention_mask)):
        causal = True  # a causal mask with padding: the query blocks apply too (the mask is added as well)
    if (exotic or not needs_grad or query.dtype not in _HALF
            or T > (CAUSAL_ATTENTION_MAX_KEYS if causal else SHORT_ATTENTION_MAX_KEYS)
            or (causal and S != T) or query.device.type != "cpu"
            or query.shape[1] % key.shape[1] or key.shape[-1] != value.shape[-1]
            or (attention_mask is not None and attention_mask.dim() != 4)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = ShortAttention.apply(query, key, value, attention_mask, scale, causal)
    return out.transpose(1, 2).contiguous(), None


_last_mask: tuple[Any, int | None, bool] = (None, None, False)


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether a boolean (B, 1|H, S, S) mask lets no query see a later key (causal plus padding);
    remembered for the last mask seen, which transformers passes to every layer of a forward, with
    its version counter (a mask edited in place since is checked again: it was read as still causal)."""
    global _last_mask
    ref, version, answer = _last_mask
    if ref is not None and ref() is mask and not mask.is_inference() and mask._version == version:
        return answer
    answer = mask.dtype == torch.bool and mask.dim() == 4 and not bool(mask.triu(1).any())
    _last_mask = (weakref.ref(mask), None if mask.is_inference() else mask._version, answer)
    return answer


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
