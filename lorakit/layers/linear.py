"""LoRA for ``nn.Linear``: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, A: (r, in), B: (out, r)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from lorakit.layers import gemm, register_layer_type
from lorakit.layers.base import LoraLayer, dropping, runs_own_forward
from lorakit.layers.fused import add_lora_no_grad, autocast_on, fused_lora_add, writes_in_place

#: Mixed-adapter batches with at most this many tokens (decode steps, short prompts) take the
#: batched path: one gather, two ``bmm`` and one ``index_add_`` per layer for all adapters, instead
#: of four small ops per adapter. Above it the per-group path is faster (benchmarks/multi_adapter.py).
BATCHED_MIXED_MAX_TOKENS = 128


#: Types of a weight the lean inference path multiplies itself (anything else goes through the module).
PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` itself (not a subclass, no ``forward`` replaced on the
    instance) and no hook of its own or global would run on its call: calling ``F.linear``'s ops on
    its tensors is then exactly what calling it does."""
    d = module.__dict__
    return (runs_own_forward(module, nn.Linear)
            and not (d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                     or _module._global_forward_pre_hooks or _module._global_backward_hooks
                     or _module._global_backward_pre_hooks))


@register_layer_type(nn.Linear)
class LoraLinear(LoraLayer):
    """LoRA on a Linear layer; the base weight is (out, in), so ΔW = B @ A as is."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.out_features, r)

    def branch(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # Two thin matmuls, (.., in) -> (.., r) -> (.., out): O(r·(in+out)) per token, no (out, in) matrix.
        return F.linear(F.linear(x.to(A.dtype), A), B)

    def delta_from(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return B @ A

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``LoraLayer.forward``, with a lean path for inference (no autograd, eval mode).

        There the generic path's Python work (module attribute lookups, the checks that choose the
        fused node's branch) costs as much as the two rank-r products themselves at decode sizes
        (~15 µs per layer at 16 tokens); this path reads the layer's state from its ``__dict__``
        and runs the very ops the generic path runs in that case (``add_lora_no_grad``), so the
        outputs are bitwise the same. On a plain ``nn.Linear`` (no hooks, no subclass:
        ``plain_linear``; a plain tensor as its weight) with a contiguous input of the weight's
        dtype it also skips the base layer's module call: ``mm`` (``addmm`` with a bias) on the
        flattened input is the very kernel ``F.linear`` runs there; with one active adapter of that
        dtype the layer is then five ops in all (about 1% of a 16 × 1 decode step of the embedded
        model, benchmarks/inference.py), and no_grad gives inference mode's very bits (the output
        is the layer's own tensor in both, so the adapters are added in place). A mixed batch whose
        rows and shapes this layer has run before with unchanged adapters repeats the layout it built
        then (``BatchedStacks``). Merged adapters are left out here as there: a layer whose active
        adapters are all merged returns its base layer's output at once (a merged model then costs
        what ``merge_and_unload``'s does, within 1%: 16 × 1 decode of the embedded model went from
        1.016 / 1.021 × base to 1.005 / 1.009 at 1 / 2 threads). Anything else (gradients, training
        mode, a LoRA dropout module left in training mode, a mixed batch on a layer with merged
        adapters, variants, a disabled layer, torch.compile) takes the generic path.
        """
        if x.is_nested:
            return self.nested_forward(x, *args, **kwargs)
        d = self.__dict__
        merged = d["merged_adapters"]
        if (args or kwargs or torch.is_grad_enabled() or d["training"] or d["disabled"]
                or (merged and d.get("batch_context") is not None and d["batch_context"].plan is not None)
                or d["variants"] or torch.compiler.is_compiling()):
            # (under torch.compile the base layer is called, so that dynamo guards its hooks: read from
            # its __dict__ here, a hook added after compiling was never run, with dynamo's hook guards on)
            return super().forward(x, *args, **kwargs)
        mods = d["_modules"]
        base = mods["base_layer"]
        ctx = d.get("batch_context")
        plan = ctx.plan if ctx is not None else None
        As, Bs, scaling = mods["lora_A"]._parameters, mods["lora_B"]._parameters, d["scaling"]
        active = d["active_adapters"]
        if merged:  # (their updates are in the weight already: as LoraLayer.live_adapters leaves them out)
            active = [n for n in active if n not in merged]
            if not active:  # a merged model: the base layer alone, as merge_and_unload leaves it (no plan here:
                return base(x)  # a mixed batch on a layer with merged adapters took the generic path above)
        # a dropout module left in training mode (Monte Carlo dropout) drops: the generic path (see
        # dropout_p); the active adapters' modules, or in a mixed batch any adapter's
        drops = mods["lora_dropout"]._modules
        for name in (active if plan is None else drops):
            if dropping(drops.get(name)):
                return super().forward(x)
        W = base.__dict__["_parameters"].get("weight")
        # (a tensor subclass as weight — quantized, distributed, fake — may implement F.linear its own way)
        direct = (type(W) in PLAIN_TENSORS and x.dtype is W.dtype and x.is_contiguous()
                  and plain_linear(base) and not autocast_on(x))
        if direct:
            # F.linear's own kernel on the flattened input (mm, or addmm with the bias): bitwise the
            # base layer's output, without its module call
            x2 = x.view(-1, x.shape[-1])
            bias = base._parameters["bias"]
            out = torch.mm(x2, W.t()) if bias is None else torch.addmm(bias, x2, W.t())
            if plan is None and len(active) == 1:  # the commonest case: five ops in all
                A = As.get(active[0])
                B = Bs[active[0]] if A is not None else None
                if A is not None and A.dtype is B.dtype is W.dtype:
                    out.addmm_(torch.mm(x2, A.t()), B.t(), alpha=scaling[active[0]])
                    return out.view(*x.shape[:-1], out.shape[-1])
            result, in_place = out.view(*x.shape[:-1], out.shape[-1]), True  # a view, but of our own tensor
        else:
            result = self.own_output(base(x))
            in_place = writes_in_place(result, x)  # else add_lora (fused_lora_add) finds its own way
            self.refuse_meta_adapters(active)  # (a hooked base layer: accelerate's offload may have moved them)
        if plan is not None:  # a mixed batch: repeat a kept layout for these rows if the root checked it
            stacks = d.get("_batched")
            layout = stacks.ready(plan, x) if direct and stacks is not None else None
            if layout is not None:  # (mixed_forward repeats a kept layout for the other cases)
                layout.add(x2, out)
                return result
            return self.mixed_forward(x, result, plan)
        live = [n for n in active if n in As]
        wide = self.sum_dtype(result, live)
        total = result.to(wide) if wide is not None else result  # several adapters: summed in fp32 (sum_dtype)
        for name in live:
            if in_place:
                add_lora_no_grad(total, x, As[name], Bs[name], scaling[name])
            else:
                total = self.add_lora(name, x, total)
        if total is result:
            return result
        if in_place:
            return result.copy_(total)
        return total.to(result.dtype)

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Where a gradient is wanted (gradients on, and x or an active adapter requiring grad), a
        plain frozen fp32 ``nn.Linear`` base on the CPU (no hooks: see ``plain_linear``) computes
        through ``lorakit.layers.gemm.frozen_linear`` (oneDNN's products, ~1.4x faster than torch's
        MKL ones on an AMD EPYC; the gradient of x only, as autograd's would be) where oneDNN pays
        (``gemm.worth_onednn``: not on Intel CPUs, and not for small products); anything else calls the base layer. So
        inference, and a disabled layer (``disable_adapters``), give its bits exactly."""
        base = self.base_layer
        if (not args and not kwargs and torch.is_grad_enabled() and not self.disabled and plain_linear(base)
                and not autocast_on(x)):
            p = base._parameters
            W, b = p["weight"], p["bias"]
            As = self.lora_A._parameters
            if (W is not None and not W.requires_grad and (b is None or not b.requires_grad)
                    and (x.requires_grad or any(As[n].requires_grad for n in self.active_adapters if n in As))
                    and gemm.uses_onednn(x, W, b) and gemm.worth_onednn(x, W)):
                return gemm.frozen_linear(x, W, b)
        return base(x, *args, **kwargs)

    def nested_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward for a nested tensor (``nn.TransformerEncoder`` hands its layers one in eval
        mode when given a padding mask): the plain ops, which torch implements for nested tensors;
        the fused nodes and the lean path work on flat views, which a nested tensor has none of."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.batch_context is not None and self.batch_context.plan is not None:
            raise ValueError("a mixed-adapter batch (adapter_names) cannot take a nested tensor input")
        for name in self.live_adapters():
            if name in self.variants:
                raise ValueError(f"adapter {name!r} ({type(self.variants[name]).__name__}) cannot take a nested "
                                 "tensor input; merge it, or give the model a padded tensor")
            h = self.branch(self.lora_dropout[name](x), self.lora_A[name], self.lora_B[name]) * self.scaling[name]
            result = result + h.to(result.dtype)
        return result

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # One fused autograd node: in-place addmm, no saved dropout copy (see layers/fused.py).
        p = self.dropout_p(name)  # (the dropout module's mode decides, not the layer's)
        return fused_lora_add(result, x, self.lora_A._parameters[name], self.lora_B._parameters[name],
                              self.scaling[name], p, p > 0)

    # ---- mixed-adapter batches, batched over adapters ---------------------------------------------

    def add_rows(self, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> bool:
        add_lora_no_grad(out, x, A, B, scale)
        return True

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        """Mixed batch; few tokens without gradients: all adapters in two ``bmm`` calls.

        The A's and B's of every plain adapter on the layer are stacked once — (adapters, in, r_max)
        and (adapters, r_max, out), ranks padded with zeros — and kept until an adapter is added,
        deleted or changes its weights or scale (this costs as much memory as those adapters; each
        B is stacked times its scale). Each forward gathers the tokens adapter by adapter into
        (adapters, m, in), m the largest group, with a mask zeroing padding slots and adapters
        absent from the batch (no mask where every adapter has m tokens); only the slots from the
        first to the last adapter used are multiplied. The gather index and mask for the rows'
        names are kept with the stacks (``BatchedStacks.layouts``, the most recent 16 sets of rows),
        so a decode loop builds them once. Anything else (training, dropout, variants, more tokens)
        takes ``LoraLayer.mixed_forward``.
        """
        tokens = x.numel() // x.shape[-1] if x.dim() else 0
        if (torch.is_grad_enabled() or self.training or self.merged_adapters or tokens > BATCHED_MIXED_MAX_TOKENS
                or x.dim() < 2 or x.shape[0] != plan.batch_size or not result.is_contiguous() or self.drops_now()):
            return super().mixed_forward(x, result, plan)
        d = self.__dict__
        stacks = d.get("_batched")
        checked = stacks is not None and stacks.checked_for(plan)  # by the root pre-hook, for this forward
        layout = stacks.ready(plan, x) if checked else None
        if layout is not None:
            layout.add(x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1]))
            return result
        # Layers with the same adapters share one decision per forward (this runs per layer and step).
        present = self.lora_A._parameters
        signature = ("slots", tuple(present), tuple(self.variants))
        decision = plan.cache.get(signature, False)
        if decision is False:
            used = {n for n, _ in plan.groups if n in present}
            ok = len(used) >= 2 and not any(n in self.variants for n in used)
            stacked = tuple(n for n in present if n not in self.variants)
            # Only the run of stack slots from the first to the last adapter in the batch is
            # multiplied (a view of the stacks): adapters loaded but unused outside it cost nothing.
            where = [i for i, n in enumerate(stacked) if n in used]
            decision = plan.cache[signature] = (stacked, where[0], where[-1] + 1) if ok else None
        if decision is None:
            return super().mixed_forward(x, result, plan)
        stacked, lo, hi = decision
        if stacks is None or stacks.names != stacked or not (checked or stacks.holds(self)):
            d.pop("_batched", None)  # free the old stacks before building new ones
            stacks = d["_batched"] = BatchedStacks(self, stacked)
            if self.batch_context is not None:
                self.batch_context.add_batched(self)
        A_t, B_t, slots = stacks.A_t[lo:hi], stacks.B_t[lo:hi], stacked[lo:hi]
        index, mask = self._token_layout(plan, slots, tokens // plan.batch_size, A_t.dtype, x.device)
        if index.numel() > 4 * tokens:  # mostly padding (many loaded adapters, few used)
            return super().mixed_forward(x, result, plan)
        stacks.keep(plan, BatchedLayout(x, A_t, B_t, index, mask)).add(x.reshape(-1, x.shape[-1]),
                                                                      result.view(-1, result.shape[-1]))
        return result

    def _token_layout(self, plan: Any, slots: tuple[str, ...], seq: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token index (slots · m,) and a 0/1 mask (slots, m, 1) of the padding slots, None where
        there are none (every slot has m tokens); cached on the plan."""
        key = ("batched", slots, seq, dtype, str(device))
        hit = plan.cache.get(key)
        if hit is not None:
            return hit
        rows_of = dict(plan.groups)
        per_slot = []
        for n in slots:
            rows = rows_of.get(n)
            if rows is None:
                rows = []
            elif isinstance(rows, slice):
                rows = list(range(plan.batch_size))[rows]
            else:
                rows = rows.tolist()
            per_slot.append([row * seq + s for row in rows for s in range(seq)])
        m = max(len(t) for t in per_slot)
        index = torch.zeros(len(slots), m, dtype=torch.long)
        mask = torch.zeros(len(slots), m, 1, dtype=dtype)
        for i, toks in enumerate(per_slot):
            if toks:
                index[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                mask[i, :len(toks)] = 1.0
        padded = any(len(t) < m for t in per_slot)
        hit = plan.cache[key] = (index.view(-1).to(device), mask.to(device) if padded else None)
        return hit


#: The weights epoch: stacks built in an earlier one are rebuilt. It moves after every optimizer step
#: (a global ``torch.optim`` hook, registered with the first stacks: a fused optimizer updates the
#: parameters in place without moving their version counters, so the stacks kept the old weights,
#: 1.4 off on a tiny Llama's logits) and at the start of each ``adapter_batch`` block (so an edit
#: through ``.data`` between blocks, which no version counter sees either, is read too).
_EPOCH = [0]
_OPTIMIZER_HOOK: list[Any] = []


def new_weights_epoch(*_args: Any) -> None:
    """Stacks built before this call are rebuilt at their next use."""
    _EPOCH[0] += 1


def _watch_optimizers() -> None:
    if not _OPTIMIZER_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _OPTIMIZER_HOOK.append(register_optimizer_step_post_hook(new_weights_epoch))


class BatchedStacks:
    """The batched mixed-batch path's state on one Linear layer: its plain adapters' Aᵀ and
    scale · Bᵀ stacked — (adapters, in, r_max) and (adapters, r_max, out), ranks padded with zeros — what they
    were built from (the layer's adapter names, the parameter objects with their versions and
    storages, the scales), and the layouts built on them for recent sets of rows.

    ``holds`` says whether the stacks are still the layer's adapters. The root pre-hook runs it for
    every layer with stacks once per forward (``MixedBatchContext.check_layouts``) and, where it
    holds, sets ``mark`` to the pair (the forward's plan, the layout kept for its rows) — one
    attribute, so a forward in another thread never pairs its plan with this one's layout; the
    layer's forward then only compares the plan and the input's shape and dtype before ``add``.
    Checked there, in one loop, the checks cost several times less than inside each layer's
    forward, between the base model's matmuls (their code and data evicted from the caches); and
    rebuilding the layout each forward (module lookups, cache keys) cost tens of µs per layer. Any
    change — an adapter added, deleted or updated in place, new storage or a new parameter, a new
    scale — fails ``holds``, and ``mixed_forward`` builds new stacks; so does an optimizer step or a
    new ``adapter_batch`` block since they were built (``_EPOCH``).
    """

    __slots__ = ("names", "present", "variants", "params", "stamp", "A_t", "B_t", "layouts", "mark", "epoch")
    MAX_LAYOUTS = 16

    def __init__(self, layer: LoraLinear, names: tuple[str, ...]) -> None:
        _watch_optimizers()
        self.epoch = _EPOCH[0]
        As, Bs = layer.lora_A._parameters, layer.lora_B._parameters
        self.names, self.present, self.variants = names, tuple(As), tuple(layer.variants)
        self.params, self.stamp = self._state(names, As, Bs, layer.scaling)
        r_max = max(layer.r[n] for n in names)
        A0 = As[names[0]]
        self.A_t = torch.zeros(len(names), A0.shape[1], r_max, dtype=A0.dtype, device=A0.device)
        self.B_t = torch.zeros(len(names), r_max, Bs[names[0]].shape[0], dtype=A0.dtype, device=A0.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                r = layer.r[n]
                self.A_t[i, :, :r] = As[n].T
                self.B_t[i, :r, :] = Bs[n].T * layer.scaling[n]  # the scale folded in: one kernel less per forward
        self.layouts: dict[tuple[str, ...], BatchedLayout] = {}
        #: (plan, its rows' layout or None) once checked for that plan's forward, else None.
        self.mark: tuple[Any, BatchedLayout | None] | None = None

    def holds(self, layer: nn.Module) -> bool:
        """Whether the stacks are still ``layer``'s adapters: same names, parameters, versions, storages, scales."""
        d = layer.__dict__
        mods = d["_modules"]
        As, Bs = mods["lora_A"]._parameters, mods["lora_B"]._parameters
        if self.epoch != _EPOCH[0] or tuple(As) != self.present or tuple(d["variants"]) != self.variants:
            return False
        params, stamp = self._state(self.names, As, Bs, d["scaling"])
        return all(a is b for a, b in zip(params, self.params)) and stamp == self.stamp

    @staticmethod
    def _state(names: tuple[str, ...], As: dict, Bs: dict, scaling: dict) -> tuple[list, tuple[list, list, list]]:
        """The adapters' A and B parameter objects, and their version counters, storages and scales.

        A tensor made under ``torch.inference_mode`` (e.g. an adapter loaded there) has no version
        counter, so an in-place change to it cannot be seen: it gets a fresh object in place of
        one, which equals nothing, and stacks holding it are rebuilt at every forward."""
        params = [As.get(n) for n in names] + [Bs.get(n) for n in names]
        versions = [object() if p.is_inference() else p._version for p in params]
        return params, (versions, [p.data_ptr() for p in params], [scaling.get(n) for n in names])

    def check(self, plan: Any, layer: nn.Module) -> None:
        """For the root pre-hook: mark the stacks checked for ``plan`` (and pick its rows' layout), or not."""
        self.mark = (plan, self.layouts.get(plan.names)) if self.holds(layer) else None

    def checked_for(self, plan: Any) -> bool:
        """Whether the stacks were checked (or built) for ``plan``'s forward."""
        mark = self.mark
        return mark is not None and mark[0] is plan

    def ready(self, plan: Any, x: torch.Tensor) -> BatchedLayout | None:
        """The layout kept for ``plan``'s rows if the stacks are checked for ``plan`` and it was built
        for ``x``'s shape and dtype, else None."""
        mark = self.mark
        if mark is None or mark[0] is not plan:
            return None
        layout = mark[1]
        return layout if layout is not None and x.shape == layout.shape and x.dtype == layout.dtype else None

    def keep(self, plan: Any, layout: BatchedLayout) -> BatchedLayout:
        """Keep ``layout`` for ``plan``'s rows (dropping the oldest beyond ``MAX_LAYOUTS``); mark it as this forward's."""
        layouts = self.layouts
        layouts.pop(plan.names, None)
        if len(layouts) >= self.MAX_LAYOUTS:
            layouts.pop(next(iter(layouts), None), None)
        layouts[plan.names] = layout
        self.mark = (plan, layout)
        return layout


class BatchedLayout:
    """The batched path for one set of rows: the used slots of the stacks (views), the token index,
    the padding mask (None without padding), and the input shape and dtype they were built for.
    ``add`` runs the ops ``mixed_forward`` ran when it built them, so a repeat is bitwise the same."""

    __slots__ = ("shape", "dtype", "A_t", "B_t", "index", "mask", "gathered")

    def __init__(self, x: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor, index: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        self.shape, self.dtype = x.shape, x.dtype
        self.A_t, self.B_t, self.index, self.mask = A_t, B_t, index, mask
        self.gathered = (A_t.shape[0], index.numel() // A_t.shape[0], x.shape[-1])  # (adapters, m, in)

    def add(self, x2: torch.Tensor, out2: torch.Tensor) -> None:
        """Gather each adapter's tokens from ``x2`` (tokens, in), two ``bmm`` for all adapters (B's
        stacked pre-scaled), scatter-add into ``out2`` (tokens, out), a view of the layer's output.
        No-op dtype conversions and an all-ones mask are skipped (each call costs µs, in ~200
        layers per decode step)."""
        A_t, index = self.A_t, self.index
        xs = x2.index_select(0, index).view(self.gathered)
        if xs.dtype != A_t.dtype:
            xs = xs.to(A_t.dtype)
        h = torch.bmm(xs, A_t)                                    # (adapters, m, r)
        if self.mask is not None:
            h.mul_(self.mask)                                     # padding rows to 0
        delta = torch.bmm(h, self.B_t)                            # (adapters, m, out), scaled
        delta = delta.view(-1, delta.shape[-1])
        if delta.dtype != out2.dtype:  # fp32 adapters on a bf16 output: summed in fp32, rounded once
            wide = out2.to(delta.dtype)
            wide.index_add_(0, index, delta)
            out2.copy_(wide)
            return
        out2.index_add_(0, index, delta)
