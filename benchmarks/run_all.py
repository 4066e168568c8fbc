"""`make bench`: run the benchmark suite and write docs/benchmarks.md.

Every benchmark prints a markdown section (machine, command, ratio table); this script runs them one
after another (never in parallel: they would disturb each other's timings), and writes the sections
into docs/benchmarks.md. A benchmark that fails is reported in the file with its error, not hidden.

    python benchmarks/run_all.py [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (title, script, arguments, arguments with --quick)
SUITE = [
    ("Training step: lorakit vs PEFT, LoRA vs full fine-tuning (issue 7: 1, 3)", "train_step.py",
     ["--repeats", "2", "--steps", "1", "--pairs", "3"], ["--repeats", "1", "--steps", "1", "--pairs", "2"]),
    ("Time to the same quality: `lorakit train` vs the transformers + PEFT recipe (issue 7: 2)", "time_to_quality.py",
     ["--steps", "18", "--eval-every", "6", "--eval-samples", "128", "--seeds", "2"], ["--quick"]),
    ("Inference: unmerged / merged vs base, 2 threads (wall clock) and 1 thread (CPU time) (issue 7: 4)",
     "inference.py", ["--rounds", "3", "--one-thread-rounds", "2"], ["--rounds", "1", "--one-thread-rounds", "1"]),
    ("Attention kernels at fine-tuning lengths (used by `lorakit train` in bf16)", "attention.py", ["--rounds", "3"],
     ["--quick"]),
    ("Mixed-adapter batches (issue 4)", "multi_adapter.py", ["--rounds", "3", "--decode-rounds", "9"], ["--quick"]),
    ("GPU rows: training step, LoRA vs full, inference on CUDA, fp32 and bf16 (issue 7)", "gpu.py",
     ["--steps", "6", "--rounds", "7"], ["--quick"]),
]


def gpu_note() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"CUDA device present: {torch.cuda.get_device_name(0)}."
    except ImportError:
        pass
    return "No CUDA GPU on this machine: GPU rows are skipped (measured on an H200: docs/benchmarks_gpu.md)."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for the docs)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds for the whole suite (default 900: the issue's 15 minutes); a benchmark still "
                         "running when it is spent is stopped and reported as such, the rest are not run")
    args = ap.parse_args()
    parts = [f"# Benchmarks\n\nWritten by `make bench` (`python benchmarks/run_all.py`) on "
             f"{datetime.date.today().isoformat()}. Each table says what its ratios are: medians of per-round "
             f"ratios (rounds interleaved in one process, or repeats in fresh processes) with (min–max) or, where "
             f"it says IQR, the interquartile range; a ratio without a spread is a single measurement. Absolute "
             f"times on this shared machine are noisy and given for scale only. {gpu_note()}\n"]
    failed = 0
    suite_start = time.perf_counter()
    for title, script, full_args, quick_args in SUITE:
        path = ROOT / "benchmarks" / script
        if not path.exists():
            parts.append(f"## {title}\n\n(not run: {script} is missing)\n")
            continue
        left = args.budget - (time.perf_counter() - suite_start)
        if left <= 0:
            failed += 1
            parts.append(f"## {title}\n\n(not run: the suite's {args.budget:.0f} s budget was spent)\n")
            continue
        cmd = [sys.executable, str(path), *(quick_args if args.quick else full_args)]
        print(f"== {title}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=left)
        except subprocess.TimeoutExpired:
            failed += 1
            parts.append(f"## {title}\n\nSTOPPED after {left:.0f} s: the suite's {args.budget:.0f} s budget was "
                         f"spent\n")
            continue
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            failed += 1
            parts.append(f"## {title}\n\nFAILED after {elapsed:.0f} s:\n\n```\n{proc.stderr[-2000:]}\n```\n")
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        print(proc.stdout, flush=True)
        parts.append(f"## {title}\n\n{proc.stdout.strip()}\n\n(ran in {elapsed:.0f} s)\n")
    total = time.perf_counter() - suite_start
    over = "" if total <= 900 else " (over the issue's 15 minutes: see the machine's speed in the sections' times)"
    parts.append(f"The suite ran in {total:.0f} s, budget {args.budget:.0f} s{over}.\n")
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
