"""lorakit: LoRA fine-tuning for PyTorch models.

h = W·x + (alpha / r)·B·A·x, with W frozen, A (r, in) random and B (out, r) zero at the start.
"""
from __future__ import annotations

__version__ = "0.1.0"

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
