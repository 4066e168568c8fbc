"""The low-rank lab: decomposition demo, rank recommender, memory estimator, adapter surgery.

Everything here reads and writes PEFT-format files directly, so it works on adapters made by
lorakit or by PEFT, and on any local safetensors model directory.
"""
from __future__ import annotations

from lorakit.analysis.adapter_tools import (
    check_against_base,
    extract_adapter,
    inspect_adapter,
    read_adapter,
    resize_adapter,
)
from lorakit.analysis.estimate import PRESETS, MemoryEstimate, ModelShape, compare_methods, estimate_memory
from lorakit.analysis.lowrank import parameter_table, reconstruction_errors, spectrum_report, synthetic_low_rank
from lorakit.analysis.measure import measure_config, measure_step_peak
from lorakit.analysis.recommend import data_driven_ranks, model_cost, recommend_rank

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
