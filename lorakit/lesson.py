"""The functions of the LoRA lesson lorakit grew from, as thin aliases over the library.

They keep the lesson's names and argument names so its code runs unchanged::

    model = apply_lora_to_model(model, target_modules=["q_proj", "v_proj"], rank=8, alpha=16.0)
    save_lora_weights(model, "adapter/")
    load_lora_weights(other_model_with_lora, "adapter/")
    merged = merge_lora_weights(model)
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.adapters import merge_and_unload
from lorakit.config import LoraConfig
from lorakit.inject import get_lora_model, get_state
from lorakit.io import load_adapter, save_adapter
from lorakit.multi import hotswap_adapter


def apply_lora_to_model(model: nn.Module, target_modules: list[str] | str = ("q_proj", "v_proj"),
                        rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Add a trainable LoRA adapter (rank ``rank``, scaling ``alpha / rank``) and freeze the rest.

    Same as ``get_lora_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
    target_modules=target_modules))``; returns the same model object.
    """
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    return get_lora_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Fold the LoRA update into the base weights and remove the LoRA modules (``merge_and_unload``)."""
    return merge_and_unload(model)


def save_lora_weights(model: nn.Module, path: str | Path) -> Path:
    """Save the adapter to the directory ``path`` in PEFT format (``save_adapter``)."""
    return save_adapter(model, path)


def load_lora_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapter weights from ``path``.

    If ``model`` already carries a ``"default"`` adapter (made by ``apply_lora_to_model``), its weights
    and its alpha (so its scaling) are replaced in place by the saved ones, after a check that targets
    and ranks agree (``hotswap_adapter``; copying the weights alone kept the model's own alpha, and a
    model applied with another alpha then computed something else than the saved one); otherwise the
    adapter is injected from the saved config first (``load_adapter``).
    """
    state = get_state(model)
    if state is not None and "default" in state.configs:
        return hotswap_adapter(model, path, "default")
    return load_adapter(model, path)
