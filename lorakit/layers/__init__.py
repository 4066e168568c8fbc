"""Registry of LoRA layer types: base module class -> LoRA layer class.

A new layer type is one file in this package that defines a ``LoraLayer`` subclass and decorates it
with ``@register_layer_type(BaseClass)``; injection, saving, merging and the invariant tests find it
through ``LAYER_TYPES``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from lorakit.layers.base import LoraLayer

#: base module class -> LoRA layer class, in registration order.
LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {}


def register_layer_type(base_class: type[nn.Module]) -> Callable[[type[LoraLayer]], type[LoraLayer]]:
    """Class decorator: make ``cls`` the LoRA layer for modules of ``base_class``.

    Raises:
        TypeError: ``base_class`` is not an ``nn.Module`` class, or ``cls`` not a ``LoraLayer``
            subclass (checked before the registry changes: a bad entry broke every later injection).
    """
    if not (isinstance(base_class, type) and issubclass(base_class, nn.Module)):
        raise TypeError(f"register_layer_type needs an nn.Module class, got {base_class!r}")

    def decorate(cls: type[LoraLayer]) -> type[LoraLayer]:
        if not (isinstance(cls, type) and issubclass(cls, LoraLayer)):
            raise TypeError(f"register_layer_type({base_class.__name__}) decorates a LoraLayer subclass, got {cls!r}")
        LAYER_TYPES[base_class] = cls
        cls.base_type = base_class
        return cls

    return decorate


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for ``module``'s type (exact class first, then subclasses), or None."""
    cls = LAYER_TYPES.get(type(module))
    if cls is not None:
        return cls
    for base_class, lora_cls in LAYER_TYPES.items():
        if isinstance(module, base_class):
            return lora_cls
    return None


# Importing the modules registers them.
from lorakit.layers import conv2d, embedding, gpt2_conv1d, linear, nf4_linear  # noqa: E402,F401

__all__ = ["LAYER_TYPES", "LoraLayer", "lora_class_for", "register_layer_type"]
