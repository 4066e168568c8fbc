"""Linear layers that read the same input — q, k and v; gate and up — as one autograd node.

In a decoder layer three LoRA-adapted projections read the attention's normalised input, and two
the MLP's. Run one by one, each makes its own thin product x Aᵀ (a pass over x), and in backward
each hands autograd its own dL/dx twice (the frozen base's g W and the branch's (g B) A, fresh
tensors of tokens × hidden that autograd then sums). ``SharedInputLinears`` computes

- the branches' first products at once, x [A₁; A₂; A₃]ᵀ (one pass over x),
- in backward dL/dx as one chain of ``addmm_`` into one buffer: Σ gᵢ Wᵢ + [g₁B₁, g₂B₂, g₃B₃] [A₁; A₂; A₃],
- dL/dA of all the branches in one product, [g₁B₁, …]ᵀ x,

and saves what the separate nodes save (x, or the recipe of the RMSNorm that made it, and the
rank-r products). On the embedded model, fp32, 4 × 256 tokens, one layer's q/k/v forward + backward
took 16.0 ms instead of 18.8, gate/up with the SwiGLU tail 74.5 instead of 77.5 (median of 8 rounds).

With LoRA dropout each member keeps its own mask (as the separate layers do: q, k and v see
independent masks), so a member with dropout makes its own first product and dL/dA from x ⊙ mask;
the frozen bases' dL/dx still go into the one buffer.

The grouped path is taken only where it is equivalent: gradients enabled, no autocast, every
member a frozen ``nn.Linear`` or a LoRA Linear with one active, unmerged, plain adapter and no
mixed-adapter batch. ``fuse_qkv_projections(model)`` routes the attention modules
whose forward projects ``hidden_states`` with ``self.q_proj``, ``self.k_proj`` and ``self.v_proj``
(Llama, SmolLM2, Qwen2, Mistral, ...) through it; the SwiGLU tail (``lorakit.ops.swiglu``) groups
gate and up itself. Gradients equal the separate layers' (tests compare them in float64).

Where the attention's forward is transformers 5's Llama text, or Qwen2's, Mistral's or Qwen3's
(``ATTENTION_BODIES``; SmolLM2, Gemma, Granite, Mixtral, Qwen3-MoE and some forty others) and its
RoPE function gives Llama's numbers, the grouped
outputs go on through lorakit's own copy of that forward, which applies RoPE to q and k as
``lorakit.ops.rotary`` nodes (where they stand for it: cos / sin of q's dtype and positions)
instead of transformers' five-op formula; otherwise (another text, a deprecated
``past_key_values`` argument) the module's own forward runs. Either way the grouped outputs are
served to the projections, called as modules (their hooks run). On the embedded model (4 × 256
tokens, r = 16 all-linear) the LoRA forward + backward took 0.953 of its time in fp32 (median of
10 interleaved rounds, 0.84-1.01) and 0.959 in bf16 (0.94-1.01).
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable
from torch import nn

from lorakit.layers.fused import (KeepMask, _as, add_branch, add_product, b_grad_product, branch_dtype,
                                  branch_grads, first_order_only, norm_recipe, recompute_norm)
from lorakit.layers.linear import LoraLinear
from lorakit.layers import fused, gemm
from lorakit.ops.patching import forward_body, patch_forwards, unpatch_forwards
from lorakit.ops.rotary import apply_rotary, rotary_applies


def linear_plan(module: nn.Module):
    """(weight, bias, A, B, scale, dropout p) for computing ``module(x)`` by hand, or None when that
    would not be equivalent. ``module``: a frozen ``nn.Linear`` (A = B = None) or a LoRA Linear over
    one, with at most one live adapter that is plain LoRA (no variant) and no mixed-adapter batch."""
    if type(module) is nn.Linear:
        base, adapter = module, None
    elif isinstance(module, LoraLinear) and type(module.base_layer) is nn.Linear:
        base = module.base_layer
        if module.disabled:
            adapter = None
        else:
            if module.batch_context is not None and module.batch_context.plan is not None:
                return None
            names = module.live_adapters()
            if len(names) > 1 or any(n in module.variants for n in names):
                return None
            adapter = names[0] if names else None
    else:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if adapter is None:
        return base.weight, base.bias, None, None, 1.0, 0.0
    return (base.weight, base.bias, module.lora_A[adapter], module.lora_B[adapter], module.scaling[adapter],
            module.dropout_p(adapter))


class SharedInputLinears(torch.autograd.Function):
    """``[F.linear(x, Wᵢ, bᵢ) + sᵢ · (drop_pᵢ(x) Aᵢᵀ) Bᵢᵀ for each member]`` in one node.

    Arguments after ``x``: ``scales`` (a tuple, None for a member without adapter), ``ps`` (each
    adapted member's LoRA dropout probability, or None for no dropout anywhere), then per member
    ``W, b, A, B`` (b, A, B may be None). Each member with dropout draws its own mask (``KeepMask``,
    in member order, as the separate layers would); its first product is its own, x ⊙ mask,
    while the members without dropout share one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple, ps: tuple | None, *flat: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        members = [flat[i:i + 4] for i in range(0, len(flat), 4)]
        adapted = [i for i, (_, _, A, _) in enumerate(members) if A is not None]
        drops: list[KeepMask | None] = [None] * len(members)
        hs: list[torch.Tensor | None] = [None] * len(members)
        with torch.autocast(device_type=x.device.type, enabled=False):
            outs = [gemm.linear(x, W, b) for W, b, _, _ in members]
            if adapted:
                cd = branch_dtype(outs[adapted[0]].dtype, members[adapted[0]][2].dtype)
                x2 = x.reshape(-1, x.shape[-1])
                x2 = x2 if x2.dtype == cd else x2.to(cd)
                tokens = x2.shape[0]
                plain = [i for i in adapted if not (ps and ps[i])]
                if plain:
                    h = x2 @ torch.cat([_as(members[i][2], cd) for i in plain]).T   # (tokens, Σ r)
                    start = 0
                    for i in plain:
                        r = members[i][2].shape[0]
                        hs[i] = h[:, start:start + r]
                        start += r
                for i in adapted:
                    _, _, A, B = members[i]
                    if i not in plain:  # its own mask, drawn in member order; kept as bits for backward
                        drops[i] = KeepMask((tokens, x2.shape[1]), ps[i], x.device, reuse=True)
                        hs[i] = add_branch(outs[i].view(-1, outs[i].shape[-1]), x2, A, B, scales[i], drops[i])
                    else:
                        add_product(outs[i].view(-1, outs[i].shape[-1]), hs[i], B, scales[i])
        recipe = norm_recipe(x)
        ctx.from_norm = recipe is not None
        kept = recipe[:3] if ctx.from_norm else (x,)
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*kept, *(hs[i] for i in adapted), *flat)
        ctx.scales, ctx.adapted, ctx.drops, ctx.x_meta = scales, adapted, drops, (x.shape, x.dtype)
        ctx.set_materialize_grads(False)  # an output the loss does not use passes None, not zeros
        return tuple(outs)

    @staticmethod
    @first_order_only('q/k/v (gate/up) projections', 'undo them with lorakit.ops.unfuse_qkv_projections(model)')
    @once_differentiable  # higher-order gradients: a clear error, not silently wrong ones
    def backward(ctx, *grads: torch.Tensor | None):
        saved = ctx.saved_tensors
        n, adapted, drops = ctx.n_kept, ctx.adapted, ctx.drops
        kept, flat = saved[:n], saved[n + len(adapted):]
        hs = dict(zip(adapted, saved[n:n + len(adapted)]))
        members = [flat[i:i + 4] for i in range(0, len(flat), 4)]
        x_shape, x_dtype = ctx.x_meta
        need = ctx.needs_input_grad
        need_x = need[0]
        gx = None
        if need_x:
            for g, (W, _, _, _) in zip(grads, members):
                if g is None:
                    continue
                g2 = _as(g.reshape(-1, g.shape[-1]), W.dtype)
                gx = gemm.times_weight(g2, W) if gx is None else gemm.add_times_weight(gx, g2, W)  # (tokens, in)
        results: list[torch.Tensor | None] = [None] * (3 + len(flat))
        if adapted:
            cd = hs[adapted[0]].dtype
            tokens = hs[adapted[0]].shape[0]
            x2 = None

            def x2_of() -> torch.Tensor:
                nonlocal x2
                if x2 is None:
                    x = recompute_norm(kept) if ctx.from_norm else kept[0]
                    x2 = x.reshape(-1, x_shape[-1])
                    x2 = x2 if x2.dtype == cd else x2.to(cd)
                return x2

            plain, ghs = [], []
            for i in adapted:
                _, _, A, B = members[i]
                r, s = B.shape[1], ctx.scales[i]
                g = grads[i]
                if drops[i] is not None:  # its own products, with its mask (as the separate layer's)
                    if g is None:
                        continue
                    into = gx if gx is not None and gx.dtype == cd else None
                    gxi, gAi, gBi = branch_grads(g.reshape(-1, g.shape[-1]), x2_of, A, B, hs[i], s, drops[i],
                                                 need_x, need[3 + 4 * i + 2], need[3 + 4 * i + 3], grad_x_into=into)
                    results[3 + 4 * i + 2], results[3 + 4 * i + 3] = gAi, gBi
                    if gxi is not None and gxi is not into:
                        gx = gxi.to(flat[4 * i].dtype) if gx is None else gx.add_(gxi.to(gx.dtype))
                    continue
                plain.append(i)
                if g is None:
                    ghs.append(torch.zeros(tokens, r, dtype=cd, device=hs[i].device))
                else:
                    g2 = _as(g.reshape(-1, g.shape[-1]), cd)
                    if need[3 + 4 * i + 3]:
                        results[3 + 4 * i + 3] = _as(b_grad_product(g2, hs[i]), B.dtype).mul_(s)  # (out, r)
                    ghs.append((g2 @ _as(B, cd)).mul_(s))                    # (tokens, r)
            if plain:
                gh = torch.cat(ghs, dim=1) if len(ghs) > 1 else ghs[0]      # (tokens, Σ r)
                need_A = [need[3 + 4 * i + 2] for i in plain]
                if any(need_A):
                    gA = gh.T @ x2_of()                                      # (Σ r, in)
                    start = 0
                    for i, want in zip(plain, need_A):
                        A = members[i][2]
                        r = A.shape[0]
                        if want:
                            results[3 + 4 * i + 2] = _as(gA[start:start + r], A.dtype)
                        start += r
                if need_x:
                    A_cat = torch.cat([_as(members[i][2], cd) for i in plain])
                    if gx is None:
                        gx = gh @ A_cat
                    elif gx.dtype == cd:
                        gx.addmm_(gh, A_cat)
                    else:
                        gx.add_((gh @ A_cat).to(gx.dtype))
        if gx is not None:
            results[0] = _as(gx.reshape(x_shape), x_dtype)  # None when no output was used
        return tuple(results)


