"""`make bench`: run the benchmark suite and write docs/benchmarks.md.

Every benchmark prints a markdown section (machine, command, ratio table); this script runs them one
after another (never in parallel: they would disturb each other's timings), and writes the sections
into docs/benchmarks.md. A benchmark that fails is reported in the file with its error, not hidden.

Two plans of repeats: ``full`` and ``lean`` (fewer rounds and repeats, one time-to-quality seed:
every ratio still with a spread, but wider). The suite must finish within its budget (15 minutes by
default) on CPUs that differ twofold in speed, so ``--plan auto`` (the default) first times the
embedded model's forward in a fresh process (~8 s) and runs ``full`` where its projected time fits
85% of the budget, ``lean`` otherwise; the file says which ran and why.

    python benchmarks/run_all.py [--plan auto|full|lean] [--budget SECONDS] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (title, script, {plan: arguments}); "quick" is --quick's smoke run
SUITE = [
    ("Training step: lorakit vs PEFT, LoRA vs full fine-tuning (issue 7: 1, 3)", "train_step.py",
     {"full": ["--repeats", "2", "--steps", "1", "--pairs", "3", "--full-rounds", "3"],
      "lean": ["--repeats", "1", "--steps", "1", "--pairs", "2", "--full-rounds", "3", "--no-plain-lora",
               "--no-peer-memory"],
      "quick": ["--repeats", "1", "--steps", "1", "--pairs", "2"]}),
    ("Time to the same quality: `lorakit train` vs the transformers + PEFT recipe (issue 7: 2)", "time_to_quality.py",
     {"full": ["--steps", "18", "--eval-every", "6", "--eval-samples", "128", "--seeds", "2"],
      "lean": ["--steps", "18", "--eval-every", "6", "--eval-samples", "128", "--seeds", "1"], "quick": ["--quick"]}),
    ("Inference: unmerged / merged vs base, 2 threads (wall clock) and 1 thread (CPU time) (issue 7: 4)",
     "inference.py", {"full": ["--rounds", "3", "--one-thread-rounds", "2"], "lean": ["--rounds", "2", "--one-thread-rounds", "1"],
                      "quick": ["--rounds", "1", "--one-thread-rounds", "1"]}),
    ("Attention kernels at fine-tuning lengths (used by `lorakit train` in bf16)", "attention.py",
     {"full": ["--rounds", "3"], "lean": ["--rounds", "3"], "quick": ["--quick"]}),
    ("Mixed-adapter batches (issue 4)", "multi_adapter.py",
     {"full": ["--rounds", "3", "--decode-rounds", "9"], "lean": ["--rounds", "2", "--decode-rounds", "6"], "quick": ["--quick"]}),
    ("GPU rows: training step, LoRA vs full, inference on CUDA, fp32 and bf16 (issue 7)", "gpu.py",
     {"full": ["--steps", "6", "--rounds", "7"], "lean": ["--steps", "6", "--rounds", "7"], "quick": ["--quick"]}),
]

#: ``--plan auto``: the calibration forward's time on the machine the plans were timed on (an AMD
#: EPYC, 2 cores: the fastest of 4 fp32 forwards of the embedded model at 4 x 128, 2 threads), and
#: each plan's whole-suite seconds there (lean: 749-861 s in four runs, before its training step's
#: --no-peer-memory took three of its ~15 s processes off and --no-plain-lora ran the LoRA ÷ full
#: worker's three rounds in the time of two; full: ~1220 s before
#: the LoRA ÷ full worker's second warm-up round, ~30 s more since). Another machine's projection
#: scales them by its own time; this machine's own calibration varied from 0.87 to 1.25 s with load.
CALIBRATION_REF_S = 0.95
PLAN_SECONDS = {"full": 1250.0, "lean": 780.0}

CALIBRATION = """
import time
import torch
from lorakit.models import load_model_and_tokenizer
model, _ = load_model_and_tokenizer(dtype=torch.float32)
ids = torch.randint(3, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for _ in range(4):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - start)
print(min(times))
"""


def calibrate() -> float:
    """The fastest of 4 fp32 forwards of the embedded model at 4 x 128 (torch's default threads), in a
    fresh process: the yardstick ``--plan auto`` scales the plans' times by."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", CALIBRATION], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the calibration forward failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def choose_plan(seconds: float, budget: float) -> tuple[str, str]:
    """(plan, why) for a calibration forward of ``seconds``: ``full`` where its projected time fits
    85% of ``budget``, else ``lean``."""
    speed = seconds / CALIBRATION_REF_S
    projected = {plan: cost * speed for plan, cost in PLAN_SECONDS.items()}
    plan = "full" if projected["full"] <= 0.85 * budget else "lean"
    why = (f"the calibration forward took {seconds:.3f} s ({speed:.2f} x the machine the plans were timed on), "
           f"projecting {projected['full']:.0f} s for the full plan and {projected['lean']:.0f} s for the lean one "
           f"against 85% of the {budget:.0f} s budget")
    return plan, why


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
    ap.add_argument("--plan", choices=["auto", "full", "lean"], default="auto",
                    help="repeats: full, lean (fewer rounds, one time-to-quality seed), or auto (default): full "
                         "where a calibration forward projects it to fit 85%% of the budget, else lean")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds for the whole suite (default 900: the issue's 15 minutes); a benchmark still "
                         "running when it is spent is stopped and reported as such, the rest are not run")
    args = ap.parse_args()
    suite_start = time.perf_counter()
    if args.quick:
        plan, why = "quick", "--quick (a smoke run)"
    elif args.plan == "auto":
        plan, why = choose_plan(calibrate(), args.budget)
    else:
        plan, why = args.plan, f"--plan {args.plan}"
    print(f"== plan {plan}: {why}", flush=True)
    command = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    parts = [f"# Benchmarks\n\nWritten by `{command}`" + (" (`make bench`)" if not sys.argv[1:] else "") + " on "
             f"{datetime.date.today().isoformat()}, plan **{plan}** ({why}). Each table says what its ratios "
             f"are: medians of per-round ratios (rounds interleaved in one process, or repeats in fresh processes) "
             f"with (min–max) or, where it says IQR, the interquartile range; a ratio without a spread is a single "
             f"measurement. Absolute times on this shared machine are noisy and given for scale only. "
             f"{gpu_note()}\n"]
    failed = 0
    for title, script, plans in SUITE:
        path = ROOT / "benchmarks" / script
        if not path.exists():
            parts.append(f"## {title}\n\n(not run: {script} is missing)\n")
            continue
        left = args.budget - (time.perf_counter() - suite_start)
        if left <= 0:
            failed += 1
            parts.append(f"## {title}\n\n(not run: the suite's {args.budget:.0f} s budget was spent)\n")
            continue
        cmd = [sys.executable, str(path), *plans[plan]]
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
    parts.append(f"The suite ran in {total:.0f} s (plan {plan}, the calibration included), budget "
                 f"{args.budget:.0f} s{over}.\n")
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
