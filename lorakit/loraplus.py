"""LoRA+: a larger learning rate for B than for A (Hayou, Ghosh & Yu 2024, "LoRA+", §3-4).

With the same learning rate for A and B, feature learning is inefficient at large width; the paper
sets η_B = λ · η_A with λ ≫ 1 (λ = 2^4 = 16 is its default recommendation, §4). This is purely an
optimizer setting — the adapter and its saved format are plain LoRA — so it is a function that
builds parameter groups, usable with any ``torch.optim`` optimizer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.inject import iter_lora_layers


def without_weight_decay(model: nn.Module) -> set[int]:
    """``id``s of the trainable parameters weight decay should leave alone: tensors of at most one
    dimension (biases, norm weights) and every variant's per-channel tensors whatever their shape
    (DoRA's magnitudes: (out,) for Linear, (1, out, 1, 1) for Conv2d). Decay would pull them
    towards zero, and a magnitude at zero zeroes its layer's output."""
    from lorakit.variants import VARIANTS

    stores = {attr for variant in VARIANTS.values() for attr in variant.saved_stores}
    ids = {id(p) for p in model.parameters() if p.requires_grad and p.dim() <= 1}
    for _, layer in iter_lora_layers(model):
        for attr in stores:
            store = getattr(layer, attr, None)
            if isinstance(store, nn.ParameterDict):
                ids.update(id(p) for p in store.values() if p.requires_grad)
    return ids


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                          lr_embedding: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: η_A = lr, η_B = ratio · lr.

    Only parameters with ``requires_grad`` are included. Groups (empty ones are left out), each with
    a ``"name"`` key for logging:

    - ``"lora_A"``: every trainable A, learning rate ``lr``, ``weight_decay``;
    - ``"lora_B"``: every trainable B, learning rate ``ratio · lr``, ``weight_decay``;
    - ``"lora_embedding"``: A and B of Embedding layers when ``lr_embedding`` is given (PEFT's
      ``loraplus_lr_embedding``); otherwise they follow the A/B rule above;
    - ``"other"``: anything else trainable with two or more dimensions (``modules_to_save``
      matrices), learning rate ``lr``, ``weight_decay``;
    - ``"other_no_decay"``: anything else trainable with at most one dimension (biases) and DoRA's
      magnitudes of any shape (``without_weight_decay``), learning rate ``lr``, no weight decay.

    Args:
        model: A model with trainable LoRA adapters (``get_lora_model``).
        lr: Learning rate of A (and of the other parameters), > 0.
        ratio: λ = η_B / η_A, > 0 (16 in the paper; 1 is plain LoRA).
        weight_decay: Weight decay of A and B (and of matrices among the other parameters).
        lr_embedding: Optional separate learning rate for embedding adapters.

    Returns:
        A list of parameter-group dicts for ``torch.optim.Optimizer``.

    Raises:
        ValueError: ``lr``, ``ratio`` or ``lr_embedding`` is not positive, ``weight_decay`` not a
            finite number >= 0, or nothing is trainable.
    """
    from lorakit.layers.embedding import LoraEmbedding

    for name, value in (("lr", lr), ("ratio", ratio)) + ((("lr_embedding", lr_embedding),) if lr_embedding is not None else ()):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"loraplus_param_groups: {name} must be a positive finite number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < float("inf"):
        raise ValueError(f"loraplus_param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    a_params: list[nn.Parameter] = []
    b_params: list[nn.Parameter] = []
    emb_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, layer in iter_lora_layers(model):
        for store, bucket in ((layer.lora_A, a_params), (layer.lora_B, b_params)):
            for p in store.values():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    (emb_params if lr_embedding is not None and isinstance(layer, LoraEmbedding) else bucket).append(p)
    other_decay, other_no_decay = [], []
    no_decay = without_weight_decay(model)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (other_no_decay if id(p) in no_decay else other_decay).append(p)
    groups = [
        {"name": "lora_A", "params": a_params, "lr": lr, "weight_decay": weight_decay},
        {"name": "lora_B", "params": b_params, "lr": lr * ratio, "weight_decay": weight_decay},
        {"name": "lora_embedding", "params": emb_params, "lr": lr_embedding, "weight_decay": weight_decay},
        {"name": "other", "params": other_decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "other_no_decay", "params": other_no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("loraplus_param_groups: the model has no trainable parameters (use get_lora_model first)")
    return groups


def create_loraplus_optimizer(model: nn.Module, lr: float, ratio: float | None = None, weight_decay: float | None = None,
                              optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              lr_embedding: float | None = None, **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer (AdamW by default) over ``loraplus_param_groups(model, lr, ratio, weight_decay)``.

    Args:
        model: A model with trainable LoRA adapters.
        lr: Learning rate of A; B gets ``ratio · lr``.
        ratio: λ = η_B / η_A (default 16, as in the paper).
        weight_decay: Weight decay of A and B (default 0).
        optimizer_cls: Any ``torch.optim.Optimizer`` class.
        lr_embedding: Optional learning rate of embedding adapters.
        **optimizer_kwargs: Passed to ``optimizer_cls`` (e.g. ``betas``, ``eps``); PEFT's names
            ``loraplus_lr_ratio``, ``loraplus_lr_embedding`` and ``loraplus_weight_decay`` are taken
            as ``ratio``, ``lr_embedding`` and ``weight_decay`` (PEFT gives embedding adapters 1e-6
            unless told otherwise; lorakit gives them the A / B rule unless ``lr_embedding`` is set).

    Returns:
        The optimizer.
    """
    ours = {"ratio": ratio, "lr_embedding": lr_embedding, "weight_decay": weight_decay}
    for peft_name, name in (("loraplus_lr_ratio", "ratio"), ("loraplus_lr_embedding", "lr_embedding"),
                            ("loraplus_weight_decay", "weight_decay")):
        if peft_name in optimizer_kwargs:  # (passed on, they reached the optimizer class, which knows neither)
            given = optimizer_kwargs.pop(peft_name)
            if ours[name] is not None and ours[name] != given:
                raise TypeError(f"create_loraplus_optimizer: {peft_name} (PEFT's name for {name}) and {name} both "
                                f"given, {given!r} and {ours[name]!r}: give one")
            ours[name] = given
    ours["ratio"] = 16.0 if ours["ratio"] is None else ours["ratio"]
    ours["weight_decay"] = 0.0 if ours["weight_decay"] is None else ours["weight_decay"]
    groups = loraplus_param_groups(model, lr, ratio=ours["ratio"], weight_decay=ours["weight_decay"],
                                   lr_embedding=ours["lr_embedding"])
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
