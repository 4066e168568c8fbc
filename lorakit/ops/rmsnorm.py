"""Llama-family RMSNorm whose output the LoRA nodes recompute instead of saving.

In a decoder layer the normalised hidden states y = w ⊙ (h · rstd) feed q/k/v (and gate/up)
projections. With LoRA on them, each fused LoRA node keeps y for dL/dA, while the norm itself
keeps its input h: two (tokens × hidden) tensors per norm. This node computes exactly what
transformers' ``LlamaRMSNorm`` computes (same ops, same order, so the output is bit-identical),
saves h and the per-token rstd, and tags its output with that recipe. A fused LoRA node that
receives a tagged input saves the recipe (h is already kept by the norm, rstd is one number per
token) and recomputes y in backward (``lorakit.layers.fused.recompute_norm``): on the embedded model, 4 × 256 tokens in fp32,
autograd keeps 141 MB less (two norms per layer × 30 layers × 2.4 MB).

``fuse_rmsnorms(model)`` switches every module whose ``forward`` is the Llama formula (Llama,
SmolLM2, Qwen2, Mistral, ...); other norms (Gemma's 1 + w, LayerNorm) are left alone. Gradients
equal the plain path's (tests compare them in float64).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch import nn

from lorakit.layers.fused import RMSNORM_RECIPE as RECIPE
from lorakit.layers.fused import SharedRecompute, first_order_only
from lorakit.layers.fused import recompute_norm as recompute
from lorakit.layers import fused
from lorakit.ops.patching import forward_body, patch_forwards, unpatch_forwards

_BODY = [
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
]


class RMSNormFn(torch.autograd.Function):
    """``weight * (h.float() * rsqrt(mean(h.float()²) + eps)).to(h.dtype)``; saves h and rstd.

    Computes in float32 like the module, except for float64 inputs, which stay float64 (the module
    itself rounds those through float32; ``_FusedNormForward`` leaves them to it).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h32 = h.to(torch.promote_types(h.dtype, torch.float32))  # float32 (float64 stays float64)
        rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
        recipe = (h, weight, rstd)
        y = recompute(recipe, h_acc=h32)
        ctx.save_for_backward(h, weight, rstd)
        if ctx.needs_input_grad[0]:
            # For the LoRA nodes that consume y (layers/fused.py): h is kept here anyway. (Not for an
            # input without gradient, e.g. the embeddings: keeping h there would only replace y.)
            # (with y's version: an in-place edit of y before a node reads it, a forward hook's
            # out.mul_(1.5), makes the recipe stale, and the node keeps y itself)
            setattr(y, RECIPE, (*recipe, SharedRecompute(), y._version))
        return y

    @staticmethod
    @first_order_only('RMSNorm', 'undo it with lorakit.ops.unfuse_rmsnorms(model)')
    @once_differentiable  # higher-order gradients: a clear error, not silently wrong ones
    def backward(ctx, grad: torch.Tensor):
        h, weight, rstd = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = rstd.dtype
        x32 = h.to(acc) * rstd                                     # x̂, once for both gradients
        grad_h = grad_w = None
        if need_w:
            grad_w = (grad * x32.to(h.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        if need_h:
            gx = (grad * weight).to(acc)                           # dL/d(x̂) through the cast
            # x̂ = h·r, r = (mean(h²) + eps)^-1/2:  dL/dh = r (gx − x̂ · mean(gx ⊙ x̂)); in place in
            # the two fresh buffers (x̂ is not needed after this)
            x32.mul_((gx * x32).mean(-1, keepdim=True))
            grad_h = gx.sub_(x32).mul_(rstd).to(h.dtype)
        return grad_h, grad_w, None


class _FusedNormForward:
    """Instance ``forward`` of a fused norm (a plain object, so deepcopy and pickling keep working)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        m = self.module
        # under torch.compile too: dynamo cannot trace the output's recipe tag and the shared
        # rebuild's counters (side effects), and the graph it made gave wrong gradients (0.13 off
        # on a 0.13 scale for a tiny Llama with the aot_eager backend)
        if (not torch.is_grad_enabled() or hidden_states.dtype == torch.float64 or not fused.kernels_pay(hidden_states)
                or torch.is_autocast_enabled(hidden_states.device.type) or torch.compiler.is_compiling()):
            return type(m).forward(m, hidden_states)
        return RMSNormFn.apply(hidden_states, m.weight, m.variance_epsilon)


def _is_llama_rmsnorm(module: nn.Module) -> bool:
    if not isinstance(getattr(module, "weight", None), nn.Parameter) or not hasattr(module, "variance_epsilon"):
        return False
    return forward_body(module) == _BODY


def fuse_rmsnorms(model: nn.Module) -> int:
    """Route every Llama-formula RMSNorm of ``model`` through ``RMSNormFn``; returns how many.

    Safe to call more than once and before or after injecting LoRA; ``unfuse_rmsnorms`` undoes it.
    Without gradients, for float64 inputs, under autocast or under ``torch.compile`` the module's own
    forward runs. Call it on the model you call ``.train()`` on: transformers' hub kernels, which it
    turns off there (``lorakit.ops.patching.hub_kernels_off``), would otherwise put the norms' own
    forward back at every ``.train()`` / ``.eval()``.
    """
    return patch_forwards(model, _FusedNormForward, _is_llama_rmsnorm)


def unfuse_rmsnorms(model: nn.Module) -> int:
    """Give every fused norm of ``model`` its own forward back; returns how many were restored."""
    return unpatch_forwards(model, _FusedNormForward)