def shared_input_linears(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor] | None:
    """``[m(x) for m in modules]`` as one ``SharedInputLinears`` node, or None where that would not be
    equivalent (see the module docstring) or would gain nothing (nothing needs a gradient, or an input
    too small for the node to pay: ``lorakit.layers.fused.kernels_pay``)."""
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or not fused.kernels_pay(x):
        return None
    plans = [linear_plan(m) for m in modules]
    if any(p is None for p in plans):
        return None
    adapted = [p for p in plans if p[2] is not None]
    if not adapted:
        return None
    if len({(p[2].dtype, p[2].device) for p in adapted}) > 1 or any(p[0].dtype != plans[0][0].dtype for p in plans):
        return None
    if not (x.requires_grad or any(p[2].requires_grad or p[3].requires_grad for p in adapted)):
        return None
    flat: list[Any] = []
    for W, b, A, B, _, _ in plans:
        flat += [W, b, A, B]
    scales = tuple(p[4] if p[2] is not None else None for p in plans)
    ps = tuple(p[5] if p[2] is not None else 0.0 for p in plans)
    return list(SharedInputLinears.apply(x, scales, ps if any(ps) else None, *flat))


_QKV_LINES = ("self.q_proj(hidden_states)", "self.k_proj(hidden_states)", "self.v_proj(hidden_states)")


