"""Model-level adapter operations: activate, disable, merge, unload, count parameters."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.inject import (_remove_adapter_everywhere, _set_submodule, check_model, forget_model, iter_lora_layers,
                            iter_saved_modules, mark_trainable, require_state, restore_fast_paths, retie,
                            untie_tied_for_merge)
from lorakit.layers.base import LoraLayer


def _check_names(model: nn.Module, names: list[str]) -> None:
    state = require_state(model)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(state.configs)}")


def _refuse_changed_merges(layers: list[tuple[str, LoraLayer]], adapter_names: list[str] | None = None) -> None:
    """Before a model-level operation unmerges ``adapter_names`` (default: all merged ones), check
    every layer (``LoraLayer.unmerge_blocker``; ``layers``: the model's ``iter_lora_layers``), so that
    a refusal leaves the whole model as it was."""
    for path, layer in layers:
        if not layer.merged_adapters:
            continue
        why = layer.unmerge_blocker(adapter_names)
        if why:
            raise ValueError(f"{path}: {why}; the model is unchanged")


def _refuse_blocked_activation(model: nn.Module, names: list[str], without: str | None = None) -> None:
    """Before ``set_adapter(names)`` changes anything (or ``delete_adapter(without)``, whose
    ``set_adapter`` follows the removal): check every merged adapter it may unmerge — those not in
    ``names``; all of a layer's where a variant (DoRA) adapter is merged, or where the merge that
    stays would no longer be exact for the new order (a DoRA adapter after them) — so that a refusal
    leaves the model as it was (the last kind was refused after the new active set was set)."""
    for path, layer in iter_lora_layers(model):
        merged = [n for n in layer.merged_adapters if n != without]
        if not merged:
            continue
        stale = [n for n in merged if n not in names]
        remaining = [n for n in merged if n in names]
        if (any(n in layer.variants for n in merged)
                or remaining and not layer.exact_when_merged(remaining, active=names)):
            target: list[str] | None = None  # the layer may unmerge them all
        elif stale:
            target = stale
        else:
            continue
        why = layer.unmerge_blocker(target)
        if why:
            raise ValueError(f"{path}: {why}; the model is unchanged")


def _as_names(value: Any, what: str) -> list[str]:
    """An adapter name or a list of names as a list; refuses other types and repeated names."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be an adapter name or a list of names, got {value!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names {repeated} more than once (each adapter is applied once)")
    return names


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (or a list: their updates are summed) the active adapter(s).

    Adapters that each keep a copy of the same ``modules_to_save`` module cannot be active together
    (a ValueError; the model is unchanged): a forward runs one copy, and a sum of copies is no copy.

    Which adapters train is not changed (see ``set_trainable``). Merged adapters that are not in the
    new active set are unmerged first, so the model computes exactly the active adapters. Where an
    adapter with a variant (DoRA) makes the merged weights wrong for the new order
    (``LoraLayer.exact_when_merged``), the layer unmerges them all.
    """
    names = _as_names(adapter_name, "adapter_name")
    if not names:
        raise ValueError("set_adapter needs at least one adapter name; to run the base model, use "
                         "`with lorakit.disable_adapters(model):` (or `__base__` rows in a mixed batch)")
    _check_names(model, names)
    state = require_state(model)
    for path, wrapper in iter_saved_modules(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:  # (the first one's copy ran, and the others' trained copies got no gradient)
            raise ValueError(f"adapters {owners} each have their own copy of {path!r} (modules_to_save), and one "
                             "forward can run only one copy, not a sum: activate at most one of them "
                             "(PEFT refuses this too)")
    _refuse_blocked_activation(model, names)
    state.active = names
    for _, layer in iter_lora_layers(model):
        stale = [n for n in layer.merged_adapters if n not in names]
        if stale:
            layer.unmerge(stale)
        layer.active_adapters = list(names)
        if layer.merged_adapters and not layer.exact_when_merged(layer.merged_adapters):
            layer.unmerge()
    for _, wrapper in iter_saved_modules(model):
        wrapper.active_adapter = next((n for n in names if n in wrapper.modules_to_save), None)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(require_state(model).active)


def set_trainable(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make exactly ``adapter_names`` trainable (requires_grad) and freeze the other adapters (their
    weights, ``modules_to_save`` copies and trained biases); parameters lorakit does not manage keep
    their ``requires_grad``."""
    names = _as_names(adapter_names, "adapter_names")
    _check_names(model, names)
    require_state(model).trainable = set(names)
    mark_trainable(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from the model and free its tensors.

    Raises:
        ValueError: the name is unknown, or an open ``adapter_batch`` block still uses it (its rows
            would silently run the base model).
    """
    _check_names(model, [adapter_name])
    from lorakit.multi import names_in_open_batches  # (multi imports this module)

    if adapter_name in names_in_open_batches(model):
        raise ValueError(f"adapter {adapter_name!r} is in use by an open adapter_batch block; delete it after the block")
    _refuse_changed_merges(list(iter_lora_layers(model)), [adapter_name])
    state = require_state(model)
    # what is active once it is gone (the first adapter left if it was the only active one), checked
    # before the removal: the set_adapter below must not refuse after the adapter is gone
    after = [n for n in state.active if n != adapter_name] or [n for n in state.configs if n != adapter_name][:1]
    if after:
        _refuse_blocked_activation(model, after, without=adapter_name)
    _remove_adapter_everywhere(model, adapter_name)
    if after:
        set_adapter(model, after)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager in which ``model`` computes the base model's output (bitwise when no adapter
    is merged).

    Merged adapters are unmerged for the duration and merged back afterwards: the base weights
    then come back to rounding (W + ΔW − ΔW), as with PEFT.
    """
    require_state(model)
    pairs = list(iter_lora_layers(model))
    _refuse_changed_merges(pairs)
    layers = [layer for _, layer in pairs]
    wrappers = [w for _, w in iter_saved_modules(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        if layer.merged_adapters:
            layer.unmerge(check=False)  # (checked above)
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])
        for wrapper in wrappers:
            wrapper.disabled = False


def _untie_before_merge(model: nn.Module, layers: list[tuple[str, LoraLayer]], adapter_names: list[str] | None = None) -> None:
    """Give every LoRA layer about to merge whose base weight is shared (tied) its own copy first.

    A tied weight (e.g. SmolLM2's input embedding is also its output head) would otherwise carry the
    merged update into the other module too, and the merged model would no longer compute what the
    unmerged one did. Where the base module itself is registered under another name too (one
    ``nn.Linear`` as ``a`` and ``b``, LoRA on ``a``), the layer gets its own module first, so the
    other name keeps the original weight. ``retie`` restores the sharing once nothing is merged.
    """
    untie_tied_for_merge(model, [(name, layer) for name, layer in layers if layer.merge_order(adapter_names)])


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = False) -> nn.Module:
    """Fold the active (or given) adapters into the base weights, keeping the LoRA layers (undo with ``unmerge``).

    A tied base weight is untied first (with a warning), so the merged model computes what the
    unmerged one did.
    """
    if adapter_names is not None:
        adapter_names = _as_names(adapter_names, "adapter_names")
        _check_names(model, adapter_names)
    require_state(model)
    layers = list(iter_lora_layers(model))  # (one walk over the modules for every step below)
    _refuse_changing_merges(layers, adapter_names)
    _warn_already_merged(layers, adapter_names)
    if safe:
        _check_merge_finite(layers, adapter_names)
    _untie_before_merge(model, layers, adapter_names)
    _remember_unmerged(layers)
    for _, layer in layers:
        layer.merge(adapter_names, safe=safe)
    return model


