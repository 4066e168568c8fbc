"""Base layers whose weights accelerate offloads.

A model loaded with ``device_map`` "cpu" / "disk" entries, or put under accelerate's ``cpu_offload``
/ ``disk_offload``, keeps an offloaded layer's tensors on the meta device (no data) between
forwards. The layer's ``_hf_hook`` (an ``AlignDevicesHook`` with ``offload=True``) holds the real
values in its ``weights_map`` (CPU tensors, or a lazy reader of files on disk) and loads them in for
each forward of that layer only.

A LoRA layer reads its base weight outside that forward (a merge, DoRA's column norm, a PiSSA
residual) and a merge or a residual writes a new one. Here:

- ``stored_tensor`` gives a base tensor as stored: the parameter itself, or the offload map's
  value when the parameter is on meta;
- ``materialized`` puts a private copy of the base weight in place for the duration of a block and,
  when asked, stores what the block left in it back into the offload map afterwards (the layer is
  on meta again after the block, as accelerate keeps it);
- ``remember`` / ``put_back`` keep a tied weight's shared value across a merge, for an unmerge of
  every adapter to tie it again (as ``lorakit.unmerge`` does on a plainly loaded model).

The map's old value is replaced, never written into: it may be shared with other holders or be a
read-only memory map of a file. Replaced values live in memory (a disk-offloaded layer that was
merged into keeps its merged weight in CPU memory; the offload folder and the model's files are
never written).

Only hooks on the base layer itself are followed (accelerate puts one on every offloaded module that
holds parameters); a meta weight without one stays unreadable (``base.meta_weight`` refuses it).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def offload_hook(module: nn.Module) -> Any | None:
    """The hook that offloads ``module``'s own tensors (accelerate's ``AlignDevicesHook`` with
    ``offload`` set and a ``weights_map``; also one inside a ``SequentialHook``), or None."""
    hook = module.__dict__.get("_hf_hook")
    for one in getattr(hook, "hooks", None) or (hook,):
        if (getattr(one, "offload", False) and getattr(one, "weights_map", None) is not None
                and not getattr(one, "place_submodules", False)):
            return one
    return None


def _offloaded_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """The offload map's value of ``module``'s tensor ``name`` when the tensor itself is on meta, or None."""
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = module._buffers.get(name)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_meta:
        return None
    hook = offload_hook(module)
    if hook is None:
        return None
    try:
        return hook.weights_map[name]
    except KeyError:
        return None


def readable(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module``'s tensor ``name`` has data: not on meta, or on meta with its value in an offload map."""
    tensor = module._parameters.get(name)
    return not (isinstance(tensor, torch.Tensor) and tensor.is_meta) or _offloaded_value(module, name) is not None


def stored_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module``'s tensor ``name`` as stored (for reading only): the parameter or buffer itself, or,
    where accelerate has offloaded it, the offload map's value on the hook's execution device
    (None where the module has no such tensor)."""
    value = _offloaded_value(module, name)
    if value is None:
        return getattr(module, name, None)
    tensor = module._parameters.get(name)
    if tensor is None:
        tensor = module._buffers[name]
    return value.to(device=_execution_device(module), dtype=tensor.dtype)


def _execution_device(module: nn.Module) -> torch.device:
    device = getattr(offload_hook(module), "execution_device", None)
    return torch.device("cpu") if device is None else torch.device(device)


class _Written(Mapping):
    """An offload map with some values replaced by what lorakit wrote (merged weights, residuals):
    those come from memory, the rest from the map below (which may read files lazily)."""

    def __init__(self, below: Mapping) -> None:
        self.below = below
        self.written: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.written[key] if key in self.written else self.below[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.written
        yield from (key for key in self.below if key not in self.written)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _in_memory(weights_map: Mapping, name: str) -> tuple[dict, str] | None:
    """``(dict, key)`` where an offload map keeps ``name`` as a tensor in memory: cpu_offload's state
    dict, or the in-memory part of accelerate's ``OffloadedWeightsLoader`` (device_map "cpu"
    entries: read first, before its files); None where the map reads it from a file."""
    if isinstance(weights_map, dict):
        return weights_map, name
    below, prefix = getattr(weights_map, "dataset", None), getattr(weights_map, "prefix", None)
    if not isinstance(prefix, str):
        return None
    if isinstance(below, dict):
        return below, prefix + name
    in_memory = getattr(below, "state_dict", None)
    if isinstance(in_memory, dict) and prefix + name in in_memory:
        return in_memory, prefix + name
    return None


def _store(hook: Any, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the offload map's ``name``, replacing the entry (not writing into its tensor,
    and not keeping the old one beside it where the map holds it in memory)."""
    weights_map = hook.weights_map
    place = _in_memory(weights_map, name)
    if place is not None:
        place[0][place[1]] = value
        return
    if not isinstance(weights_map, _Written):  # (a lazy reader of files: the new value kept in memory in front)
        hook.weights_map = weights_map = _Written(weights_map)
    weights_map.written[name] = value


def remember(module: nn.Module) -> torch.Tensor | None:
    """Before a merge first writes ``module``'s offloaded weight: the value stored now, for
    ``put_back`` after an unmerge of every adapter, where the map keeps it in memory and another
    entry shares its storage (a tied weight, cpu_offload's state dict: keeping it costs nothing,
    and putting it back ties the weight again, as ``lorakit.unmerge`` does on a plainly loaded
    model); else None, and the unmerge leaves W + ΔW − ΔW, as on a plainly loaded model. The
    tensor itself is kept (in the layer's ``__dict__``), so a deepcopy of the model copies it with
    the map it shares storage with."""
    value = _offloaded_value(module, "weight")
    if value is None:
        return None
    place = _in_memory(offload_hook(module).weights_map, "weight")
    shared = place is not None and any(
        other is not value and isinstance(other, torch.Tensor) and other.data_ptr() == value.data_ptr()
        for other in place[0].values())
    return value if shared else None


def put_back(module: nn.Module, value: torch.Tensor) -> None:
    """Make ``value`` (``remember``'s) ``module``'s stored weight again, where it is still offloaded."""
    hook = offload_hook(module)
    if hook is not None and _offloaded_value(module, "weight") is not None:
        _store(hook, "weight", value)


@contextmanager
def materialized(module: nn.Module, write: bool = False) -> Iterator[None]:
    """Inside the block, ``module.weight`` is a private copy of the offloaded weight (on the hook's
    execution device) where accelerate has offloaded it; otherwise nothing changes. With ``write``,
    the copy as the block left it is stored into the offload map when the block ends without an
    error. Either way the module gets its meta parameter back."""
    value = _offloaded_value(module, "weight")
    if value is None:
        yield
        return
    placeholder = module._parameters["weight"]
    copy = value.to(device=_execution_device(module), dtype=placeholder.dtype, copy=True)
    module._parameters["weight"] = nn.Parameter(copy, requires_grad=placeholder.requires_grad)
    try:
        yield
        if write:
            _store(offload_hook(module), "weight", module._parameters["weight"].detach().to("cpu"))
    finally:
        module._parameters["weight"] = placeholder
