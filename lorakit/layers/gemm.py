"""fp32 products with frozen weights on the CPU, through oneDNN instead of MKL.

For a float32 ``F.linear`` / ``mm`` on the CPU, torch calls MKL's sgemm; torch's oneDNN build
(``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses for CPU linears) computes the same
products in the same precision (float32 inputs, float32 accumulation: no bf16 / tf32 rounding) and,
on this repo's 2-core AMD EPYC (AVX-512), ran the products of the embedded model's training step
1.35-1.45x faster (1024 tokens: 138-157 GFLOP/s against 204-219 for the layers' shapes, 121 against
162-177 for the 49152-wide head; benchmarks/train_step.py has the whole step). The two kernels sum
in other orders, so the results differ in the last bits: against a float64 product both are off by
a few float32 roundings of the sum, oneDNN's somewhat more (a review measured RMS errors of
3.9-5.9e-7 against MKL's 2.5-3.8e-7, max 3-5e-6 against 1.5-3e-6, on unit-scale products of
576 / 1536 terms at the model's shapes).

The functions here take oneDNN where it is there and on (``torch.backends.mkldnn.enabled``: turn
it off with ``torch.backends.mkldnn.flags(enabled=False)`` to get torch's own kernels back), for
plain float32 CPU tensors outside ``torch.compile``, and torch's own op otherwise (float64, half
precision, a GPU, tensor subclasses: the same ops as before). lorakit uses them where it computes a
training step's products itself: the frozen base of a LoRA Linear when something needs a gradient
(``frozen_linear``), the grouped q / k / v and gate / up nodes and the SwiGLU tail
(``lorakit.ops.grouped``, ``lorakit.ops.swiglu``), and the head of ``lorakit.ops.linear_cross_entropy``
with gradients on. Inference (no gradients, or nothing that needs one) and a disabled layer keep
torch's kernels, so there a model with adapters whose B is zero gives the base model's bits exactly;
a training forward (gradients wanted) equals them to rounding.

On Intel CPUs it is the other way round: MKL is Intel's library, and on a 2-core Intel Xeon
(AVX-512, AMX) its sgemm ran the same products as fast or faster (1024 tokens, 2 threads, median
of 7: x Wᵀ to 1536 outputs 326-341 against 244-318 GFLOP/s, dL/dx of that layer 326-330 against
220-312, the 49152-wide head's dL/dx at 160 rows 290-299 against 193-205; no shape slower beyond
the noise). The embedded model's fp32 LoRA step (4 x 256 tokens, r 16 all-linear, training
kernels), forward + backward, alone in its process: 2.44-2.61 s against 2.77-2.94 (two processes
each, 6 steps); two models in one process, interleaved: 0.937x oneDNN's time (8 rounds), 0.985x
with glibc keeping freed memory (the train-step benchmark's LoRA / full setting).
MKL's fastest paths are for Intel's own processors (on the EPYC it lost by the margins above), so
``ONEDNN_PAYS`` is False on an Intel CPU with torch's MKL, and every product there keeps torch's
kernel, training included (``_onednn_pays``; set the attribute to choose otherwise).

Small products stay with MKL: oneDNN's call costs a fixed ~20 µs here against MKL's ~6, so it only
pays from ``ONEDNN_MIN_MACS`` multiply-adds (rows × in × out) up. Measured side by side at 1 and 2
threads (x Wᵀ and g W, median of 200 calls): 32 × 32 × 32 took 15 / 24 µs with oneDNN against 2-7
with MKL, 128 × 64 × 256 (2.1 M) 1.18-1.31x MKL's time, 512 × 64 × 256 (8.4 M) 0.89-0.94x, the
embedded model's 1024 × 576 × 576 0.88-0.96x. A tiny model (hidden 32, 2 layers, 32 tokens) trained
its LoRA step through oneDNN in 1.34x PEFT's time.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

#: oneDNN's linear (x Wᵀ + b) and its variant with a sum post-op (other + x Wᵀ), or None without oneDNN.
_ONEDNN = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_SUM = None if _ONEDNN is None else _ONEDNN.binary
_PLAIN = (torch.Tensor, torch.nn.Parameter)

#: Products of fewer multiply-adds (rows × in × out) than this keep torch's kernel (module docstring);
#: set it to 0 to send every size to oneDNN.
ONEDNN_MIN_MACS = 1 << 23


def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...) where the system tells it
    (Linux's /proc/cpuinfo, Windows' processor description), else "". Read at import: elsewhere
    (macOS, an ARM Linux without a vendor line) ``platform.processor()`` would run ``uname -p`` in a
    subprocess (~7 ms), and does not name the vendor there anyway."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    if sys.platform != "win32":
        return ""
    text = platform.processor()  # "Intel64 Family 6 Model 167 Stepping 1, GenuineIntel"
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in text), "")


def _onednn_pays(vendor: str, mkl: bool) -> bool:
    """Whether oneDNN's fp32 products pay on a CPU of ``vendor`` whose torch has MKL (``mkl``): not
    on Intel's with MKL (module docstring); elsewhere, as measured on an AMD EPYC, they do."""
    return not (mkl and vendor == "GenuineIntel")