class _Served:
    """A projection's forward for the duration of one attention forward: the precomputed output
    for the input it was computed from, else the projection's own forward."""

    __slots__ = ("module", "x", "version", "out")

    def __init__(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        self.module, self.x, self.version, self.out = module, x, x._version, out

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x is self.x and x._version == self.version and not args and not kwargs and self.out is not None:
            out, self.out = self.out, None  # served once
            return out
        return type(self.module).forward(self.module, x, *args, **kwargs)


class _Variant(NamedTuple):
    """What a known attention forward adds to Llama's (``_llama_attention``)."""
    name: str
    qk_norm: bool                                 # q and k normed per head before the transpose (Qwen3)
    extra: Callable[[nn.Module], dict[str, Any]]  # keyword arguments it adds to the attention call


# (functions, not lambdas: the wrapper that holds a variant is pickled with the model)
def _no_extra(m: nn.Module) -> dict[str, Any]:
    return {}


def _own_window(m: nn.Module) -> dict[str, Any]:
    return {"sliding_window": m.sliding_window}


def _config_window(m: nn.Module) -> dict[str, Any]:
    return {"sliding_window": getattr(m.config, "sliding_window", None)}


#: sha256 of ``forward_body`` of the transformers 5 attention forwards that ``_llama_attention``
#: computes with lorakit's nodes, step for step: Llama's (project q, k, v; RoPE with the module's
#: ``apply_rotary_pos_emb``; an optional cache update; the configured attention function;
#: ``o_proj``), and three that differ from it: Qwen2's and Mistral's pass a ``sliding_window`` to
#: the attention function, Qwen3's does that and norms q and k per head first. About forty
#: other transformers attention classes have one of these texts (Gemma, Granite, Ministral, Mixtral,
#: Qwen3-MoE, ...); their module's RoPE function must also be the Llama formula (``_rope_is_llama``,
#: checked on numbers: GLM's, with Llama's text, is not).
ATTENTION_BODIES: dict[str, _Variant] = {
    "188c5c14bdfa4bc940c06d5d7fc43185f830345744af471073b1c684e0c1791d": _Variant("llama", False, _no_extra),
    "9c0d7936d42c57f331177048d795eac0c5ad4100d23055f560693ba82b21d9be": _Variant("qwen2", False, _own_window),
    "723ed076636398a041c183f1f08a24878d5aa84529b70f2480ee4cc4ca49c158": _Variant("mistral", False, _config_window),
    "6de7f1c9e04d6f3d7aeee9a699d7751aefffad06b2689b9866fe43c09d89c1c0": _Variant("qwen3", True, _own_window),
}
#: Per attention class: the known forward ``_llama_attention`` computes for it, or None (``_variant_of``).
_VARIANTS: dict[type, _Variant | None] = {}


def _module_globals(module: nn.Module) -> dict:
    return inspect.unwrap(type(module).forward).__globals__


def _rope_is_llama(module: nn.Module) -> bool:
    """Whether the ``apply_rotary_pos_emb`` that ``module``'s forward calls gives ``RotaryFn``'s
    values on random float64 inputs (Llama's formula: not an interleaved or partial rotation)."""
    rope = _module_globals(module).get("apply_rotary_pos_emb")
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, n, 3, 8, generator=gen, dtype=torch.float64) for n in (4, 2))
    cos, sin = (torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    try:
        with torch.no_grad():
            want = rope(q, k, cos, sin)
        got = apply_rotary(q, k, cos, sin)
        return all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))
    except Exception:  # not callable so, other shapes, ...: the module's own forward then
        return False


