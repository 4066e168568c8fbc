"""Helpers shared by the benchmark scripts: machine description, peak-RSS reset, timing, tables."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
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


def smollm_config(layers: int = 30):
    """A ``LlamaConfig`` with the embedded SmolLM2-135M-Instruct's shapes (``layers`` of its 30)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_base(layers: int = 30, seed: int = 0):
    """A randomly initialised Llama of the embedded model's shapes, in eval mode (fp32)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(smollm_config(layers)).eval()


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


def run_worker(script: Path, args: list[str], timeout: float = 900, extra: list[str] | None = None,
               env: dict[str, str] | None = None) -> dict:
    """Run ``script --worker args`` (or ``script *extra`` when given) in a fresh interpreter, with
    ``env`` added to its environment; return the JSON it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", **(env or {}))
    argv = extra if extra is not None else ["--worker", *args]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {script.name} {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio_stats(values: list[float], quartiles: bool = False) -> str:
    """'median (min–max)' of a list of ratios; with ``quartiles``, 'median (IQR q1–q3)' instead
    (for many short rounds, where min and max only show the rarest bursts of machine noise)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    if quartiles and len(values) >= 8:
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"{statistics.median(values):.3f} (IQR {q1:.3f}–{q3:.3f})"
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

    def live_masks() -> list:
        if "lorakit.layers.fused" not in sys.modules:
            return []
        keep_mask = sys.modules["lorakit.layers.fused"].KeepMask
        with warnings.catch_warnings():  # isinstance on some deprecated module objects warns
            warnings.simplefilter("ignore")
            return [obj for obj in gc.get_objects() if isinstance(obj, keep_mask)]

    gc.collect()  # (masks of dead graphs, or of another model in this process, are not this forward's)
    before = {id(obj) for obj in live_masks()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    masks = sum(sum(t.untyped_storage().nbytes() for t in obj._packed) for obj in live_masks()
                if id(obj) not in before and obj._packed is not None)
    return loss, sum(v for k, v in seen.items() if k not in weights) + masks
