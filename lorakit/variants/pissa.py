"""PiSSA and OLoRA: start A and B from the principal part of W and keep only the residual in the base.

PiSSA (Meng et al. 2024, §3, eq. 2-4): with W = U S Vᵀ (viewed as an (out, in) matrix),
    B₀ = U[:, :r] · √(S[:r] / s),   A₀ = √(S[:r] / s) · Vᵀ[:r],   W_res = W − s · B₀ A₀,
so W_res + s·B₀A₀ = W: the output is unchanged at the start, but A and B now train the principal
directions. ``"pissa_niter_K"`` uses a randomised SVD (``torch.svd_lowrank`` with K subspace
iterations, Halko et al. 2011) instead of the full one (§3, "fast SVD").

OLoRA (Büyükakyüz 2024, §3): W = Q R,  B₀ = Q[:, :r],  A₀ = R[:r],  W_res = W − s · B₀ A₀.

Both change the base weight, so an adapter saved as is only fits the residual base. Saving with
``save_adapter(..., convert_to_lora=True)`` writes a plain LoRA against the *original* W instead
(PEFT's ``path_initial_model_for_weight_conversion``; PEFT ``subtract_mutated_init``):
    ΔW = s·(B A − B₀ A₀) = s · [B, −B₀] · [A; A₀]           (rank 2r, same scaling)
which is why the initial A₀, B₀ are kept as buffers (``lora_init_A`` / ``lora_init_B``).

The residual init applies to Linear and GPT-2 Conv1D layers (W viewed as the (out, in) matrix whose
factors are B and A), as in PEFT, so adapters move between the two: an Embedding target gets the
standard initialisation (PEFT does the same, silently; lorakit warns), and a Conv2d target is
refused (PEFT refuses it). ``prepare_residual_init`` checks every target before anything changes
and gives a weight tied to another module (a tied output head) its own copy first.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.variants import register_init_method
from lorakit.variants.dora import _out_axis

if TYPE_CHECKING:
    from lorakit.config import LoraConfig
    from lorakit.layers.base import LoraLayer

#: init_lora_weights values (lower case, prefixes end in "_") whose adapters can be converted.
CONVERTIBLE_PREFIXES = ("pissa", "olora")


class BufferDict(nn.Module):
    """adapter name -> tensor, held as (persistent) buffers so ``.to()`` and ``state_dict`` see them."""

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]


def _weight_matrix(layer: "LoraLayer") -> torch.Tensor:
    """The base weight as the fp32 (out, in·k) matrix that B @ A approximates."""
    weight = layer.base_layer.weight.detach().to(torch.float32)
    if _out_axis(layer) == 1:
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def _base_of(module: nn.Module) -> nn.Module:
    from lorakit.layers.base import LoraLayer

    return module.base_layer if isinstance(module, LoraLayer) else module


def _kind(module: nn.Module) -> str:
    """"linear" (Linear, GPT-2 Conv1D: the residual init applies), "embedding" (standard init, as in
    PEFT) or "other" (refused)."""
    from lorakit.layers import lora_class_for
    from lorakit.layers.embedding import LoraEmbedding
    from lorakit.layers.linear import LoraLinear

    cls = lora_class_for(_base_of(module))
    if cls is not None and issubclass(cls, LoraLinear):
        return "linear"
    return "embedding" if cls is not None and issubclass(cls, LoraEmbedding) else "other"


def _niter_of(init: str) -> int | None:
    """K of ``"pissa_niter_K"`` (None for "pissa" and "olora").

    Raises:
        ValueError: a ``pissa_niter_`` name whose K is not a whole number.
    """
    key = init.lower()
    if not key.startswith("pissa_niter_"):
        return None
    niter = key[len("pissa_niter_"):]
    if not niter.isdigit():
        raise ValueError(f"init_lora_weights {init!r}: expected 'pissa_niter_<iterations>', e.g. 'pissa_niter_4'")
    return int(niter)


def _check_target(module: nn.Module, r: int, init: str, path: str | None = None) -> str:
    """Check that ``module`` (a base layer, or the LoRA layer around it) can take the residual init
    at rank ``r``; returns its ``_kind`` ("linear", or "embedding": the standard init instead).

    Raises:
        ValueError: a quantised base, a layer type PEFT refuses (Conv2d), or ``r`` above the
            weight's smaller dimension; ``path``, when given, is named in the message.
    """
    base = _base_of(module)
    where = f"{path}: " if path else ""
    if callable(getattr(base, "dequantize_weight", None)):
        raise ValueError(f"{where}PiSSA/OLoRA initialisation needs a full-precision base layer; initialise "
                         "on the unquantised model, then quantise the residual (quantize_model_nf4)")
    kind = _kind(module)
    from lorakit.layers.base import computed_weight

    computed = computed_weight(base) if kind == "linear" else None
    if computed:
        raise ValueError(f"{where}{init!r} initialisation writes a residual into the base weight, but {computed}")
    if kind == "other":
        raise ValueError(f"{init!r} initialisation applies to Linear and GPT-2 Conv1D layers; {path or 'this layer'} "
                         f"is a {type(base).__name__} (PEFT refuses it there too): leave it out of target_modules "
                         "or use the default initialisation")
    merged = list(getattr(module, "merged_adapters", None) or [])
    if kind == "linear" and merged:
        # (the init decomposes W + the merged updates; a load redoes it on W alone: the file would not fit)
        raise ValueError(f"{where}{init!r} initialisation decomposes the weight it finds, but adapter(s) {merged} "
                         "are merged into it, and loading the adapter would redo the decomposition on the weight "
                         "without them: unmerge first (lorakit.unmerge), or make them part of the base "
                         "(lorakit.merge_and_unload)")
    if kind == "linear":
        smallest = min(base.weight.shape[0], base.weight[0].numel())
        if r > smallest:
            raise ValueError(f"{where}{init!r} rank r={r} exceeds the weight's smallest dimension {smallest}")
    return kind


def prepare_residual_init(model: nn.Module, targets: list[str], config: "LoraConfig", init: str) -> list[str]:
    """Before a PiSSA / OLoRA injection changes anything: check every target (``_check_target``,
    and the ``pissa_niter_K`` spelling) and untie a target weight shared with another module
    (writing the residual would change that module too); returns the targets untied.

    Raises:
        ValueError: naming the first target that cannot take the initialisation.
    """
    import warnings

    from lorakit.inject import shared_modules, tied_parameters, untie_for_writing

    _niter_of(init)
    kinds = {path: _check_target(model.get_submodule(path), config.rank_for(path), init, path) for path in targets}
    tied = tied_parameters(model)
    shared = shared_modules(model)
    untied = []
    for path, kind in kinds.items():
        base = _base_of(model.get_submodule(path))
        if kind == "linear" and id(base.weight) in tied:
            warnings.warn(f"{path}: its weight is tied to another module; the {init!r} residual is written into "
                          "a copy of its own (the other module keeps the original weight); save the adapter "
                          "with convert_to_lora=True", stacklevel=4)
            untie_for_writing(model, path, shared)  # (a module registered twice gets one of its own first)
            untied.append(path)
    return untied


def _standard_init(layer: "LoraLayer", name: str, init: str) -> None:
    """For an Embedding: the standard initialisation, as PEFT gives it (with a warning)."""
    import warnings

    warnings.warn(f"{init!r} initialisation applies to Linear and GPT-2 Conv1D layers, as in PEFT; the "
                  f"{type(layer.base_layer).__name__} layer gets the standard initialisation", stacklevel=5)
    layer.init_ab(layer.lora_A[name], layer.lora_B[name], layer.r[name])


def _set_residual(layer: "LoraLayer", name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A₀, B₀ into the adapter, keep copies as buffers, and replace W by W − s·B₀A₀."""
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    lora_A.copy_(A.reshape(lora_A.shape))
    lora_B.copy_(B.reshape(lora_B.shape))
    for attr, value in (("lora_init_A", lora_A), ("lora_init_B", lora_B)):
        if not isinstance(getattr(layer, attr, None), BufferDict):
            setattr(layer, attr, BufferDict())
        getattr(layer, attr)[name] = value.detach().clone()
    weight = layer.base_layer.weight
    # Residual from the adapter's stored (possibly rounded) A₀, B₀, so W_res + s·B₀A₀ = W as exactly as possible.
    weight.copy_((weight.to(torch.float32) - layer.delta_weight(name)).to(weight.dtype))


