"""A fused LoRA branch for linear-like layers: one autograd node instead of five.

The plain branch ``result + s · B(A(dropout(x)))`` makes autograd keep the dropped-out copy of the
input (a full (tokens, in) float tensor per adapted layer) and allocate two (tokens, out) temporaries
(the scaled product and the sum). This function instead

- adds the branch into the base output in place, ``result.addmm_(h, Bᵀ, alpha=s)`` (no temporaries),
- saves for backward only the input ``x`` itself (usually already alive for other layers: q, k and v
  share it) and the (tokens, r) product ``h``,
- keeps no dropout copy of the input: the mask is kept as bits between forward and backward
  (``KeepMask``), 1/32 of the float32 copy, and unpacked once in backward for dL/dA and dL/dx.

The gradients equal the plain path's (tests compare them in float64).

Dropout masks are drawn 16 bits per element from 64-bit random words (four elements per word), which
is about six times faster on CPU than ``bernoulli_``; the keep probability is therefore rounded to a
multiple of 1/65536 (p = 0.05 keeps with probability 0.949997), and the survivors are scaled by the
inverse of that exact probability, so the branch stays unbiased.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch
from torch.autograd import forward_ad

from lorakit.variants import add_rounded_once

_RESOLUTION = 1 << 16

#: lorakit's training kernels (this module's fused LoRA node; ``lorakit.ops``' RMSNorm, q / k / v and
#: SwiGLU nodes) engage for inputs of at least this many elements (tokens × width). Below it
#: autograd's plain ops run: there the kernels' Python per call (their forward and backward are
#: Python functions) costs more than the work they save. Tiny Llamas' LoRA step ÷ PEFT's (1 thread,
#: 150 interleaved steps): hidden 32 × 32 tokens 1.144 with the kernels, 1.029 without; hidden
#: 64 × 256 tokens (16,384 elements) 1.050 / 1.033; hidden 128 × 512 tokens 0.911 / 1.030. Set it
#: to 0 to run the kernels at every size (the test suite does, to test them on tiny models).
KERNELS_MIN_NUMEL = 1 << 14


def kernels_pay(x: torch.Tensor) -> bool:
    """Whether a layer input ``x`` is big enough for the training kernels (``KERNELS_MIN_NUMEL``)."""
    return x.numel() >= KERNELS_MIN_NUMEL


#: Attribute a fused RMSNorm (``lorakit.ops.rmsnorm``) sets on its output: ``(h, weight, rstd,
#: SharedRecompute())``, from which ``recompute_norm`` rebuilds that output bit for bit, so LoRA nodes
#: need not keep it.
RMSNORM_RECIPE = "_lorakit_rmsnorm"


def recompute_norm(recipe: tuple, h_acc: torch.Tensor | None = None) -> torch.Tensor:
    """The fused RMSNorm's output from its ``RMSNORM_RECIPE``: the norm's forward computes it with
    this function too (passing ``h_acc``, h already in rstd's dtype), so the two are bit-identical."""
    h, weight, rstd = recipe[:3]
    return weight * ((h.to(rstd.dtype) if h_acc is None else h_acc) * rstd).to(h.dtype)


class SharedRecompute:
    """One recomputation of a norm's output for all the LoRA nodes that consume it (q, k and v; gate
    and up): each node ``expect``s it in forward; in backward the first to ask computes it, the last
    one drops it. A second backward through the same graph (``retain_graph``) finds the count spent
    and recomputes per node: the result is the same either way, only the work differs."""

    __slots__ = ("pending", "value")

    def __init__(self) -> None:
        self.pending, self.value = 0, None

    def expect(self) -> None:
        self.pending += 1

    def get(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        value = self.value if self.value is not None else compute()
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value


def first_order_only(node: str, plain: str) -> Callable[[Callable], Callable]:
    """Decorator for a kernel's ``backward`` (above ``once_differentiable``): a backward run with
    ``create_graph=True`` (a gradient penalty, a Hessian-vector product) raises, naming the kernel
    and how to run the plain ops instead. ``once_differentiable`` alone raises only where the
    incoming gradient itself requires grad: a node at the root of the graph (the loss) got a
    constant 1, answered constants, and the second-order terms through it were silently dropped
    (0.70 relative off on lora_B through ``linear_cross_entropy``)."""
    def wrap(backward: Callable) -> Callable:
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"higher-order gradients through lorakit's fused {node} are not supported "
                                   f"(backward with create_graph=True): {plain} before differentiating a gradient")
            return backward(ctx, *grads)
        checked.__doc__, checked.__name__ = backward.__doc__, backward.__name__
        return checked
    return wrap


def norm_recipe(x: torch.Tensor) -> tuple | None:
    """The ``RMSNORM_RECIPE`` of ``x`` when ``x`` is a fused RMSNorm's output (same tokens), else None:
    a node reading ``x`` may then keep the recipe's first three tensors instead of ``x`` and rebuild
    it with ``recompute_norm``. Not when ``x`` was changed in place since the norm made it (its
    version differs): the recipe rebuilds the norm's output, not what the node read, so the
    gradients would be silently those of the unedited input."""
    recipe = getattr(x, RMSNORM_RECIPE, None)
    if recipe is None or recipe[0].shape[:-1] != x.shape[:-1] or recipe[4] != x._version:
        return None
    return recipe


class _Workspace(threading.local):
    """Per-thread scratch buffers, reused by every layer instead of allocated per call (fewer
    allocator holes between the activations autograd keeps, hence a lower peak resident memory)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, tag: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tag, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            self.buffers.pop(key, None)
            buf = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]


_WORKSPACE = _Workspace()


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean keep-mask as 0 / 1 of ``dtype`` in a reused buffer (valid until the next call).

    Multiplying by a mask of another dtype makes the multiply convert it into a fresh temporary
    first (for a 1024 x 1536 mask: a 6 MB allocation and its page faults, ~2 ms in a training step);
    converting into a warm buffer once and multiplying like by like avoids that."""
    buf = _WORKSPACE.take("mask_as_float", mask.numel(), dtype, mask.device).view(mask.shape)
    # from the bytes as uint8: several times faster on CPU than converting bool (1024 x 576 to fp32:
    # 25 vs 170 µs), same values
    return buf.copy_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask)


