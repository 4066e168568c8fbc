"""Registry of LoRA variants: hooks that change how an adapter initialises, runs and merges.

Plain LoRA needs no variant object. A variant is one file in this package that subclasses
``LoraVariant`` (forward / merge hooks, e.g. DoRA) and registers itself with ``register_variant``, or
registers an initialisation method (e.g. PiSSA) with ``register_init_method``. rsLoRA only changes
the scaling and is handled by ``LoraConfig.scaling_for``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable

import torch

from lorakit.config import PEFT_ONLY_INITS

if TYPE_CHECKING:
    from lorakit.config import LoraConfig
    from lorakit.layers.base import LoraLayer


def add_rounded_once(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``result + delta`` in the wider of the two dtypes, rounded once to ``result``'s dtype: an fp32
    update on a bf16 / fp16 output is not rounded to half precision before the sum (as in PEFT,
    where the sum promotes to fp32 and the layer casts back at its end)."""
    out = result + delta
    return out if out.dtype == result.dtype else out.to(result.dtype)


class LoraVariant:
    """Hooks of one LoRA variant. Override what the variant changes; the defaults are plain LoRA."""

    #: The config flag that selects this variant (e.g. "use_dora").
    config_flag: str = ""
    #: Extra per-adapter tensors saved with the adapter: layer attribute (a ParameterDict keyed by
    #: adapter name) -> name on disk after ``base_model.model.<module path>.``
    saved_stores: dict[str, str] = {}

    def extra_shapes(self, layer: "LoraLayer", r: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the ``saved_stores`` tensors for rank ``r`` (used to check a file before loading)."""
        return {}

    def on_add(self, layer: "LoraLayer", name: str) -> None:
        """Called after A and B of adapter ``name`` exist and are initialised (create extra tensors here)."""

    def on_delete(self, layer: "LoraLayer", name: str) -> None:
        """Called when adapter ``name`` is deleted (drop extra tensors here)."""

    def forward(self, layer: "LoraLayer", name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Output of the layer with adapter ``name`` applied on top of ``result`` (the base output so far)."""
        return add_rounded_once(result, layer.lora_delta(name, x))

    def merged_weight(self, layer: "LoraLayer", name: str, weight: torch.Tensor, unmerged: torch.Tensor) -> torch.Tensor:
        """``weight`` (float32 or wider: the base weight with the adapters merged before this one)
        with adapter ``name`` folded in; ``unmerged`` is the weight as the forward sees it, before
        this merge (for updates that depend on it). May update ``weight`` in place."""
        return weight.add_(layer.delta_weight(name))

    def unmerged_weight(self, layer: "LoraLayer", name: str) -> torch.Tensor:
        """The base weight with adapter ``name`` taken out again."""
        weight = layer.base_layer.weight
        return weight.to(torch.promote_types(weight.dtype, torch.float32)) - layer.delta_weight(name)


#: config flag (e.g. "use_dora") -> variant class
VARIANTS: dict[str, type[LoraVariant]] = {}
#: init name (lower case, e.g. "pissa") -> fn(layer, adapter_name, init_value)
INIT_METHODS: dict[str, Callable[["LoraLayer", str, str], None]] = {}


def register_variant(cls: type[LoraVariant]) -> type[LoraVariant]:
    """Class decorator: make ``cls`` the variant selected by ``cls.config_flag``."""
    VARIANTS[cls.config_flag] = cls
    return cls


def register_init_method(name: str, prefix: bool = False):
    """Decorator: make ``fn`` the initialisation for ``init_lora_weights=name`` (with ``prefix``, for
    ``name`` followed by a number: ``pissa_niter_4``)."""

    def decorate(fn):
        INIT_METHODS[name.lower() + ("*" if prefix else "")] = fn
        return fn

    return decorate


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def variant_for(config: "LoraConfig") -> LoraVariant | None:
    """The variant object a config asks for (e.g. DoRA for ``use_dora=True``), or None for plain LoRA.

    Raises:
        ValueError: the config asks for a variant lorakit does not have.
    """
    _load_all()
    chosen = [flag for flag in ("use_dora",) if getattr(config, flag, False)]
    chosen += [flag for flag in VARIANTS if flag not in chosen and getattr(config, flag, False)]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise ValueError(f"LoraConfig asks for several variants at once: {chosen}")
    if chosen[0] not in VARIANTS:
        raise ValueError(f"LoraConfig.{chosen[0]}=True, but that variant is not available in this lorakit version")
    return VARIANTS[chosen[0]]()


def get_init_method(name: str) -> Callable[["LoraLayer", str, str], None]:
    """The initialisation function for ``init_lora_weights=name``.

    Raises:
        ValueError: no such method; the message lists the known ones.
    """
    _load_all()
    key = name.lower()
    if key in INIT_METHODS:
        return INIT_METHODS[key]
    for pattern, fn in INIT_METHODS.items():
        if pattern.endswith("*") and key.startswith(pattern[:-1]):
            if not key[len(pattern) - 1:].isdigit():
                raise ValueError(f"init_lora_weights {name!r}: expected '{pattern[:-1]}' and a number, "
                                 f"e.g. '{pattern[:-1]}4'")
            return fn
    known = ["True", "False", "gaussian", *sorted(k.replace("*", "N") for k in INIT_METHODS)]
    if key in PEFT_ONLY_INITS:
        loadable = [repr(n) for n, rewrote in PEFT_ONLY_INITS.items() if rewrote is None]
        loadable = f"{', '.join(loadable[:-1])} or {loadable[-1]}" if len(loadable) > 1 else loadable[0]
        raise ValueError(f"init_lora_weights={name!r} is a PEFT initialisation lorakit does not implement (an adapter "
                         f"saved with {loadable} loads: its tensors carry everything); known: {known}")
    raise ValueError(f"unknown init_lora_weights {name!r}; known: {known}")
