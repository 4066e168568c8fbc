"""A fused LoRA branch for linear-like layers: one autograd node instead of five.

The plain branch ``result + s · B(A(dropout(x)))`` makes autograd keep the dropped-out copy of the
input (a full (tokens, in) float tensor per adapted layer) and allocate two (tokens, out) temporaries
(the scaled product and the sum). This function instead

- adds the branch into the base output in place, ``result.addmm_(h, Bᵀ, alpha=s)`` (no temporaries),
- saves for backward only the input ``x`` itself (usually already alive for other layers: q, k and v
  share it), the (tokens, r) product ``h`` and, with dropout, a 1-byte-per-element keep mask,
- recomputes the dropped-out input inside backward, where it is needed once for dL/dA.

The gradients equal the plain path's (tests compare them in float64).
"""
from __future__ import annotations

import torch


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask for inverted dropout with drop probability ``p``."""
    return torch.empty(shape, device=device).bernoulli_(1.0 - p).bool()


class FusedLoraLinear(torch.autograd.Function):
    """``result += scale · (drop(x) Aᵀ) Bᵀ`` in place; gradients for x, A, B and result."""

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, mask: torch.Tensor | None, keep: float) -> torch.Tensor:
        # Autocast off: the branch runs in the adapter's dtype, so backward sees the dtypes it saved.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xa = x2.to(A.dtype)
            if mask is not None:
                xa = xa * mask.reshape(xa.shape) / keep
            h = xa @ A.T                                           # (tokens, r)
            out2 = result.view(-1, result.shape[-1])
            out2.addmm_(h.to(result.dtype), B.T.to(result.dtype), alpha=scale)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, A, B, h, mask)
        ctx.scale, ctx.keep = scale, keep
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, A, B, h, mask = ctx.saved_tensors
        scale, keep = ctx.scale, ctx.keep
        g2 = grad.reshape(-1, grad.shape[-1]).to(B.dtype)
        gh = (g2 @ B) * scale                                      # (tokens, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = (g2.T @ h) * scale                            # (out, r)
        if ctx.needs_input_grad[2]:
            xa = x.reshape(-1, x.shape[-1]).to(A.dtype)
            if mask is not None:
                xa = xa * mask.reshape(xa.shape) / keep
            grad_A = gh.T @ xa                                     # (r, in)
        if ctx.needs_input_grad[1]:
            gx = gh @ A                                            # (tokens, in)
            if mask is not None:
                gx = gx * mask.reshape(gx.shape) / keep
            grad_x = gx.reshape(x.shape).to(x.dtype)
        return grad, grad_x, grad_A, grad_B, None, None, None


def fused_lora_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: float, p: float, training: bool) -> torch.Tensor:
    """``result + scale · B(A(dropout_p(x)))`` computed by ``FusedLoraLinear`` (result is reused).

    Falls back to the out-of-place formula where writing into ``result`` would not be safe (a view,
    or a tensor autograd may need unchanged).
    """
    use_dropout = training and p > 0
    mask = dropout_mask(x.shape, p, x.device) if use_dropout else None
    keep = 1.0 - p
    if result._base is not None or result.is_leaf and result.requires_grad:
        xa = x.to(A.dtype)
        if mask is not None:
            xa = xa * mask / keep
        return result + ((xa @ A.T) @ B.T * scale).to(result.dtype)
    return FusedLoraLinear.apply(result, x, A, B, scale, mask, keep)