def masked(x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x2 * mask`` (``float_mask`` of the keep-mask, x2's dtype) written into a reused buffer:
    valid until the next call."""
    out = _WORKSPACE.take("masked", x2.numel(), x2.dtype, x2.device).view(x2.shape)
    return torch.mul(x2, mask, out=out)


def pack_bits(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean tensor as bits: (uint8 tensor of numel // 8 bytes, the last numel % 8 booleans).

    Eight booleans (bytes of value 0 or 1) read as one little-endian 64-bit word are folded into its
    low byte with three shift-or steps, so packing is a few passes over numel / 8 words. Boolean i
    starts as bit 8·i of the word; the steps shift by 7, 14 and 28 (8·i − i for i = 1, 2, 4), each
    bringing the next run of booleans down beside those already packed: runs of 2, 4, then 8 bits.
    For booleans 1,0,1,1,0,0,0,1 (byte 0 first) the word's low byte ends up 0b10001101: boolean i
    is bit i. ``unpack_bits`` runs the three steps backwards with masks that keep only the bits each
    step placed (0x0000000F0000000F, 0x0003000300030003, 0x0101...01); tests/test_fused.py checks
    the round trip bit for bit."""
    flat = mask.reshape(-1)
    if flat.storage_offset() % 8:  # 64-bit words must start on an 8-byte boundary
        flat = flat.clone()
    whole = flat.numel() - flat.numel() % 8
    words = flat[:whole].view(torch.int64)                 # byte i of a word = boolean i of 8
    folded = words >> 7
    folded |= words                                         # bits 0-1 of each byte: booleans i, i+1
    shifted = folded >> 14
    folded |= shifted                                       # bits 0-3: booleans i .. i+3
    folded |= torch.bitwise_right_shift(folded, 28, out=shifted)   # bits 0-7 of byte 0: booleans 0 .. 7
    folded &= 0xFF
    return folded.to(torch.uint8), flat[whole:].clone()


def unpack_bits(packed: tuple[torch.Tensor, torch.Tensor], shape: torch.Size,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean tensor of ``shape`` that ``pack_bits`` packed, bit for bit (into ``out`` if given:
    a contiguous boolean tensor of that shape)."""
    bits, tail = packed
    words = bits.to(torch.int64)
    shifted = words << 28                                   # the inverse of the three folds, in place
    words |= shifted
    words &= 0x0000000F0000000F
    words |= torch.bitwise_left_shift(words, 14, out=shifted)
    words &= 0x0003000300030003
    words |= torch.bitwise_left_shift(words, 7, out=shifted)
    if out is not None and (out.shape != torch.Size(shape) or out.dtype != torch.bool or not out.is_contiguous()
                            or out.storage_offset() % 8):
        raise ValueError(f"unpack_bits: out must be a contiguous boolean tensor of shape {tuple(shape)} starting "
                         f"on an 8-byte boundary, got {out.dtype} {tuple(out.shape)}")
    mask = torch.empty(shape, dtype=torch.bool, device=bits.device) if out is None else out
    flat = mask.view(-1)
    whole = bits.numel() * 8
    torch.bitwise_and(words, 0x0101010101010101, out=flat[:whole].view(torch.int64))
    flat[whole:] = tail
    return mask


class KeepMask:
    """An inverted-dropout keep-mask, kept between forward and backward as bits.

    Drawing it advances the global generator as dropout would. ``get()`` returns the boolean mask;
    ``release()`` packs it into bits (one per element: 1/32 of a float32 copy of the input, 1/8 of
    a boolean mask) and drops the tensor; the next ``get()`` unpacks it bit for bit. Unpacking
    costs a fifth of drawing the mask again (measured on a 1024 x 576 mask: ~0.2 ms vs ~0.7 ms).

    Attributes:
        shape: Shape of the mask.
        keep: Exact keep probability (``1 - p`` rounded to a multiple of 1/65536).
        inv_keep: ``1 / keep`` (0 when nothing is kept, i.e. p = 1).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], p: float, device: torch.device, reuse: bool = False) -> None:
        """``reuse``: draw (and unpack) into a per-thread buffer shared by all masks; the caller must be
        done with the tensor ``get()`` returned before any other mask is drawn (the fused functions are)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.shape, self.device = torch.Size(shape), torch.device(device)
        # keep where a uniform 16-bit draw is below it; at least 1/65536 kept unless p is exactly 1
        # (rounding had made p > 1 - 2^-17 drop everything, a branch no longer unbiased)
        self.threshold = max(round((1.0 - p) * _RESOLUTION), 1) if p < 1.0 else 0
        self.keep = self.threshold / _RESOLUTION
        self.inv_keep = 1.0 / self.keep if self.threshold else 0.0
        self.reuse = reuse
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mask: torch.Tensor | None = self._draw()

    def _buffer(self, tag: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        if self.reuse:
            return _WORKSPACE.take(tag, n, dtype, self.device)
        return torch.empty(n, dtype=dtype, device=self.device)

    def _draw(self) -> torch.Tensor:
        if self.threshold >= _RESOLUTION:
            return torch.ones(self.shape, dtype=torch.bool, device=self.device)
        n = math.prod(self.shape)
        words = self._buffer("words", (n + 3) // 4, torch.int64)
        mask = self._buffer("mask", n, torch.bool).view(self.shape)
        words.random_(-(1 << 63), (1 << 63) - 1)
        lanes = words.view(torch.int16)[:n].view(self.shape)             # uniform in [-32768, 32767]
        # written as uint8 0 / 1 (the same bytes): ~4x faster on CPU than a comparison into bool
        torch.lt(lanes, self.threshold - _RESOLUTION // 2, out=mask.view(torch.uint8))
        return mask

    def get(self) -> torch.Tensor:
        """The boolean keep-mask (True = kept), unpacked from its bits if it was released."""
        if self._mask is None:
            out = self._buffer("mask", math.prod(self.shape), torch.bool).view(self.shape)
            self._mask = unpack_bits(self._packed, self.shape, out=out)
        return self._mask

    def release(self) -> None:
        """Keep the mask as bits only (packed on the first call) and free the tensor."""
        if self._mask is not None and self._packed is None:
            self._packed = pack_bits(self._mask)
        self._mask = None


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask for inverted dropout with drop probability ``p`` (see ``KeepMask``)."""
    return KeepMask(shape, p, device).get()


def branch_dtype(out_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """dtype the fused training node's matmuls run in: bf16 on a bf16 base, else the adapter's dtype.

    On a bf16 base with fp32 adapters the branch is computed as under bf16 autocast: A and B are
    rounded to bf16 for the products (oneDNN accumulates in fp32), the gradients of A and B are
    returned in fp32, and nothing of width ``in`` or ``out`` is ever converted to fp32. Its output
    lands in bf16 either way; on this repo's CPU the rank-r products run ~4x faster than in fp32
    and a bf16 training step ~15% faster. Inference (``add_lora_no_grad``) runs fp32 adapters'
    products in fp32 instead, rounded once into the output (its comment says why), and so does
    autograd's fallback in ``fused_lora_add`` (torch.func transforms, forward-mode AD).
    """
    return torch.bfloat16 if out_dtype == torch.bfloat16 else adapter_dtype


def add_branch(out2: torch.Tensor, x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               drop: KeepMask | None) -> torch.Tensor:
    """``out2 += scale · (drop(x2) Aᵀ) Bᵀ`` in place; returns ``h = drop(x2) Aᵀ`` (tokens, r).

    ``out2``: (tokens, out); ``x2``: (tokens, in) in the branch dtype (``branch_dtype``), which is
    also ``h``'s. Shared by every fused LoRA node.
    """
    # dtype conversions only where needed: each no-op ``.to`` still costs ~1 µs, which adds up over
    # 200 layers of a decode step
    cd = x2.dtype
    Ac = A if A.dtype == cd else A.to(cd)
    if drop is not None:
        h = masked(x2, float_mask(drop.get(), x2.dtype)) @ Ac.T
        h.mul_(drop.inv_keep)
        drop.release()
    else:
        h = x2 @ Ac.T
    add_product(out2, h, B, scale)
    return h


def add_product(out2: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """``out2 += scale · h Bᵀ`` in place, in out2's dtype: the branch's second product, given its
    first one ``h`` (tokens, r)."""
    od = out2.dtype
    if od == torch.float16 and h.dtype != od:
        # float16 tops out at 65504: a wider h can exceed it where the update it makes does not. The
        # update is scaled, rounded, then added (not add_'s alpha, whose fused multiply-add rounds
        # once): PEFT's order, so the float16 output is bitwise PEFT's
        out2.add_((h @ B.T.to(h.dtype)).mul_(scale))
        return
    out2.addmm_(h if h.dtype == od else h.to(od), B.T if B.dtype == od else B.T.to(od), alpha=scale)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself where it is already (no call to a no-op ``.to``)."""
    return t if t.dtype == dtype else t.to(dtype)


def b_grad_product(g2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``g2ᵀ h`` (out, r), dL/dB's product for dL/d(out) = ``g2`` (tokens, out) and ``h`` (tokens, r),
    formed as ``(hᵀ g2)ᵀ`` and made contiguous (B's own layout): the same dot products, which MKL
    runs as an (r, tokens) × (tokens, out) product 1.7x faster in float32 (1024 tokens, 576 and
    1536 outputs: 74 against 130 µs and 337 against 583, 2 threads; bfloat16 0.94-0.98x; a column
    slice of a wider h alike). With several threads MKL may split the sums otherwise, so the last
    bits can differ from ``g2.T @ h``'s."""
    return (h.T @ g2).T.contiguous()


def branch_grads(g2: torch.Tensor, x2_of: Callable[[], torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                 h: torch.Tensor, scale: float, drop: KeepMask | None, need_x: bool, need_A: bool,
                 need_B: bool, grad_x_into: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``add_branch`` for dL/d(out2) = ``g2``: (dL/dx2 (tokens, in), dL/dA, dL/dB).

    ``x2_of()`` gives ``x2`` again (called only when dL/dA is needed, so callers may recompute it);
    the dropout mask is unpacked once and released at the end. Products run in ``h``'s dtype (the
    branch dtype); dL/dA and dL/dB come back in A's and B's dtypes, dL/dx2 in the branch dtype.
    ``grad_x_into``: a (tokens, in) tensor of the branch dtype that dL/dx2 is added to in place
    (one ``addmm_``, or with dropout an ``addcmul_`` of the product and the mask, instead of a fresh
    tensor and a sum); it is then the returned dL/dx2.
    """
    cd = h.dtype
    g2, Bc = _as(g2, cd), _as(B, cd)                               # (a no-op .to costs ~1 µs a call)
    grad_x = grad_A = grad_B = None
    if need_B:
        grad_B = _as(b_grad_product(g2, h), B.dtype).mul_(scale)   # (out, r)
    if not (need_x or need_A):
        return grad_x, grad_A, grad_B
    gh = (g2 @ Bc).mul_(scale * (drop.inv_keep if drop is not None else 1.0))   # (tokens, r)
    mask = float_mask(drop.get(), cd) if drop is not None else None
    if need_A:
        xa = x2_of()
        grad_A = _as(gh.T @ (masked(xa, mask) if mask is not None else xa), A.dtype)   # (r, in)
    if need_x:
        Ac = _as(A, cd)
        if grad_x_into is not None and grad_x_into.dtype == cd:
            if mask is None:
                grad_x = grad_x_into.addmm_(gh, Ac)
            else:  # the product in a reused buffer, masked while it is added
                product = _WORKSPACE.take("grad_x", grad_x_into.numel(), cd, gh.device).view(grad_x_into.shape)
                grad_x = grad_x_into.addcmul_(torch.mm(gh, Ac, out=product), mask)
        else:
            grad_x = gh @ Ac                                       # (tokens, in), a fresh tensor
            if mask is not None:
                grad_x.mul_(mask)
    if drop is not None:
        drop.release()
    return grad_x, grad_A, grad_B


def fused_branch(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                 drop: KeepMask | None) -> torch.Tensor:
    """The fused node's forward ops: ``result += scale · (drop(x) Aᵀ) Bᵀ`` in place, in the branch
    dtype (``branch_dtype``); returns ``h = drop(x) Aᵀ`` (tokens, r)."""
    if autocast_on(x):  # off for the branch: it runs in the branch dtype, so backward sees the dtypes it saved
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fused_branch(result, x, A, B, scale, drop)
    x2 = x.reshape(-1, x.shape[-1])
    cd = branch_dtype(result.dtype, A.dtype)
    return add_branch(result.view(-1, result.shape[-1]), x2 if x2.dtype == cd else x2.to(cd), A, B, scale, drop)


class FusedLoraLinear(torch.autograd.Function):
    """``result += scale · (drop(x) Aᵀ) Bᵀ`` in place; gradients for x, A, B and result.

    ``drop`` is a ``KeepMask`` over ``x`` viewed as (tokens, in), or None for no dropout.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, drop: KeepMask | None) -> torch.Tensor:
        h = fused_branch(result, x, A, B, scale, drop)
        ctx.mark_dirty(result)
        # x is the output of a fused RMSNorm (lorakit/ops/rmsnorm.py)? Then keep its recipe (the
        # norm's input, which the norm keeps anyway, and one rstd per token) and rebuild x in backward.
        recipe = norm_recipe(x)
        ctx.from_norm = recipe is not None
        ctx.shared = None
        if ctx.from_norm and A.requires_grad:  # dL/dA will need x: one rebuild shared by the norm's consumers
            ctx.shared = recipe[3]
            ctx.shared.expect()
        ctx.save_for_backward(*(recipe[:3] if ctx.from_norm else (x,)), A, B, h)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.scale, ctx.drop = scale, drop
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): higher-order gradients
            return FusedLoraLinear._graph_backward(ctx, grad, saved)
        A, B, h = saved[-3:]
        x_shape, x_dtype = ctx.x_meta

        def x2_of() -> torch.Tensor:
            if ctx.shared is not None:
                x = ctx.shared.get(lambda: recompute_norm(saved[:3]))
            else:
                x = recompute_norm(saved[:3]) if ctx.from_norm else saved[0]
            return _as(x.reshape(-1, x_shape[-1]), h.dtype)

        need = ctx.needs_input_grad
        gx, grad_A, grad_B = branch_grads(grad.reshape(-1, grad.shape[-1]), x2_of,
                                          A, B, h, ctx.scale, ctx.drop, need[1], need[2], need[3])
        grad_x = _as(gx.reshape(x_shape), x_dtype) if gx is not None else None
        return grad, grad_x, grad_A, grad_B, None, None

    @staticmethod
    def _graph_backward(ctx, grad: torch.Tensor, saved: tuple[torch.Tensor, ...]):
        """The same gradients from out-of-place ops on x, A, B and ``grad`` themselves, so that
        autograd can differentiate them again (gradient penalties, Hessian-vector products, MAML).
        The first-order path above treats the saved ``h = drop(x) Aᵀ`` as a constant and would
        silently drop the second-order terms through it."""
        if ctx.from_norm:
            raise RuntimeError("higher-order gradients through lorakit's training kernels are not supported: "
                               "undo them with lorakit.ops.unfuse_rmsnorms(model) (and unfuse_swiglu_mlps, "
                               "unfuse_qkv_projections) before differentiating a gradient")
        x, A, B, h = saved
        x_shape, x_dtype = ctx.x_meta
        cd, scale, drop = h.dtype, ctx.scale, ctx.drop
        g2 = grad.reshape(-1, grad.shape[-1]).to(cd)
        x2 = x.reshape(-1, x_shape[-1]).to(cd)
        keep = float_mask(drop.get(), cd) * drop.inv_keep if drop is not None else None
        if drop is not None:
            drop.release()
            x2 = x2 * keep
        Ac, Bc = A.to(cd), B.to(cd)
        need = ctx.needs_input_grad
        gh = (g2 @ Bc) * scale                                     # dL/dh, (tokens, r)
        grad_x = grad_A = grad_B = None
        if need[1]:
            grad_x = gh @ Ac
            grad_x = (grad_x * keep if keep is not None else grad_x).reshape(x_shape).to(x_dtype)
        if need[2]:
            grad_A = (gh.T @ x2).to(A.dtype)
        if need[3]:
            grad_B = (g2.T @ (x2 @ Ac.T) * scale).to(B.dtype)
        return grad, grad_x, grad_A, grad_B, None, None


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (then it, not the tensors, picks the dtypes)."""
    return torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)


def whole_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``t`` is a view of, when ``t`` is a plain reshape of all of it (same memory order,
    same last dimension: ``F.linear`` of a 3-D input with a bias, GPT-2's ``Conv1D``), made right
    after it (with gradients, ``t``'s node is a view of the base's own node: no node between them,
    such as the one a full backward hook on the base layer puts there), else None. None also under
    torch.compile and torch.func transforms / forward-mode AD, whose tensors are not plain memory."""
    base = t._base
    if (base is None or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0):
        return None
    fn = t.grad_fn
    if fn is not None and (type(fn).__name__ not in ("ViewBackward0", "UnsafeViewBackward0")
                           or fn.next_functions[0][0] is not base.grad_fn or base.grad_fn is None):
        return None
    if (base.numel() != t.numel() or base.dtype != t.dtype or not base.is_contiguous() or not t.is_contiguous()
            or base.data_ptr() != t.data_ptr() or base.dim() == 0 or base.shape[-1] != t.shape[-1]):
        return None
    return base


def own_memory(result: torch.Tensor) -> bool:
    """Whether ``result`` (a layer's own output) is all of its memory: not a view, contiguous."""
    return result._base is None and result.is_contiguous()


def writes_in_place(result: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether inference may add the branch into ``result`` itself (``add_lora_no_grad``): it is all
    of its own memory, and no autocast is choosing the dtypes."""
    return own_memory(result) and not autocast_on(x)


def add_lora_no_grad(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    """``out += scale · (x Aᵀ) Bᵀ`` in place, for inference (no autograd node, no dropout): the
    branch of every LoRA Linear forward that needs no gradient, and of each row group of a mixed
    batch (so a group's rows get exactly what running them alone gives).

    ``out``: (..., out_features), contiguous or a row block of a contiguous tensor; ``x``: (..., in)."""
    out2, x2 = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
    if x2.dtype == A.dtype == out2.dtype == B.dtype:  # all one dtype: add_branch's ops, called directly
        out2.addmm_(x2 @ A.T, B.T, alpha=scale)
        return
    if branch_dtype(out2.dtype, A.dtype) != A.dtype:
        # fp32 adapters on a bf16 base: both products in the adapter's fp32, the delta rounded once
        # into the bf16 output, as PEFT computes it. (Training runs them in bf16, ``add_branch``;
        # doing so here made a row's result depend on how many tokens shared the call: at most 32
        # took this path, more the bf16 one, so eval losses moved with --batch-size. At 4 x 128
        # tokens on the embedded bf16 model this costs 1.27x the bf16 products' forward; decode
        # steps are faster this way: oneDNN's bf16 matmuls cost ~60 µs at these sizes, fp32 15-25.)
        out2.add_(((x2.to(A.dtype) @ A.T) @ B.T).mul_(scale))  # scaled, rounded, added: as PEFT (add_product)
        return
    add_branch(out2, x2 if x2.dtype == A.dtype else x2.to(A.dtype), A, B, scale, None)


def fused_lora_add(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: float, p: float, training: bool) -> torch.Tensor:
    """``result + scale · B(A(dropout_p(x)))`` computed by ``FusedLoraLinear`` (result is reused).

    ``result`` is the layer's own output (``LoraLayer.own_output``). Where it is a reshaped view of
    all of a tensor (``F.linear`` of a 3-D input with a bias, GPT-2's ``Conv1D``: their 2-D
    ``addmm`` result), the branch is added into that tensor and the view made again. Falls back to
    autograd's out-of-place ops where writing into ``result`` would not be safe (a view of part of
    a tensor, or a leaf autograd may need unchanged), and for inputs too small for the node to pay
    (``kernels_pay``) where those ops are the same arithmetic (not on a bf16 base, whose node runs
    the products in bf16, nor under autocast); both paths draw the same kind of mask.
    """
    whole = whole_base(result)
    if whole is not None:
        return fused_lora_add(whole, x, A, B, scale, p, training).view(result.shape)
    use_dropout = training and p > 0
    if ((not torch.is_grad_enabled() or not (x.requires_grad or A.requires_grad or B.requires_grad or result.requires_grad))
            and not use_dropout and own_memory(result)):
        # Nothing to differentiate (inference): the same two matmuls without an autograd node, whose
        # Python-side cost (~50 µs) is as large as the matmuls themselves for a decode step. Under
        # autocast, the fused node's own ops (as with gradients on: autocast picks bf16 products).
        if autocast_on(x):
            fused_branch(result, x, A, B, scale, None)
        else:
            add_lora_no_grad(result, x, A, B, scale)
        return result
    # plain autograd ops also under torch.func transforms (grad, vmap) and forward-mode AD, which
    # a custom autograd.Function with an in-place forward does not support
    fallback = (result._base is not None or result.is_leaf and result.requires_grad
                or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
                or not kernels_pay(x) and result.dtype != torch.bfloat16 and not autocast_on(x))
    drop = KeepMask((x.numel() // x.shape[-1], x.shape[-1]), p, x.device, reuse=not fallback) if use_dropout else None
    if fallback:  # autograd keeps the mask here: it must be a tensor of its own
        x2 = x.reshape(-1, x.shape[-1]).to(A.dtype)
        if drop is not None:
            x2 = x2 * drop.get().view(torch.uint8) * drop.inv_keep
        delta = ((x2 @ A.T) @ B.T * scale).reshape(*result.shape[:-1], B.shape[0])  # (also with 0 rows)
        return add_rounded_once(result, delta)
    return FusedLoraLinear.apply(result, x, A, B, scale, drop)
