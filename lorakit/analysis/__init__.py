"""The low-rank lab: decomposition demo, rank recommender, memory estimator, adapter surgery.

Everything here reads and writes PEFT-format files directly, so it works on adapters made by
lorakit or by PEFT, and on any local safetensors model directory.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_attributes

if TYPE_CHECKING:  # what the lazy attributes below resolve to, for type checkers and IDEs
    from lorakit.analysis.adapter_tools import (check_against_base, extract_adapter, inspect_adapter, read_adapter,
                                                resize_adapter)
    from lorakit.analysis.estimate import PRESETS, MemoryEstimate, ModelShape, compare_methods, estimate_memory
    from lorakit.analysis.lowrank import parameter_table, reconstruction_errors, spectrum_report, synthetic_low_rank
    from lorakit.analysis.measure import measure_config, measure_step_peak
    from lorakit.analysis.recommend import data_driven_ranks, model_cost, recommend_rank

# public name -> the module that defines it: imported on first use (PEP 562), as in ``lorakit``, so that
# the command line's parser (which reads lorakit.analysis.names) does not import torch
_EXPORTS = {
    **dict.fromkeys(("check_against_base", "extract_adapter", "inspect_adapter", "read_adapter", "resize_adapter"),
                    "lorakit.analysis.adapter_tools"),
    **dict.fromkeys(("PRESETS", "MemoryEstimate", "ModelShape", "compare_methods", "estimate_memory"),
                    "lorakit.analysis.estimate"),
    **dict.fromkeys(("parameter_table", "reconstruction_errors", "spectrum_report", "synthetic_low_rank"),
                    "lorakit.analysis.lowrank"),
    **dict.fromkeys(("measure_config", "measure_step_peak"), "lorakit.analysis.measure"),
    **dict.fromkeys(("data_driven_ranks", "model_cost", "recommend_rank"), "lorakit.analysis.recommend"),
}


__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)


__all__ = [
    "MemoryEstimate",
    "ModelShape",
    "PRESETS",
    "check_against_base",
    "compare_methods",
    "data_driven_ranks",
    "estimate_memory",
    "extract_adapter",
    "inspect_adapter",
    "measure_config",
    "measure_step_peak",
    "model_cost",
    "parameter_table",
    "read_adapter",
    "reconstruction_errors",
    "recommend_rank",
    "resize_adapter",
    "spectrum_report",
    "synthetic_low_rank",
]
