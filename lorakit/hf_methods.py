"""What a transformers model's own adapter methods do once lorakit has injected into it.

lorakit changes the model in place, so the object keeps transformers' methods. Two of them went
wrong on it: ``save_pretrained`` (which ``transformers.Trainer`` calls for its checkpoints and
``save_model``) wrote the whole model under lorakit's in-memory names, a file that
``from_pretrained`` then loaded with every adapted weight missing and freshly initialised; and the
PEFT-integration methods (``set_adapter``, ``load_adapter``, ...) worked on transformers' own PEFT
adapters, failing with advice about PEFT versions, or adding PEFT layers beside lorakit's.

So an injected ``PreTrainedModel`` gets, as attributes of its own (removed again by ``unload``,
``merge_and_unload`` and the deletion of its last adapter):

- ``save_pretrained``: writes the adapters in PEFT's format and layout, as
  ``PeftModel.save_pretrained`` does (adapter ``default`` in the directory, any other in a
  subdirectory of its name), plus the trainable tensors that ``transformers.Trainer`` reads back
  when it resumes or loads its best checkpoint;
- ``set_adapter``, ``delete_adapter``, ``active_adapters``: lorakit's own;
- the other PEFT-integration methods: an error naming the lorakit function to use.

Only methods the model's class takes from transformers unchanged are replaced (a model with a
``load_adapter`` of its own, e.g. wav2vec2's language adapters, keeps it), and a model that also
holds transformers' own PEFT adapters keeps the methods that manage them (only ``save_pretrained``
is lorakit's there).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from torch import nn

#: PEFT-integration method -> what to use instead (the methods lorakit answers itself are in _OWN)
_INSTEAD = {
    "load_adapter": "lorakit.load_adapter(model, directory, adapter_name=..., is_trainable=...)",
    "add_adapter": "lorakit.get_lora_model(model, lorakit.LoraConfig(...), adapter_name=...)",
    "enable_adapters": "nothing: lorakit's adapters are on except inside `with lorakit.disable_adapters(model): ...`",
    "disable_adapters": "`with lorakit.disable_adapters(model): ...`",
    "get_adapter_state_dict": "lorakit.adapter_state_dict(model, adapter_name)",
    "enable_peft_hotswap": "lorakit.hotswap_adapter(model, directory, adapter_name)",
}


#: what transformers.Trainer reads back into the model when it resumes or loads its best checkpoint
TRAINER_WEIGHTS = "model.safetensors"


def _save_pretrained(model: nn.Module, save_directory: str | Path, is_main_process: bool = True,
                     state_dict: dict | None = None, selected_adapters: list[str] | None = None,
                     safe_serialization: bool = True, **kwargs: Any) -> None:
    """Write this model's LoRA adapters to ``save_directory`` in PEFT's format, as
    ``PeftModel.save_pretrained`` does: adapter ``default`` in the directory itself, every other in a
    subdirectory named after it (``selected_adapters``: only those). No base weights are written
    (save a plain model with ``lorakit.merge_and_unload(model).save_pretrained(...)``), and no
    ``config.json``, so ``from_pretrained`` never takes the directory for a whole model.

    Beside them, ``model.safetensors`` holds the model's trainable tensors under their in-memory
    names: what ``transformers.Trainer`` loads back into the model (``load_state_dict(...,
    strict=False)``) when it resumes from a checkpoint or loads the best one at the end.
    ``state_dict`` (which Trainer passes for a wrapped model, e.g. ``torch.compile``'s) gives those
    tensors' names as Trainer will load them back; the adapters' are read from the model. A
    ``model.safetensors`` that lorakit did not write (a model's own weights) is never overwritten: the
    save is refused. ``is_main_process=False`` writes nothing (a later process of a distributed run)."""

    from lorakit.inject import get_state
    from lorakit.io import atomic_save_tensors, save_adapter

    refused = {"push_to_hub": "lorakit writes a directory; upload it yourself (huggingface_hub.upload_folder)",
               "path_initial_model_for_weight_conversion": "save a PiSSA / OLoRA adapter converted with "
               "lorakit.save_adapter(model, directory, adapter_name, convert_to_lora=True)",
               "save_embedding_layers": "lorakit saves no embedding layers beside the adapters"}
    for name, why in refused.items():
        if kwargs.pop(name, None) not in (None, False, "auto"):
            raise TypeError(f"save_pretrained of a model with lorakit adapters: {name} is not supported: {why}")
    # (transformers' own keywords that change nothing here, given at their defaults or not)
    harmless = ("max_shard_size", "save_peft_format", "save_original_format", "token")
    unknown = sorted(k for k, v in kwargs.items() if k not in harmless and v)
    if not safe_serialization or unknown:
        given = (["safe_serialization=False"] if not safe_serialization else []) + unknown
        raise TypeError(f"save_pretrained of a model with lorakit adapters writes them in PEFT's format "
                        f"(safetensors) and takes no {', '.join(given)}; to write a plain model, merge first: "
                        "lorakit.merge_and_unload(model).save_pretrained(...)")
    state = get_state(model)
    configs = state.configs if state is not None else {}
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    missing = [n for n in names if n not in configs]
    if missing or not names:
        raise ValueError(f"selected_adapters: {missing or names!r} - this model's adapters are {list(configs)}")
    for name in names:
        if "/" in name or "\\" in name:
            raise ValueError(f"adapter {name!r} would be saved in a subdirectory named after it, and a name with a "
                             "path separator would leave the directory: save it with lorakit.save_adapter(model, "
                             "directory, adapter_name)")
    if not is_main_process:
        return
    root = Path(save_directory)
    ours = _trainer_weights_are_ours(root / TRAINER_WEIGHTS)
    if ours is False:  # (e.g. the base model's own directory: its weights must not be overwritten)
        raise FileExistsError(f"{root / TRAINER_WEIGHTS} exists and was not written by lorakit (a model's weights?); "
                              "save the adapters to another directory, or with lorakit.save_adapter(model, "
                              "directory, adapter_name), which writes only the adapter's files")
    for name in names:
        save_adapter(model, root if name == "default" else root / name, adapter_name=name)
    trainable = {}
    if selected_adapters is None:  # (what Trainer saves: every trainable tensor; a selection is for the adapters)
        trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if state_dict is not None:  # Trainer's, for a wrapped model (torch.compile): its keys are what it loads back
            trainable = {k: v for k, v in state_dict.items()
                         if k in trainable or _unwrapped(k) in trainable}  # (a submodule of its own named 'module' stays)
        trainable = {k: v.detach().contiguous() for k, v in trainable.items()}
    if trainable:
        atomic_save_tensors(root / TRAINER_WEIGHTS, trainable, _TRAINER_METADATA)
    elif ours:  # (a stale one of an earlier save would be loaded back)
        (root / TRAINER_WEIGHTS).unlink()


_TRAINER_METADATA = {"format": "pt", "lorakit": "trainable tensors for transformers.Trainer"}


def _trainer_weights_are_ours(path: Path) -> bool | None:
    """None where ``path`` does not exist, else whether lorakit's ``save_pretrained`` wrote it."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("lorakit") == _TRAINER_METADATA["lorakit"]
    except Exception:  # (not a safetensors file lorakit can read: not ours either)
        return False


def _unwrapped(key: str) -> str:
    """A state_dict key of a wrapped model (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``)
    as the model's own parameter name."""
    while key.startswith(("_orig_mod.", "module.")):
        key = key.split(".", 1)[1]
    return key


def _set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """``lorakit.set_adapter(model, adapter_name)``: make these adapters the active ones."""
    from lorakit.adapters import set_adapter

    set_adapter(model, adapter_name)


def _delete_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """``lorakit.delete_adapter(model, name)`` for each name given (all checked first)."""
    from lorakit.adapters import _check_names, delete_adapter

    names = list(dict.fromkeys([adapter_names] if isinstance(adapter_names, str) else adapter_names))  # (a repeat: once)
    _check_names(model, names)  # (an unknown name after the first deleted it, and the error named neither)
    for name in names:
        delete_adapter(model, name)


def _active_adapters(model: nn.Module) -> list[str]:
    """``lorakit.active_adapters(model)``: the names of the active adapters."""
    from lorakit.adapters import active_adapters

    return active_adapters(model)


def _refuse(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(f"model.{method} is transformers' method for PEFT adapters, and this model's adapters are "
                    f"lorakit's: use {_INSTEAD[method]}")


_OWN = {"save_pretrained": _save_pretrained, "set_adapter": _set_adapter, "delete_adapter": _delete_adapter,
        "active_adapters": _active_adapters}


def _replaceable(model: nn.Module) -> list[str]:
    """The method names to give ``model`` an attribute of its own for: those its class takes
    unchanged from transformers' ``PreTrainedModel`` / ``PeftAdapterMixin`` (none for a model
    that is not a transformers model)."""
    modeling = sys.modules.get("transformers.modeling_utils")  # (a transformers model imported it)
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return []
    cls = type(model)
    names = [n for n in ("set_adapter", "delete_adapter", "active_adapters", *_INSTEAD)
             if getattr(cls, n, None) is getattr(modeling.PeftAdapterMixin, n, object())]
    if getattr(model, "_hf_peft_config_loaded", False):
        names = []  # (the model holds transformers' own PEFT adapters too: those methods manage them)
    if getattr(cls, "save_pretrained", None) is modeling.PreTrainedModel.save_pretrained:
        names.append("save_pretrained")
    return names


def _quiet_frozen_keys(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook on the model: a load of exactly its trainable tensors (what
    ``transformers.Trainer`` loads back from lorakit's checkpoint on resuming, and from the best one
    at the end) reports no missing keys: the frozen weights are not missing from an adapter's
    checkpoint. Before, Trainer logged every frozen weight as "missing keys in the checkpoint model
    loaded" (272 names on the embedded model). A load lacking anything else, or with unexpected keys,
    reports its keys as torch does. (Strict or not: torch does not tell hooks which, so a strict load
    of exactly the trainable tensors passes too.)"""
    if incompatible.unexpected_keys or not incompatible.missing_keys:
        return
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    # (nothing trainable: a load of nothing would match, and must report every key missing)
    if trainable and set(incompatible.missing_keys) == set(module.state_dict(keep_vars=True)) - trainable:
        incompatible.missing_keys.clear()


def _load_hook(model: nn.Module) -> int | None:
    """The key of ``_quiet_frozen_keys`` among ``model``'s load_state_dict post-hooks, or None."""
    return next((k for k, h in model._load_state_dict_post_hooks.items() if h is _quiet_frozen_keys), None)


def install(model: nn.Module) -> None:
    """Give an injected transformers model the methods above (see the module docstring), and the
    load hook that keeps Trainer from reporting the frozen weights missing (``_quiet_frozen_keys``)."""
    if _replaceable(model) and _load_hook(model) is None:
        model.register_load_state_dict_post_hook(_quiet_frozen_keys)
    for name in _replaceable(model):
        if name in model.__dict__:
            continue
        impl = _OWN.get(name)
        if impl is not None:
            method = functools.partial(impl, model)
            method.__doc__ = impl.__doc__
        else:
            method = functools.partial(_refuse, model, name)
            method.__doc__ = f"Refused on a model with lorakit adapters: use {_INSTEAD[name]}."
        model.__dict__[name] = method


def remove(model: nn.Module) -> None:
    """Undo ``install``: the model's class methods again, and no load hook."""
    key = _load_hook(model)
    if key is not None:
        del model._load_state_dict_post_hooks[key]
    for name in (*_OWN, *_INSTEAD):
        value = model.__dict__.get(name)
        if isinstance(value, functools.partial) and value.func in (*_OWN.values(), _refuse):
            del model.__dict__[name]
