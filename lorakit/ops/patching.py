"""Switching modules to an instance ``forward`` (a callable object) and back, for the fused ops.

The wrapper is a plain object holding the module, so deepcopy and pickling keep working, and
deleting the instance attribute gives the class's own ``forward`` back.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn


def check_module(model: object) -> None:
    """TypeError unless ``model`` is a torch module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")


def forward_body(module: nn.Module) -> list[str] | None:
    """The code lines of ``type(module).forward`` after its signature (no comments or docstring
    delimiters, stripped), or None when the source cannot be read."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    return [line.strip() for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith(("#", '"""'))]


#: On a model: the transformers models in it whose hub kernels ``patch_forwards`` turned off.
HUB_KERNELS_KEY = "_lorakit_hub_kernels_off"


def hub_kernels_off(model: nn.Module) -> None:
    """Turn off transformers' hub kernels (``use_kernels``, on by default in transformers 5 where the
    ``kernels`` package is installed) in every transformers model in ``model`` (itself, or the one a
    wrapper such as PEFT's holds), remembered on ``model``: with them on, each ``.train()`` /
    ``.eval()`` re-kernelizes the layers they decorate (RMSNorm), which deletes an instance
    ``forward`` such as lorakit's fused norm, so training silently ran without it. (A model that
    holds ``model`` as a part, say its backbone, is out of reach: patch the model you call
    ``.train()`` on.)"""
    turned = model.__dict__.get(HUB_KERNELS_KEY, [])
    for module in model.modules():
        # (only a class with the property: a wrapper's __getattr__ passes the attribute through)
        if isinstance(getattr(type(module), "use_kernels", None), property) and module.use_kernels:
            module.use_kernels = False
            turned.append(module)
    if turned:
        model.__dict__[HUB_KERNELS_KEY] = turned


def hub_kernels_back(model: nn.Module) -> None:
    """Turn the hub kernels ``hub_kernels_off`` turned off back on."""
    for module in model.__dict__.pop(HUB_KERNELS_KEY, []):
        module.use_kernels = True


def patch_forwards(model: nn.Module, wrapper: type, applies: Callable[[nn.Module], bool]) -> int:
    """Give every module of ``model`` for which ``applies`` holds ``wrapper(module)`` as its forward;
    returns how many modules are switched (already switched ones count, and are left as they are).
    The model's hub kernels are turned off first (``hub_kernels_off``)."""
    check_module(model)
    hub_kernels_off(model)
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), wrapper):
            count += 1
        elif applies(module):
            module.forward = wrapper(module)
            count += 1
    return count


def unpatch_forwards(model: nn.Module, wrapper: type) -> int:
    """Remove every ``wrapper`` forward from ``model``'s modules; returns how many were restored."""
    check_module(model)
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), wrapper):
            del module.forward
            count += 1
    return count
