"""Helpers shared by the benchmark scripts: machine description, peak-RSS reset, timing, tables."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming the CPU, cores and library versions."""
    import torch
    import transformers

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "absent"
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft_v}, {torch.get_num_threads()} torch threads")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) since the last reset, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def timed(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` (seconds)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run_worker(script: Path, args: list[str], timeout: float = 900, extra: list[str] | None = None) -> dict:
    """Run ``script --worker args`` (or ``script *extra`` when given) in a fresh interpreter; return
    the JSON it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    argv = extra if extra is not None else ["--worker", *args]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {script.name} {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio_stats(values: list[float]) -> str:
    """'median (min–max)' of a list of ratios."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def saved_for_backward(model, loss_fn) -> tuple[object, int]:
    """Run ``loss_fn()`` under ``saved_tensors_hooks``: (its loss, the bytes autograd keeps for backward),
    counting each storage once and leaving out the model's parameters. lorakit's dropout masks, which
    its nodes keep as bits outside autograd's saved tensors (``KeepMask``), are counted too."""
    import gc

    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    masks = 0
    if "lorakit.layers.fused" in sys.modules:
        keep_mask = sys.modules["lorakit.layers.fused"].KeepMask
        for obj in gc.get_objects():
            if isinstance(obj, keep_mask) and obj._packed is not None:
                masks += sum(t.untyped_storage().nbytes() for t in obj._packed)
    return loss, sum(v for k, v in seen.items() if k not in weights) + masks
