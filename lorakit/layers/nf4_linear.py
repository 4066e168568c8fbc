"""QLoRA's base layer: a frozen Linear stored as NF4 (``LinearNF4``), and LoRA on top of it.

``LinearNF4`` subclasses ``nn.Linear`` (so ``target_modules="all-linear"`` and ``isinstance`` checks
keep working) but holds no weight parameter: ``weight`` is a read-only dense copy rebuilt from the
NF4 buffers (see ``lorakit/quant.py``), and ``forward`` dequantises into the input's dtype, one layer
at a time, so only one dense weight is alive at once — in backward too: the weight is dequantised
again for dX = dY·W rather than kept from the forward. A and B stay in fp32 (or bf16) and train.

Merging never re-quantises (that would add a second rounding to every weight): ``merge`` swaps the
base for a dense ``nn.Linear`` holding the dequantised W + ΔW, and keeps the NF4 layer aside; once
every adapter is unmerged the NF4 layer comes back bit for bit. ``merge_and_unload`` therefore
returns dense ``nn.Linear`` layers with the merged weight (more memory: 32 or 16 bits per weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import register_layer_type
from lorakit.layers.linear import LoraLinear
from lorakit.quant import dequantize_nf4, quantize_nf4


class _NF4MatMul(torch.autograd.Function):
    """y = x Wᵀ with W dequantised in forward *and again in backward*, so that autograd never keeps
    the dense weight alive between the two (QLoRA's memory saving; §3 "QLoRA", the backward of the
    frozen base only needs dX = dY · W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LinearNF4") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return grad_out @ ctx.layer.dequantize_weight(grad_out.dtype), None


class LinearNF4(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in 4-bit NormalFloat with double-quantised scales.

    Attributes:
        codes / scales / group_factors / scale_mean: NF4 state buffers (``quantize_nf4``).
        bias: The original bias (full precision, frozen), or None.
        compute_dtype: dtype of the dense ``weight`` view (the original weight's dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 64,
                 scale_block_size: int = 256, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight parameter
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.scale_block_size, self.compute_dtype = block_size, scale_block_size, compute_dtype
        state = quantize_nf4(torch.zeros(out_features, in_features, device=device), block_size, scale_block_size)
        for key, value in state.items():
            self.register_buffer(key, value)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, scale_block_size: int = 256) -> "LinearNF4":
        """Quantise ``linear``'s weight; its bias is kept (shared, frozen)."""
        weight = linear.weight
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.block_size, layer.scale_block_size, layer.compute_dtype = block_size, scale_block_size, weight.dtype
        for key, value in quantize_nf4(weight, block_size, scale_block_size).items():
            layer.register_buffer(key, value)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    def _state(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, "group_factors": self.group_factors, "scale_mean": self.scale_mean}

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight rebuilt from NF4, in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_nf4(self._state(), (self.out_features, self.in_features), self.block_size,
                              self.scale_block_size, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """A dense, read-only copy of the weight (writing to it changes nothing; use ``merge``)."""
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            out = _NF4MatMul.apply(x, self)  # re-dequantise in backward instead of saving W
        else:
            out = F.linear(x, self.dequantize_weight(x.dtype))
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def type(self, dst_type):  # type: ignore[override]
        """``nn.Module.type`` casts every tensor, the integer NF4 buffers too (``.type(torch.float32)``
        turned the codes into floats, outputs 1e11 off): here only floating tensors are cast, as
        ``.to(dtype)`` does, and the compute dtype follows."""
        return self._apply(lambda t: t.type(dst_type) if t.is_floating_point() else t)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .to(dtype) / .half() / .bfloat16() leave the integer NF4 buffers alone but move the
        # compute dtype along with the model (the dense weight and the merged layer take it)
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.codes.device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantised weight and the same bias object."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device,
                          dtype=self.compute_dtype)
        dense.weight = nn.Parameter(self.dequantize_weight(), requires_grad=False)
        if self.bias is not None:
            dense.bias = self.bias
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={self.block_size}, double-quant group={self.scale_block_size}")


@register_layer_type(LinearNF4)
class LoraLinearNF4(LoraLinear):
    """LoRA on an NF4 base (QLoRA): forward as ``LoraLinear``; merging goes into a dense copy."""

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe: bool = False, *, stamp: bool = True) -> None:
        if self.merge_order(adapter_names) and isinstance(self.base_layer, LinearNF4):
            # Merge into a dequantised dense copy; never re-quantise (see module docstring).
            self.quantized_base = self.base_layer
            self.base_layer = self.quantized_base.to_linear()
            try:
                super().merge(adapter_names, safe=safe, stamp=stamp)
            except BaseException:
                self.base_layer = self.quantized_base
                del self.quantized_base
                raise
            return
        super().merge(adapter_names, safe=safe, stamp=stamp)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None, *, check: bool = True) -> None:
        super().unmerge(adapter_names, check=check)
        if not self.merged_adapters and isinstance(getattr(self, "quantized_base", None), LinearNF4):
            self.base_layer = self.quantized_base  # the exact NF4 weights, not a re-quantisation
            del self.quantized_base