#: Whether big fp32 products take oneDNN at all on this machine (module docstring): False on an
#: Intel CPU where torch has MKL. Set it to True (or False) to choose; ``ONEDNN_MIN_MACS`` still
#: applies.
ONEDNN_PAYS = _onednn_pays(_cpu_vendor(), torch.backends.mkl.is_available())


def uses_onednn(*tensors: torch.Tensor | None) -> bool:
    """Whether products of ``tensors`` (a left operand, then weights / biases; None for a missing
    bias is skipped) go to oneDNN: all of them plain float32 CPU tensors, oneDNN built and enabled,
    no torch.compile tracing."""
    if _ONEDNN is None:
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.dtype is not torch.float32 or t.device.type != "cpu":
            return False
    return torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()


def worth_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN pays for the product of ``x`` (..., k) with ``weight`` (k values per output,
    any layout): on this CPU (``ONEDNN_PAYS``) and at this size (``ONEDNN_MIN_MACS``: rows of x ×
    weight's elements)."""
    return (ONEDNN_PAYS and x.dim() > 0 and x.shape[-1] > 0
            and x.numel() // x.shape[-1] * weight.numel() >= ONEDNN_MIN_MACS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` without autograd (call it under no_grad or inside an autograd
    Function): oneDNN where ``uses_onednn`` and ``worth_onednn``, else ``F.linear`` itself (its bits).
    ``x``: (..., in); ``weight``: (out, in). Not a view for autograd (an unsafe view, as ``F.linear``'s
    matmul makes without a bias): the output of an autograd Function computed with it may be changed
    in place later. (``F.linear`` of a 1-D or 3-D input with a bias returns a view of its 2-D product,
    which autograd refuses to let a Function's caller edit: that view is undone here.)"""
    # (shapes that do not fit, or no terms to sum, take F.linear: its error names them; oneDNN's would not)
    if (x.dim() and weight.dim() == 2 and x.shape[-1] == weight.shape[1] and x.shape[-1] and weight.shape[0]
            and (bias is None or bias.shape == weight.shape[:1]) and uses_onednn(x, weight, bias)
            and worth_onednn(x, weight)):
        if bias is not None and not bias.is_contiguous():  # (oneDNN reads the bias as contiguous memory)
            bias = bias.contiguous()
        out = _ONEDNN(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return out if x.dim() == 2 else torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))
    out = F.linear(x, weight, bias)
    whole = out._base
    if (whole is not None and type(out) is torch.Tensor and whole.numel() == out.numel()
            and whole.is_contiguous() and out.is_contiguous()):
        return torch.ops.aten._unsafe_view(whole, out.shape)  # the same memory and bits, not a view
    return out


def _times_weight_fits(g: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``g @ weight`` is a product oneDNN can take: two matrices that fit, with terms to sum
    and columns to make (else torch's op, whose error names the shapes)."""
    return g.dim() == weight.dim() == 2 and g.shape[1] == weight.shape[0] and bool(g.shape[1]) and bool(weight.shape[1])


def times_weight(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g @ weight`` for a 2-D ``g`` (tokens, out) and ``weight`` (out, in): dL/dx through a frozen
    linear layer, a fresh (tokens, in) tensor. No autograd (as ``linear``)."""
    if _times_weight_fits(g, weight) and uses_onednn(g, weight) and worth_onednn(g, weight):
        return _ONEDNN(g, weight.t(), None, "none", [], "")
    return g @ weight


def add_times_weight(into: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``into + g @ weight``: written into ``into`` (``addmm_``) by torch's kernel; with oneDNN a
    fresh tensor (its product with the sum as a post-op; ``into`` is released by the caller, so two
    such buffers exist for a moment): use the returned tensor."""
    if (_times_weight_fits(g, weight) and into.shape == (g.shape[0], weight.shape[1]) and uses_onednn(into, g, weight)
            and worth_onednn(g, weight)):
        return _ONEDNN_SUM(g, into, weight.t(), None, "add")
    return into.addmm_(g, weight)


class _FrozenLinear(torch.autograd.Function):
    """``linear(x, W, b)`` for a frozen W (and b): the gradient of x only, ``times_weight``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if torch.is_grad_enabled():  # backward(create_graph=True): an op autograd can differentiate again
            return grad @ weight, None, None
        return times_weight(grad.reshape(-1, grad.shape[-1]), weight).view(*grad.shape[:-1], weight.shape[1]), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with gradients for ``x`` only (``weight`` and ``bias`` must not
    require grad), its products by ``linear`` and ``times_weight``: a fresh tensor (not a view),
    which a LoRA branch may be added into in place. Under torch.func transforms (``grad``, ``vmap``)
    and forward-mode AD, which its autograd Function does not support, ``F.linear`` itself."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_linear: the weight and bias must be frozen (requires_grad=False)")
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return F.linear(x, weight, bias)
    return _FrozenLinear.apply(x, weight, bias)
