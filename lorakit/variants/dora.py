"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", eq. 5 and §4.3).

    W' = m · (W + s·B·A) / ‖W + s·B·A‖_c

``m`` is a trainable magnitude, one entry per output channel, started at ‖W + s·B·A‖_c so that a fresh
adapter changes nothing beyond what plain LoRA would. ‖·‖_c is the L2 norm of each output channel
(over every other axis of the weight) and is treated as a constant in backward (§4.3: "we suggest
treating ‖V + ΔV‖_c as a constant, thereby detaching it from the gradient graph"). The bias stays out
of the rescaling: y = (m/n) · (W x + s·B A x) + b.

One file for every layer type: the variant only needs the layer's ``delta_from`` (ΔW in the base
weight's layout) and which axis of that layout holds the output channels (``_out_axis``). The full
matrix B·A is built once per forward, without autograd, for the norm; the input still goes through
the thin branch B(A(x)). Nothing is cached across calls, so the norm is never stale after a step;
inside ``dora_caching()`` (opt-in, eval mode) a layer keeps its norm while W, A, B and s are unchanged.

On disk (PEFT 0.21 format): ``<module>.lora_magnitude_vector`` with shape (out,) for Linear /
GPT-2 Conv1D, (embedding_dim,) for Embedding and (1, out, 1, 1) for Conv2d; ``use_dora: true``.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.layers.offload import stored_tensor
from lorakit.variants import LoraVariant, add_rounded_once, register_variant

if TYPE_CHECKING:
    from lorakit.layers.base import LoraLayer


def _out_axis(layer: "LoraLayer") -> int:
    """Axis of ``base_layer.weight`` that indexes output channels.

    Linear (out, in) and Conv2d (out, in, kh, kw): 0. GPT-2 Conv1D (in, out) and Embedding
    (num_embeddings, dim), whose ``delta_from`` returns a transpose: 1.
    """
    from lorakit.layers.embedding import LoraEmbedding

    if isinstance(layer, LoraEmbedding):
        return 1
    try:
        from lorakit.layers.gpt2_conv1d import LoraConv1D
    except ImportError:  # pragma: no cover - transformers missing
        return 0
    return 1 if isinstance(layer, LoraConv1D) else 0


def _magnitude_shape(layer: "LoraLayer") -> tuple[int, ...]:
    """Shape of m: broadcastable against the layer's *output* ((..., out) or (N, out, H, W)).

    B is (out, r, ...) for every layer type ((out, r/G, 1, 1) on a Conv2d of G groups), so its first
    dimension counts the output channels.
    """
    shape = layer.b_shape(layer.rank_groups)  # (the smallest rank the layer takes)
    return (1, shape[0], 1, 1) if len(shape) == 4 else (shape[0],)


def base_weight(layer: "LoraLayer") -> torch.Tensor:
    """The base weight as a dense tensor (dequantised when the base layer stores it quantised)."""
    dequantize = getattr(layer.base_layer, "dequantize_weight", None)
    return dequantize() if callable(dequantize) else stored_tensor(layer.base_layer)


def _channel_view(layer: "LoraLayer", per_channel: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-output-channel vector to broadcast against an ``ndim``-d weight in the base layout."""
    shape = [1] * ndim
    shape[_out_axis(layer)] = -1
    return per_channel.reshape(shape)


#: [on]: ``dora_caching`` is active (a list, so the context manager and the layers share it)
_CACHING = [False]


@contextlib.contextmanager
def dora_caching() -> Iterator[None]:
    """Inside the block, each DoRA layer in eval mode keeps its forward's column norm ‖W + s·B·A‖_c
    and reuses it while W, A, B and the scaling are unchanged, instead of forming W + s·B·A at every
    forward (for a 16-token decode of a DoRA Embedding, nearly all of its time). As PEFT's
    ``DoraCaching``, but the norm is checked against the tensors at each forward (the same tensors,
    unchanged by any in-place edit: their version counters; of the same dtype, device and storage;
    under the same autocast state and inference mode), so an optimizer step, a load, a ``copy_``
    or a cast or move of the model is seen. Not seen: an in-place edit through ``.data`` (which
    bypasses the version counter) inside the block. Outside it, or in training mode, nothing is
    cached (the default), and a layer drops its kept norm at its first forward there."""
    before = _CACHING[0]
    _CACHING[0] = True
    try:
        yield
    finally:
        _CACHING[0] = before


def _same_key(old: tuple, new: tuple) -> bool:
    (old_refs, old_state), (new_refs, new_state) = old, new
    return old_state == new_state and all(a() is not None and a() is b() and va == vb
                                          for (a, va), (b, vb) in zip(old_refs, new_refs))


@register_variant
class DoraVariant(LoraVariant):
    """Hooks for DoRA; one instance per (layer, adapter), so the merge-time norm can live on it."""

    config_flag = "use_dora"
    saved_stores = {"lora_magnitude_vector": "lora_magnitude_vector"}

    def __init__(self) -> None:
        # ‖W + sΔW‖_c at merge time, needed to undo the merge exactly (W itself is overwritten).
        self._merge_norm: torch.Tensor | None = None
        # (what the forward's norm was computed from, the norm) inside ``dora_caching``
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_norm_cache": None}  # (weak references: not copied, not pickled)

    def extra_shapes(self, layer: "LoraLayer", r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_magnitude_vector": _magnitude_shape(layer)}

    def weight_norm(self, layer: "LoraLayer", name: str, combined: torch.Tensor | None = None) -> torch.Tensor:
        """‖W + s·B·A‖_c per output channel, shaped like m, computed in fp32 without autograd (inside
        ``dora_caching``, in eval mode, the forward's norm is kept while W, A, B and s are unchanged)."""
        with torch.no_grad():
            key = None
            if combined is None:
                weight = base_weight(layer)  # (read once: an offloaded one may come from a file)
                key = self._cache_key(layer, name, weight) if _CACHING[0] and not layer.training else None
                cached = self.__dict__.get("_norm_cache")
                if cached is not None:
                    if key is not None and _same_key(cached[0], key):
                        return cached[1]
                    self._norm_cache = None  # (stale, or caching off: not kept past its use)
                combined = weight.to(torch.promote_types(weight.dtype, torch.float32)) + layer.delta_weight(
                    name, for_norm=True)  # (W + s·ΔW in the base weight's layout; B·A built once)
            axis = _out_axis(layer)
            dims = tuple(d for d in range(combined.dim()) if d != axis)
            norm = torch.linalg.vector_norm(combined, dim=dims).reshape(_magnitude_shape(layer))
            if key is not None:
                self._norm_cache = (key, norm)
            return norm

    @staticmethod
    def _cache_key(layer: "LoraLayer", name: str, weight: torch.Tensor) -> tuple | None:
        """(weak reference, version) of ``weight`` (W as read), A and B, then what else the norm
        depends on: the scaling, each tensor's dtype, device and storage (a cast or move of the
        model, ``.to()``, ``.half()``, reassigns ``.data``: the same tensor, the same version), and
        the autocast state and inference mode (a norm made in inference mode cannot be saved for a
        later backward). None where a tensor tracks no version (an inference-mode tensor) or W is
        made anew at each read (dequantised): nothing is cached then. (W read from an offload file
        is a new tensor at each read too: its key never matches.)"""
        if callable(getattr(layer.base_layer, "dequantize_weight", None)):
            return None
        try:
            tensors = (weight, layer.lora_A[name], layer.lora_B[name])
            device = weight.device.type
            state = (float(layer.scaling[name]), tuple((t.dtype, t.device, t.data_ptr()) for t in tensors),
                     torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                     torch.is_inference_mode_enabled())
            return tuple((weakref.ref(t), t._version) for t in tensors), state
        except (RuntimeError, TypeError):
            return None

    def on_add(self, layer: "LoraLayer", name: str) -> None:
        if layer.rank_groups > 1:  # (PEFT 0.21.2 runs it, with a B.view(-1, r) @ A that is not the update's ΔW)
            raise ValueError(f"DoRA needs ΔW in the base weight's layout for its column norm; on a Conv2d with "
                             f"groups={layer.rank_groups} the LoRA update reaches across the groups and has none "
                             "(use plain LoRA there, or leave the layer out of target_modules)")
        if not isinstance(getattr(layer, "lora_magnitude_vector", None), nn.ParameterDict):
            layer.lora_magnitude_vector = nn.ParameterDict()
        A = layer.lora_A[name]
        # m starts at ‖W + sBA‖_c (§4.1 init: m = ‖W₀‖_c, and BA = 0 for a standard init).
        layer.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(layer, name).to(A.dtype), requires_grad=A.requires_grad)

    def on_delete(self, layer: "LoraLayer", name: str) -> None:
        store = getattr(layer, "lora_magnitude_vector", None)
        if isinstance(store, nn.ParameterDict) and name in store:
            del store[name]

    def forward(self, layer: "LoraLayer", name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """y = result + (m/n − 1)·(W x) + (m/n)·s·B A x, with n detached and the bias left out."""
        magnitude = layer.lora_magnitude_vector[name]
        scale = magnitude / self.weight_norm(layer, name).to(magnitude.dtype)  # (out,) or (1, out, 1, 1)
        if scale.dim() > result.dim():  # an unbatched (C, H, W) input to a Conv2d: (out, 1, 1)
            scale = scale.reshape(scale.shape[scale.dim() - result.dim():])
        dropout = layer.lora_dropout[name]
        bias = stored_tensor(layer.base_layer, "bias")
        if not layer.dropout_p(name):  # (no dropout, or its module in eval mode: see LoraLayer.dropout_p)
            x_branch, base_out = x, result
        else:
            # Dropout on the input: the rescaled base term must see the same dropped input (as PEFT).
            x_branch = dropout(x)
            base_out = layer.base_layer(x_branch)
        if bias is not None:
            base_out = base_out - bias.reshape(scale.shape) if scale.dim() > 1 else base_out - bias
        branch = layer.branch(x_branch, layer.lora_A[name], layer.lora_B[name]) * layer.scaling[name]
        # (a narrower base_out, bf16 under fp32 magnitudes, is widened by the product's type promotion
        # to the same values: autograd then keeps it for dL/dm as it is, not a wider copy of it)
        wide = scale.dtype == torch.promote_types(base_out.dtype, scale.dtype)
        update = (scale - 1) * (base_out if wide else base_out.to(scale.dtype)) + scale * branch
        return add_rounded_once(result, update)

    def merged_weight(self, layer: "LoraLayer", name: str, weight: torch.Tensor, unmerged: torch.Tensor) -> torch.Tensor:
        """W' = (m/n) ⊙ (W + s·ΔW), scaled per output channel, with n = ‖W₀ + s·ΔW‖_c taken of the
        weight W₀ the forward sees (``unmerged``), not of W with adapters merged before this one:
        the forward scales everything before it by m/n, with that n (as PEFT does)."""
        delta = layer.delta_weight(name)
        norm = self.weight_norm(layer, name, unmerged + delta)
        self._merge_norm = norm
        scale = layer.lora_magnitude_vector[name].detach().to(norm.dtype) / norm
        return _channel_view(layer, scale, weight.dim()) * (weight + delta)

    def unmerged_weight(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        """W = W' / (m/n) − s·ΔW, with the norm n remembered from the merge."""
        weight = base_weight(layer)
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        if self._merge_norm is None:
            raise ValueError(f"DoRA adapter {name!r} was not merged by this layer; cannot unmerge it")
        scale = layer.lora_magnitude_vector[name].detach().to(weight.dtype) / self._merge_norm
        self._merge_norm = None
        return weight / _channel_view(layer, scale, weight.dim()) - layer.delta_weight(name)
