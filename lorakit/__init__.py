"""lorakit: LoRA fine-tuning for PyTorch models.

h = W·x + (alpha / r)·B·A·x, with W frozen, A (r, in) random and B (out, r) zero at the start.

The names below are imported on first use (PEP 562), so ``import lorakit`` does not import torch
and the ``lorakit`` command answers ``--help`` and a mistyped option at once; a command's own
torch import then runs under its Ctrl-C handling (a Ctrl-C there ends with "interrupted", not an
import traceback).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_attributes

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy attributes below resolve to, for type checkers and IDEs
    from lorakit.adapters import (active_adapters, count_parameters, delete_adapter, disable_adapters,
                                  merge, merge_and_unload, print_trainable_parameters, set_adapter,
                                  set_trainable, unload, unmerge)
    from lorakit.config import LoraConfig
    from lorakit.inject import find_target_modules, get_lora_model, iter_lora_layers
    from lorakit.io import adapter_state_dict, load_adapter, load_adapter_weights, save_adapter
    from lorakit.layers import LAYER_TYPES, LoraLayer, register_layer_type
    from lorakit.layers.nf4_linear import LinearNF4
    from lorakit.loraplus import create_loraplus_optimizer, loraplus_param_groups
    from lorakit.quant import nf4_memory, quantize_model_nf4
    from lorakit.multi import BASE_NAME, CombineReport, adapter_batch, combine_adapters, generate, hotswap_adapter
    from lorakit.lesson import apply_lora_to_model, load_lora_weights, merge_lora_weights, save_lora_weights
    from lorakit.ops import fuse_swiglu_mlps, unfuse_swiglu_mlps
    from lorakit.variants.dora import dora_caching

#: public name -> the module that defines it
_EXPORTS = {
    "active_adapters": "lorakit.adapters", "count_parameters": "lorakit.adapters",
    "delete_adapter": "lorakit.adapters", "disable_adapters": "lorakit.adapters", "merge": "lorakit.adapters",
    "merge_and_unload": "lorakit.adapters", "print_trainable_parameters": "lorakit.adapters",
    "set_adapter": "lorakit.adapters", "set_trainable": "lorakit.adapters", "unload": "lorakit.adapters",
    "unmerge": "lorakit.adapters",
    "LoraConfig": "lorakit.config",
    "find_target_modules": "lorakit.inject", "get_lora_model": "lorakit.inject", "iter_lora_layers": "lorakit.inject",
    "adapter_state_dict": "lorakit.io", "load_adapter": "lorakit.io", "load_adapter_weights": "lorakit.io",
    "save_adapter": "lorakit.io",
    "LAYER_TYPES": "lorakit.layers", "LoraLayer": "lorakit.layers", "register_layer_type": "lorakit.layers",
    "LinearNF4": "lorakit.layers.nf4_linear",
    "create_loraplus_optimizer": "lorakit.loraplus", "loraplus_param_groups": "lorakit.loraplus",
    "nf4_memory": "lorakit.quant", "quantize_model_nf4": "lorakit.quant",
    "BASE_NAME": "lorakit.multi", "CombineReport": "lorakit.multi", "adapter_batch": "lorakit.multi",
    "combine_adapters": "lorakit.multi", "generate": "lorakit.multi", "hotswap_adapter": "lorakit.multi",
    "apply_lora_to_model": "lorakit.lesson", "load_lora_weights": "lorakit.lesson",
    "merge_lora_weights": "lorakit.lesson", "save_lora_weights": "lorakit.lesson",
    "fuse_swiglu_mlps": "lorakit.ops", "unfuse_swiglu_mlps": "lorakit.ops",
    "dora_caching": "lorakit.variants.dora",
}


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)


__all__ = [
    "fuse_swiglu_mlps",
    "unfuse_swiglu_mlps",
    "LinearNF4",
    "create_loraplus_optimizer",
    "loraplus_param_groups",
    "nf4_memory",
    "quantize_model_nf4",
    "BASE_NAME",
    "CombineReport",
    "adapter_batch",
    "combine_adapters",
    "generate",
    "hotswap_adapter",
    "LAYER_TYPES",
    "LoraConfig",
    "LoraLayer",
    "__version__",
    "active_adapters",
    "adapter_state_dict",
    "apply_lora_to_model",
    "count_parameters",
    "delete_adapter",
    "dora_caching",
    "disable_adapters",
    "find_target_modules",
    "get_lora_model",
    "iter_lora_layers",
    "load_adapter",
    "load_adapter_weights",
    "load_lora_weights",
    "merge",
    "merge_and_unload",
    "merge_lora_weights",
    "print_trainable_parameters",
    "register_layer_type",
    "save_adapter",
    "save_lora_weights",
    "set_adapter",
    "set_trainable",
    "unload",
    "unmerge",
]