@register_init_method("pissa")
@register_init_method("pissa_niter_", prefix=True)
def pissa_init(layer: "LoraLayer", name: str, init: str) -> None:
    """PiSSA init of adapter ``name``: A, B from the top-r singular triplets of W (see module docstring).

    Raises:
        ValueError: ``init`` is neither "pissa" nor "pissa_niter_K" with an integer K >= 0.
    """
    r, scaling = layer.r[name], layer.scaling[name]
    if _check_target(layer, r, init) == "embedding":
        _standard_init(layer, name, init)
        return
    niter = _niter_of(init)
    matrix = _weight_matrix(layer)
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(matrix, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)  # s·B₀A₀ = U S Vᵀ  (§3: the scaling is divided out, as in PEFT)
    _set_residual(layer, name, A=root[:, None] * Vh, B=U * root[None, :])


@register_init_method("olora")
def olora_init(layer: "LoraLayer", name: str, init: str) -> None:
    """OLoRA init of adapter ``name``: B₀ = Q[:, :r], A₀ = R[:r] from W = QR (Büyükakyüz 2024, §3)."""
    r = layer.r[name]
    if _check_target(layer, r, init) == "embedding":
        _standard_init(layer, name, init)
        return
    Q, R = torch.linalg.qr(_weight_matrix(layer))
    _set_residual(layer, name, A=R[:r], B=Q[:, :r])


