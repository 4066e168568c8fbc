"""benchmarks/distributed.py times the gradient exchange of LoRA and of full fine-tuning."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from distributed import gradient_shapes  # noqa: E402


def test_gradient_shapes_are_the_demo_adapter_and_the_whole_model():
    shapes = gradient_shapes(rank=8, layers=30)
    assert sum(a * b for a, b in shapes["LoRA"]) == 2_442_240 and len(shapes["LoRA"]) == 420  # the demo's adapter
    assert sum(math.prod(s) for s in shapes["full fine-tuning"]) == 134_515_008  # tied head once


def test_exchange_benchmark_prints_both_rows():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--layers", "1",
                           "--rounds", "1", "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\| (LoRA|full fine-tuning) \| ([\d,]+) in (\d+) tensors \| ([\d.]+) ", proc.stdout, re.M)
    # one decoder layer: 7 linear layers, A (4, in) and B (out, 4) each
    assert rows[0][:3] == ("LoRA", "40,704", "14")
    assert rows[1][0] == "full fine-tuning" and float(rows[1][3]) > 0
    assert "--processes 2" in proc.stdout
