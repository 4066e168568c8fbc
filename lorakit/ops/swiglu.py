"""The tail of a SwiGLU MLP, ``down(silu(g) * u)``, as one autograd node that saves only g and u.

In a Llama-style MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, autograd keeps four
(tokens × intermediate) tensors per layer for backward: g, silu(g), u, and the product p (the input
of a LoRA-adapted ``down_proj``). For SmolLM2-135M with a 4 × 256 batch that is 24 MB per layer, 60%
of everything a LoRA step saves. ``_SwiGLUDown`` saves only g and u (plus the (tokens × r) LoRA
product) and recomputes silu(g) and p in backward, two cheap elementwise passes. The frozen
``down_proj`` base weight needs no saved input at all; its LoRA branch gets p recomputed, with the
dropout mask kept as bits as in ``lorakit.layers.fused``.

``fuse_swiglu_mlps(model)`` switches every MLP whose ``forward`` is exactly that expression (found by
reading its source) and whose activation is SiLU to the fused path. The fused path is taken only
when it is equivalent — gradients enabled, no autocast, ``down_proj`` a frozen ``nn.Linear`` or a
LoRA Linear with one active, unmerged, plain adapter and no mixed-adapter batch — and the module's
own forward runs otherwise. Gradients equal the unfused path's (tests compare them in float64).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F
from torch import nn

from lorakit.layers.fused import KeepMask, add_branch, branch_dtype, branch_grads, first_order_only
from lorakit.layers import fused, gemm
from lorakit.ops.grouped import linear_plan, shared_input_linears
from lorakit.ops.patching import forward_body, patch_forwards, unpatch_forwards

_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class _SwiGLUDown(torch.autograd.Function):
    """``F.linear(silu(g) * u, W, b) + scale · B(A(drop(silu(g) * u)))``; saves g, u and the rank-r product."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor | None, B: torch.Tensor | None, scale: float, drop: KeepMask | None) -> torch.Tensor:
        prod = F.silu(gate).mul_(up)  # one (tokens, intermediate) allocation instead of two
        out = gemm.linear(prod, weight, bias)
        h = None
        if A is not None:
            x2 = prod.reshape(-1, prod.shape[-1]).to(branch_dtype(out.dtype, A.dtype))
            h = add_branch(out.view(-1, out.shape[-1]), x2, A, B, scale, drop)
        ctx.save_for_backward(gate, up, weight, A, B, h)
        ctx.scale, ctx.drop = scale, drop
        return out

    @staticmethod
    @first_order_only('SwiGLU MLP', 'undo it with lorakit.ops.unfuse_swiglu_mlps(model)')
    @once_differentiable  # higher-order gradients: a clear error, not silently wrong ones
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight, A, B, h = ctx.saved_tensors
        scale, drop = ctx.scale, ctx.drop
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_prod = gemm.times_weight(g2.to(weight.dtype), weight).to(gate.dtype).reshape(gate.shape)  # through the frozen base
        silu = F.silu(gate)  # the forward's silu(g), bit for bit (gate · σ(gate) may round differently)
        need = ctx.needs_input_grad
        grad_A = grad_B = None
        if A is not None:  # the LoRA branch of down_proj, its input (silu(g)·u) recomputed
            into = grad_prod.view(-1, grad_prod.shape[-1])  # a fresh tensor: in place is safe
            gp, grad_A, grad_B = branch_grads(g2, lambda: _product(silu, up).to(h.dtype), A, B, h,
                                              scale, drop, need[0] or need[1], need[4], need[5], grad_x_into=into)
            if gp is not None and gp is not into:
                grad_prod.add_(gp.reshape(grad_prod.shape).to(grad_prod.dtype))
        grad_up = silu.mul_(grad_prod) if need[1] else None  # silu(g) is not needed after this
        grad_gate = None
        if need[0]:
            # dL/dg = (dL/dp ⊙ u) ⊙ silu'(g) by the kernel autograd uses for F.silu (one pass, rounded
            # once: the same values as the unfused path), in place in dL/dp, which is not needed after
            # this: two passes and no fresh (tokens, intermediate) tensor instead of six and one
            grad_prod.mul_(up)
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_prod, gate, grad_input=grad_prod)
        return grad_gate, grad_up, None, None, grad_A, grad_B, None, None


def _product(silu: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu * up`` as (tokens, intermediate), in a per-thread buffer that every layer's backward reuses
    (valid until the next call): a fresh (tokens, intermediate) tensor per layer was often memory
    glibc had just handed back to the OS, mapped again page by page (on the embedded model, 4 × 256
    tokens, fp32, under the profiler: 4.9 ms a layer against 0.34 for an in-place product of that
    size; the step's page faults 73,000 → 62,600, its forward + backward 0.987 of the time, 8
    interleaved rounds)."""
    buf = fused._WORKSPACE.take("swiglu_product", up.numel(), torch.result_type(silu, up), up.device)
    return torch.mul(silu, up, out=buf.view(up.shape)).view(-1, up.shape[-1])


class _FusedMLPForward:
    """Instance ``forward`` of a fused MLP (a plain object, so deepcopy and pickling keep working)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        plan = (linear_plan(m.down_proj) if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and fused.kernels_pay(x) else None)  # (a small input: the plain MLP, see KERNELS_MIN_NUMEL)
        if plan is None:
            return type(m).forward(m, x)
        weight, bias, A, B, scale, p = plan
        pair = shared_input_linears(x, [m.gate_proj, m.up_proj])  # one node for both, where equivalent
        gate, up = pair if pair is not None else (m.gate_proj(x), m.up_proj(x))
        if not (gate.requires_grad or up.requires_grad or (A is not None and A.requires_grad)):
            return m.down_proj(m.act_fn(gate) * up)  # nothing to differentiate: the plain tail
        drop = KeepMask((gate.numel() // gate.shape[-1], gate.shape[-1]), p, gate.device, reuse=True) if p > 0 else None
        return _SwiGLUDown.apply(gate, up, weight, bias, A, B, scale, drop)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    act = module.act_fn
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    return forward_body(module) in ([f"return {_EXPRESSION}"], [f"down_proj = {_EXPRESSION}", "return down_proj"])


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Route every SwiGLU MLP of ``model`` through the fused tail; returns how many were switched.

    Safe to call more than once and before or after injecting LoRA; ``unfuse_swiglu_mlps`` undoes it.
    Modules whose forward is not exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU
    activation are left alone.
    """
    return patch_forwards(model, _FusedMLPForward, _is_swiglu_mlp)


def unfuse_swiglu_mlps(model: nn.Module) -> int:
    """Give every fused MLP of ``model`` its own forward back; returns how many were restored."""
    return unpatch_forwards(model, _FusedMLPForward)