def _remember_unmerged(layers: list[tuple[str, LoraLayer]]) -> None:
    """``LoraLayer.remember_unmerged`` on every layer with nothing merged yet, before any merges
    (offloaded weights tied to each other are found tied only while none is merged)."""
    for _, layer in layers:
        if not layer.merged_adapters:
            layer.remember_unmerged()


def _refuse_changing_merges(layers: list[tuple[str, LoraLayer]], adapter_names: list[str] | None) -> None:
    """Before a model-level merge changes anything: every layer's ``merge_would_change`` (a variant
    merged out of order, a computed weight), so that a refusal leaves the whole model as it was."""
    for path, layer in layers:
        why = layer.merge_would_change(adapter_names)
        if why:
            raise ValueError(f"{path}: {why}; the model is unchanged")


def _warn_already_merged(layers: list[tuple[str, LoraLayer]], adapter_names: list[str] | None) -> None:
    """Warn about requested (or active) adapters that are merged already: merging one again does
    nothing (its update is in the weights once), which a caller expecting it twice should know."""
    already: dict[str, None] = {}
    for _, layer in layers:
        names = layer.active_adapters if adapter_names is None else adapter_names
        already.update((n, None) for n in names if n in layer.merged_adapters)
    if already:
        warnings.warn(f"adapter(s) {list(already)} are merged already; merging again leaves them as they are "
                      "(call unmerge first to merge anew)", stacklevel=3)