def is_convertible(init_lora_weights: bool | str) -> bool:
    """True when adapters made with this ``init_lora_weights`` changed the base weight (PiSSA, OLoRA)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(CONVERTIBLE_PREFIXES)


def residual_owners(model: nn.Module, adapter_name: str) -> list[str]:
    """The other adapters whose PiSSA/OLoRA initialisation wrote a residual into a base weight that
    adapter ``adapter_name`` sits on (their A₀, B₀ are kept on the layer), sorted."""
    from lorakit.inject import iter_lora_layers

    owners: set[str] = set()
    for _, layer in iter_lora_layers(model):
        store = getattr(layer, "lora_init_A", None)
        if adapter_name in layer.lora_A and isinstance(store, BufferDict):
            owners.update(name for name in store._buffers if name != adapter_name)
    return sorted(owners)


def convert_to_lora(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor],
                    config: "LoraConfig") -> tuple[dict[str, torch.Tensor], "LoraConfig"]:
    """Rewrite a PiSSA/OLoRA adapter's saved tensors as a rank-2r LoRA against the original base.

    ΔW = s·(B A − B₀ A₀) = s·[B, −B₀]·[A; A₀]. Rank doubles; alpha doubles (×√2 with rsLoRA) so the
    scaling s is unchanged; ``init_lora_weights`` becomes True (loading must not re-run PiSSA).

    Args:
        model: The model carrying the adapter (its layers hold A₀, B₀).
        adapter_name: The adapter to convert.
        tensors: Its on-disk tensors (``adapter_state_dict``), not modified.
        config: Its config, not modified.

    Returns:
        (new tensors, new config).

    Raises:
        ValueError: the adapter was not initialised with PiSSA/OLoRA, uses DoRA, or a layer lacks A₀/B₀.
    """
    import copy

    from lorakit.inject import iter_lora_layers
    from lorakit.io import PREFIX

    if not is_convertible(config.init_lora_weights):
        owners = residual_owners(model, adapter_name)
        if owners:
            raise ValueError(f"convert_to_lora converts a PiSSA/OLoRA adapter's own residual; adapter {adapter_name!r} "
                             f"(init_lora_weights={config.init_lora_weights!r}) sits on base weights that the "
                             f"residual initialisation of adapter(s) {owners} changed, which it does not undo: "
                             f"save it unconverted and load it together with {owners}")
        raise ValueError(f"convert_to_lora needs a PiSSA/OLoRA adapter; adapter {adapter_name!r} has "
                         f"init_lora_weights={config.init_lora_weights!r}: saved as is, it is already a plain LoRA "
                         "against the base weights it sits on")
    if config.use_dora:
        raise ValueError("convert_to_lora cannot express a DoRA adapter as plain LoRA (the magnitude rescales W)")
    out = dict(tensors)
    for path, layer in iter_lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        stores = getattr(layer, "lora_init_A", None), getattr(layer, "lora_init_B", None)
        disk_a, disk_b = layer.disk_names
        key_a, key_b = f"{PREFIX}{path}.{disk_a}", f"{PREFIX}{path}.{disk_b}"
        if _kind(layer) == "embedding":  # standard init (B₀A₀ = 0, base unchanged): zeros fill the rank
            A0, B0 = torch.zeros_like(out[key_a]), torch.zeros_like(out[key_b])
        elif not all(isinstance(s, BufferDict) and adapter_name in s for s in stores):
            raise ValueError(f"layer {path!r} has no initial A0/B0 for adapter {adapter_name!r}; cannot convert")
        else:
            A0 = stores[0][adapter_name].detach().to("cpu", out[key_a].dtype)
            B0 = stores[1][adapter_name].detach().to("cpu", out[key_b].dtype)
        out[key_a] = torch.cat([out[key_a], A0], dim=0).contiguous()
        out[key_b] = torch.cat([out[key_b], -B0], dim=1).contiguous()
    new = copy.deepcopy(config)
    alpha_factor = math.sqrt(2.0) if config.use_rslora else 2.0  # alpha/r, or alpha/√r, stays the same
    new.r = 2 * config.r
    new.lora_alpha = config.lora_alpha * alpha_factor
    new.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {k: v * alpha_factor for k, v in config.alpha_pattern.items()}
    # A module with a rank_pattern entry but no alpha_pattern entry takes the global alpha, already scaled.
    new.init_lora_weights = True
    return out, new
