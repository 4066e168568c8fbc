"""LoRA for ``nn.Linear``: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ, A: (r, in), B: (out, r)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.base import LoraLayer
from lorakit.layers.fused import add_lora_no_grad, fused_lora_add, writes_in_place

#: Mixed-adapter batches with at most this many tokens (decode steps, short prompts) take the
#: batched path: one gather, two ``bmm`` and one ``index_add_`` per layer for all adapters, instead
#: of four small ops per adapter. Above it the per-group path is faster (benchmarks/multi_adapter.py).
BATCHED_MIXED_MAX_TOKENS = 128


@register_layer_type(nn.Linear)
class LoraLinear(LoraLayer):
    """LoRA on a Linear layer; the base weight is (out, in), so ΔW = B @ A as is."""

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
        outputs are bitwise the same. Anything else (gradients, training mode, merged adapters,
        variants, mixed batches, a disabled layer) takes the generic path.
        """
        d = self.__dict__
        ctx = d.get("batch_context")
        if (args or kwargs or torch.is_grad_enabled() or d["training"] or d["disabled"] or d["merged_adapters"]
                or d["variants"] or (ctx is not None and ctx.plan is not None)):
            return super().forward(x, *args, **kwargs)
        mods = d["_modules"]
        result = mods["base_layer"](x)
        As, Bs, scaling = mods["lora_A"]._parameters, mods["lora_B"]._parameters, d["scaling"]
        in_place = writes_in_place(result, x)  # what fused_lora_add checks before its no-grad branch
        for name in d["active_adapters"]:
            A = As.get(name)
            if A is None:
                continue
            if in_place:
                add_lora_no_grad(result, x, A, Bs[name], scaling[name])
            else:
                result = self.add_lora(name, x, result)
        return result

    def add_lora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # One fused autograd node: in-place addmm, no saved dropout copy (see layers/fused.py).
        return fused_lora_add(result, x, self.lora_A._parameters[name], self.lora_B._parameters[name],
                              self.scaling[name], self.dropout_p(name), self.training)

    # ---- mixed-adapter batches, batched over adapters ---------------------------------------------

    def add_rows(self, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> bool:
        add_lora_no_grad(out, x, A, B, scale)
        return True

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, plan: Any) -> torch.Tensor:
        """Mixed batch; few tokens without gradients: all adapters in two ``bmm`` calls.

        The A's and B's of every plain adapter on the layer are stacked once — (adapters, in, r_max)
        and (adapters, r_max, out), ranks padded with zeros — and kept until an adapter is added,
        deleted or changes its weights (this costs as much memory as those adapters). Each forward
        gathers the tokens adapter by adapter into (adapters, m, in), m the largest group, with a
        scale of 0 on padding slots and on adapters absent from the batch; only the slots from the
        first to the last adapter used are multiplied. Anything else (training,
        dropout, variants, more tokens) takes ``LoraLayer.mixed_forward``.
        """
        tokens = x.numel() // x.shape[-1] if x.dim() else 0
        if (torch.is_grad_enabled() or self.merged_adapters or tokens > BATCHED_MIXED_MAX_TOKENS
                or x.dim() < 2 or x.shape[0] != plan.batch_size or not result.is_contiguous()):
            return super().mixed_forward(x, result, plan)
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
        A_t, B_t = self._stacked(stacked)
        A_t, B_t, slots = A_t[lo:hi], B_t[lo:hi], stacked[lo:hi]
        index, scales = self._token_layout(plan, slots, tokens // plan.batch_size, A_t.dtype, x.device)
        if index.numel() > 4 * tokens:  # mostly padding (many loaded adapters, few used)
            return super().mixed_forward(x, result, plan)
        x2 = x.reshape(tokens, x.shape[-1])
        xs = x2.index_select(0, index).view(len(slots), -1, x2.shape[-1]).to(A_t.dtype)
        h = torch.bmm(xs, A_t).mul_(scales)                      # (adapters, m, r): padding rows are 0
        delta = torch.bmm(h, B_t)                                 # (adapters, m, out)
        out2 = result.view(tokens, result.shape[-1])
        out2.index_add_(0, index, delta.view(-1, delta.shape[-1]).to(result.dtype))
        return result

    def _stacked(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Aᵀ and Bᵀ stacks of adapters ``names``; cached while their storages and versions are unchanged."""
        As, Bs = self.lora_A._parameters, self.lora_B._parameters
        params = [As[n] for n in names] + [Bs[n] for n in names]
        # The current parameters' versions and addresses: a change in place, new storage or a new
        # parameter object (new storage too) all rebuild the stacks.
        versions, addresses = [p._version for p in params], [p.data_ptr() for p in params]
        cached = self.__dict__.get("_stack_cache")
        if cached is not None and cached[0] == names and cached[3] == versions and cached[4] == addresses:
            return cached[1], cached[2]
        self.__dict__.pop("_stack_cache", None)  # free the old stacks before building new ones
        r_max = max(self.r[n] for n in names)
        A0 = As[names[0]]
        A_t = torch.zeros(len(names), A0.shape[1], r_max, dtype=A0.dtype, device=A0.device)
        B_t = torch.zeros(len(names), r_max, Bs[names[0]].shape[0], dtype=A0.dtype, device=A0.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                r = self.r[n]
                A_t[i, :, :r] = As[n].T
                B_t[i, :r, :] = Bs[n].T
        self.__dict__["_stack_cache"] = (names, A_t, B_t, versions, addresses)
        return A_t, B_t

    def _token_layout(self, plan: Any, slots: tuple[str, ...], seq: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token index (slots · m,) and per-slot scale (slots, m, 1) for this layer; cached on the plan."""
        scales = tuple(self.scaling[n] for n in slots)
        key = ("batched", slots, scales, seq, dtype, str(device))
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
        scale = torch.zeros(len(slots), m, 1, dtype=dtype)
        for i, toks in enumerate(per_slot):
            if toks:
                index[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
                scale[i, :len(toks)] = scales[i]
        hit = plan.cache[key] = (index.view(-1).to(device), scale.to(device))
        return hit
