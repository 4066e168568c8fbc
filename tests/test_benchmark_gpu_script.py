"""benchmarks/gpu.py runs only where CUDA is present, which CI is not: its code paths run here on a
tiny model on the CPU, so the script cannot rot between the sessions that have a GPU."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # noqa: E402

CPU = torch.device("cpu")


def test_shapes_are_parsed_and_bad_ones_named():
    assert gpu.parse_shapes("4x256, 8X1024") == [(4, 256), (8, 1024)]
    for bad in ("", "4x", "4x0", "four", "4x2x1"):
        with pytest.raises(Exception, match="rows x tokens"):
            gpu.parse_shapes(bad)


def test_training_rows_lora_vs_full_and_inference_rows_on_a_tiny_model():
    base = tiny_llama()
    row = gpu.train_rows(base, CPU, torch.float32, steps=2, shape=(2, 8))
    assert len(row["time"]) == 2 and all(t > 0 for t in row["time"])
    assert 0 < row["saved"] < 1  # lorakit keeps fewer bytes for backward than PEFT, here too
    assert math.isnan(row["peak"]) and math.isnan(row["kernels"])  # device memory / kernels: CUDA only
    ratios, floor = gpu.lora_vs_full(base, CPU, steps=2, shape=(2, 8))
    assert len(ratios) == 2 and 2 / 3 < floor < 2
    rows = gpu.inference_rows(base, CPU, torch.float32, rounds=2, shapes=[(2, 4), (3, 1)])
    assert set(rows) == {"2 x 4", "3 x 1"}
    for r in rows.values():
        assert set(r) == {"lorakit", "lorakit merged", "peft"} and all(len(v) == 2 for v in r.values())