def _check_merge_finite(layers: list[tuple[str, LoraLayer]], adapter_names: list[str] | None) -> None:
    """``safe`` merging: every layer's merged weight is computed and checked before any is written,
    so that a non-finite one leaves the whole model as it was (not only its own layer)."""
    for path, layer in layers:
        pending, new = layer.merged_weight(adapter_names)
        if pending and not torch.isfinite(new).all():
            raise ValueError(f"merging adapter(s) {pending} into {path} gives non-finite weights; "
                             f"the model is unchanged")


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights.

    Raises:
        ValueError: a merged adapter's weights or scaling were changed after the merge (subtracting
            them would leave wrong base weights); the model is unchanged.
    """
    require_state(model)  # (a model without adapters was a silent no-op, while merge refused it)
    layers = list(iter_lora_layers(model))
    _refuse_changed_merges(layers)
    for _, layer in layers:
        layer.unmerge(check=False)  # (every layer checked above)
    retie(model)
    return model


def _strip(model: nn.Module, do_merge: bool, safe: bool = False) -> nn.Module:
    require_state(model)
    layers = list(iter_lora_layers(model))
    if do_merge:
        _refuse_changing_merges(layers, None)
    if do_merge and safe:
        _check_merge_finite(layers, None)
    if do_merge:
        _untie_before_merge(model, layers)
        _remember_unmerged(layers)
    else:
        _refuse_changed_merges(layers)
    for name, layer in layers:
        if do_merge:
            layer.merge(safe=safe, stamp=False)  # (the layer goes: nothing will unmerge it)
        elif layer.merged_adapters:
            layer.unmerge(check=False)  # (checked above)
    retie(model)  # (merge_and_unload too: a tie whose holders ended up with nothing merged)
    for name, layer in list(iter_lora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(iter_saved_modules(model)):
        _set_submodule(model, name, wrapper.current() if do_merge else wrapper.original_module)
    forget_model(model)  # (transformers' save_pretrained and adapter methods again)
    restore_fast_paths(model)
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters into the base weights and remove every LoRA module.

    Returns:
        The same model object, now an ordinary model whose weights are W + scaling · B @ A
        (and whose ``modules_to_save`` are the trained copies).
    """
    return _strip(model, do_merge=True, safe=safe)


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA module without merging: back to the base model.

    Exactly the base weights when nothing is merged; a merged adapter is first subtracted again
    (W + ΔW − ΔW), which restores W to rounding (a few ulps), as ``unmerge`` does.
    """
    return _strip(model, do_merge=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied parameters are counted once."""
    check_model(model)
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> dict[str, float]:
    """Print and return total / trainable parameters and the trainable percentage."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"Total parameters:     {total:,}")
    print(f"Trainable parameters: {trainable:,}")
    print(f"Trainable %:          {percent:.4f}%")
    return {"total": total, "trainable": trainable, "percent": percent}