def _variant_of(module: nn.Module) -> _Variant | None:
    """The known forward ``_llama_attention`` computes for ``module`` (its text in ``ATTENTION_BODIES``
    and its RoPE function Llama's: ``_rope_is_llama``), or None; worked out once per class (reading
    and hashing the source was half of fusing the embedded model's 30 layers: 28 of ~50 ms)."""
    cls = type(module)
    if cls not in _VARIANTS:
        body = forward_body(module)
        variant = None if body is None else ATTENTION_BODIES.get(hashlib.sha256("\n".join(body).encode()).hexdigest())
        _VARIANTS[cls] = variant if variant is not None and _rope_is_llama(module) else None
    return _VARIANTS[cls]


def _llama_attention(m: nn.Module, variant: _Variant, hidden_states: torch.Tensor, position_embeddings=None,
                     attention_mask=None, cache=None, **kwargs: Any) -> Any:
    """The attention forward of ``variant`` (``ATTENTION_BODIES``: Llama's, or one that adds to it a
    window argument and q / k norms), step for step, with RoPE as ``RotaryFn`` nodes where they stand for the module's
    RoPE function (``rotary_applies``; else that function). The projections are called as modules:
    the grouped outputs are served to them, with their hooks."""
    names = _module_globals(m)
    hidden_shape = (*hidden_states.shape[:-1], -1, m.head_dim)
    q, k = m.q_proj(hidden_states).view(hidden_shape), m.k_proj(hidden_states).view(hidden_shape)
    if variant.qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = m.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    rope = apply_rotary if rotary_applies(q, k, cos, sin) else names["apply_rotary_pos_emb"]
    q, k = rope(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, m.layer_idx, kwargs=kwargs)
    attention = names["ALL_ATTENTION_FUNCTIONS"].get_interface(m.config._attn_implementation,
                                                                 names["eager_attention_forward"])
    out, weights = attention(m, q, k, v, attention_mask, dropout=0.0 if not m.training else m.attention_dropout,
                             scaling=m.scaling, **variant.extra(m), **kwargs)
    return m.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class _FusedQKVForward:
    """Instance ``forward`` of an attention module whose q, k, v projections are grouped."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        #: the known forward ``_llama_attention`` computes for the module (RoPE as ``RotaryFn`` nodes), or None
        self.variant = _variant_of(module)

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        projections = (m.q_proj, m.k_proj, m.v_proj)
        outs = None
        if not any("forward" in p.__dict__ for p in projections):  # not if someone else patched them
            outs = shared_input_linears(hidden_states, list(projections))
        if outs is None:
            return type(m).forward(m, hidden_states, *args, **kwargs)
        for p, out in zip(projections, outs):
            p.forward = _Served(p, hidden_states, out)
        try:
            if self.variant is not None and "past_key_values" not in kwargs:  # (that deprecated name: the module's own)
                return _llama_attention(m, self.variant, hidden_states, *args, **kwargs)
            return type(m).forward(m, hidden_states, *args, **kwargs)
        finally:
            for p in projections:
                p.__dict__.pop("forward", None)


def _is_qkv_attention(module: nn.Module) -> bool:
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
        return False
    body = forward_body(module)
    if body is None:
        return False
    text = "\n".join(body)
    return all(line in text for line in _QKV_LINES)


def fuse_qkv_projections(model: nn.Module) -> int:
    """Group the q, k and v projections of every attention module of ``model`` that computes them
    from ``hidden_states`` (one ``SharedInputLinears`` node when equivalent, the module's own forward
    otherwise; on a transformers Llama attention also RoPE as ``lorakit.ops.rotary`` nodes: module
    docstring); returns how many modules were switched. ``unfuse_qkv_projections`` undoes it."""
    return patch_forwards(model, _FusedQKVForward, _is_qkv_attention)


def unfuse_qkv_projections(model: nn.Module) -> int:
    """Give every grouped attention module of ``model`` its own forward back; returns how many."""
    return unpatch_forwards(model, _FusedQKVForward)
