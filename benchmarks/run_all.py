"""`make bench`: run the benchmark suite and write docs/benchmarks.md.

Every benchmark prints a markdown section (machine, command, ratio table); this script runs them one
after another (never in parallel: they would disturb each other's timings), and writes the sections
into docs/benchmarks.md. A benchmark that fails is reported in the file with its error, not hidden.

Three plans of repeats: ``full``, ``lean`` (fewer rounds and repeats, one time-to-quality seed:
every ratio still with a spread, but wider) and ``leaner`` (for a slow day: two LoRA ÷ full rounds,
two time-to-quality evaluations a run instead of three, no PEFT-with-lorakit's-loss rows in the
step-time rounds and no one-thread inference table). The suite must finish within its budget (15 minutes by default)
on CPUs that differ twofold in speed, so ``--plan auto`` (the default) first times the embedded
model's forward in a fresh process (~8 s) and runs the first plan whose projected time fits 85% of
the budget (``leaner`` where none does); after each benchmark it projects the rest of the suite
again from the time the benchmarks so far took, and goes on with a leaner plan where the rest would
not fit what is left of the budget. The file says which plan ran each benchmark and why.

    python benchmarks/run_all.py [--plan auto|full|lean|leaner] [--budget SECONDS] [--quick]
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

# (title, script, {plan: arguments}, {plan: seconds}); "quick" is --quick's smoke run. The seconds
# are each benchmark's time under each plan on the machine the plans were timed on (an AMD EPYC,
# 2 cores, whose calibration forward takes CALIBRATION_REF_S): lean's and leaner's from runs of
# them there, scaled by that day's speed (leaner's time to quality from its twelve-step run, plus
# the six steps more); full's from its whole-suite time (~1250 s) shared out as lean's.
SUITE = [
    ("Training step: lorakit vs PEFT, LoRA vs full fine-tuning (issue 7: 1, 3)", "train_step.py",
     {"full": ["--repeats", "2", "--steps", "1", "--pairs", "3", "--full-rounds", "3"],
      "lean": ["--repeats", "1", "--steps", "1", "--pairs", "2", "--full-rounds", "3", "--no-plain-lora",
               "--no-peer-memory"],
      "leaner": ["--repeats", "1", "--steps", "1", "--pairs", "2", "--full-rounds", "2", "--no-plain-lora",
                 "--no-peer-memory", "--no-peer-rows"],
      "quick": ["--repeats", "1", "--steps", "1", "--pairs", "2"]},
     {"full": 620, "lean": 372, "leaner": 325}),
    ("Time to the same quality: `lorakit train` vs the transformers + PEFT recipe (issue 7: 2)", "time_to_quality.py",
     {"full": ["--steps", "18", "--eval-every", "6", "--eval-samples", "128", "--seeds", "2"],
      "lean": ["--steps", "18", "--eval-every", "6", "--eval-samples", "128", "--seeds", "1"],
      "leaner": ["--steps", "18", "--eval-every", "9", "--eval-samples", "128", "--seeds", "1"], "quick": ["--quick"]},
     {"full": 400, "lean": 215, "leaner": 165}),
    ("Inference: unmerged / merged vs base, 2 threads (wall clock; full and lean plans: also 1 thread, CPU time) "
     "(issue 7: 4)",
     "inference.py", {"full": ["--rounds", "3", "--one-thread-rounds", "2"], "lean": ["--rounds", "2", "--one-thread-rounds", "1"],
                      "leaner": ["--rounds", "2", "--one-thread-rounds", "0"],
                      "quick": ["--rounds", "1", "--one-thread-rounds", "1"]},
     {"full": 150, "lean": 120, "leaner": 53}),
    ("Attention kernels at fine-tuning lengths (used by `lorakit train` in bf16)", "attention.py",
     {"full": ["--rounds", "3"], "lean": ["--rounds", "3"], "leaner": ["--rounds", "3"], "quick": ["--quick"]},
     {"full": 10, "lean": 10, "leaner": 10}),
    ("Mixed-adapter batches (issue 4)", "multi_adapter.py",
     {"full": ["--rounds", "3", "--decode-rounds", "9"], "lean": ["--rounds", "2", "--decode-rounds", "6"],
      "leaner": ["--rounds", "2", "--decode-rounds", "4"], "quick": ["--quick"]},
     {"full": 58, "lean": 53, "leaner": 38}),
    ("Adapter operations: lorakit vs PEFT (inject, save, load, merge_and_unload; merge, then unmerge)", "adapter_ops.py",
     {"full": ["--rounds", "5"], "lean": ["--rounds", "3"], "leaner": ["--rounds", "3"], "quick": ["--rounds", "1"]},
     {"full": 48, "lean": 35, "leaner": 35}),
    ("GPU rows: training step, LoRA vs full, inference on CUDA, fp32 and bf16 (issue 7)", "gpu.py",
     {"full": ["--steps", "6", "--rounds", "7"], "lean": ["--steps", "6", "--rounds", "7"],
      "leaner": ["--steps", "6", "--rounds", "7"], "quick": ["--quick"]},
     {"full": 2, "lean": 2, "leaner": 2}),
]

#: the plans, most repeats first: ``--plan auto`` runs the first that fits
PLANS = ("full", "lean", "leaner")

#: the calibration forward's time on the machine the plans were timed on (the fastest of 4 fp32
#: forwards of the embedded model at 4 x 128, 2 threads), and the calibration's own seconds. Another
#: machine's projection scales the plans' seconds by its own calibration time; this machine's varied
#: from 0.87 to 1.31 s with load (and a slow day slowed the training steps more than the forward).
CALIBRATION_REF_S = 0.95
CALIBRATION_SECONDS = 10

#: ``--plan auto`` runs the first plan projected to fit this share of the budget, and goes on with a
#: leaner one where the rest of the suite, projected from the benchmarks' times so far, would not
#: fit this share of what is left of it
FIT = 0.85


def plan_seconds(plan: str, scripts: list[str] | None = None) -> float:
    """Seconds of ``plan`` on the plans' machine: its benchmarks' among ``scripts`` (default: every
    one, and the calibration)."""
    if scripts is None:
        return CALIBRATION_SECONDS + sum(seconds[plan] for *_, seconds in SUITE)
    return sum(seconds[plan] for _, script, _, seconds in SUITE if script in scripts)

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
    """(plan, why) for a calibration forward of ``seconds``: the first plan whose projected time fits
    ``FIT`` of ``budget``, else the leanest."""
    speed = seconds / CALIBRATION_REF_S
    projected = {plan: plan_seconds(plan) * speed for plan in PLANS}
    plan = next((p for p in PLANS if projected[p] <= FIT * budget), PLANS[-1])
    shown = ", ".join(f"{projected[p]:.0f} s for {p}" for p in PLANS)
    why = (f"the calibration forward took {seconds:.3f} s ({speed:.2f} x the machine the plans were timed on), "
           f"projecting {shown} against {FIT:.0%} of the {budget:.0f} s budget")
    return plan, why


def replan(plan: str, speed: float, rest: list[str], left: float) -> tuple[str, float]:
    """(plan, projected seconds) for the benchmarks ``rest`` with ``left`` seconds of the budget and
    the machine at ``speed`` x the plans' one: ``plan`` where its projection fits ``FIT`` of ``left``,
    else the first leaner plan that does, else the leanest."""
    for p in PLANS[PLANS.index(plan):]:
        need = plan_seconds(p, rest) * speed
        if need <= FIT * left:
            return p, need
    return p, need


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
    ap.add_argument("--plan", choices=["auto", *PLANS], default="auto",
                    help="repeats: full, lean (fewer rounds, one time-to-quality seed), leaner (fewer still), or "
                         "auto (default): the first whose projection from a calibration forward fits 85%% of the "
                         "budget, going on with a leaner one where the benchmarks run slower than projected")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds for the whole suite (default 900: the issue's 15 minutes); a benchmark still "
                         "running when it is spent is stopped and reported as such, the rest are not run")
    args = ap.parse_args()
    suite_start = time.perf_counter()
    speed = None  # x the plans' machine: from the calibration, then from the benchmarks' own times
    if args.quick:
        plan, why = "quick", "--quick (a smoke run)"
    elif args.plan == "auto":
        seconds = calibrate()
        plan, why = choose_plan(seconds, args.budget)
        speed = seconds / CALIBRATION_REF_S
    else:
        plan, why = args.plan, f"--plan {args.plan}"
    print(f"== plan {plan}: {why}", flush=True)
    first_plan, replans, ran = plan, [], []  # (ran: the plan of each benchmark started)
    command = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    parts = [f"# Benchmarks\n\nWritten by `{command}`" + (" (`make bench`)" if not sys.argv[1:] else "") + " on "
             f"{datetime.date.today().isoformat()}, plan **{plan}** ({why}). Each table says what its ratios "
             f"are: medians of per-round ratios (rounds interleaved in one process, or repeats in fresh processes) "
             f"with (min–max) or, where it says IQR, the interquartile range; a ratio without a spread is a single "
             f"measurement. Absolute times on this shared machine are noisy and given for scale only. "
             f"{gpu_note()}\n"]
    failed = 0
    planned = measured = 0.0  # the finished benchmarks' seconds on the plans' machine, and here
    for i, (title, script, plans, cost) in enumerate(SUITE):
        path = ROOT / "benchmarks" / script
        if not path.exists():
            parts.append(f"## {title}\n\n(not run: {script} is missing)\n")
            continue
        left = args.budget - (time.perf_counter() - suite_start)
        if left <= 0:
            failed += 1
            parts.append(f"## {title}\n\n(not run: the suite's {args.budget:.0f} s budget was spent)\n")
            continue
        if speed is not None and measured:
            speed = measured / planned
            rest = [entry[1] for entry in SUITE[i:]]
            new_plan, need = replan(plan, speed, rest, left)
            if new_plan != plan:
                replans.append(f"from \"{title}\" on, plan **{new_plan}**: the benchmarks so far ran at {speed:.2f} x "
                               f"the plans' machine, projecting the rest at {plan_seconds(plan, rest) * speed:.0f} s "
                               f"under plan {plan} against {FIT:.0%} of the {left:.0f} s left"
                               + ("" if need <= FIT * left else f" (under {new_plan} too, {need:.0f} s: the budget "
                                  "stops what does not fit)"))
                print(f"== re-planned: {replans[-1]}", flush=True)
                plan = new_plan
        cmd = [sys.executable, str(path), *plans[plan]]
        ran.append(plan)
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
        if plan in cost:
            planned, measured = planned + cost[plan], measured + elapsed
        print(proc.stdout, flush=True)
        under = f", plan {plan}" if plan != first_plan else ""
        parts.append(f"## {title}\n\n{proc.stdout.strip()}\n\n(ran in {elapsed:.0f} s{under})\n")
    total = time.perf_counter() - suite_start
    over = "" if total <= 900 else " (over the issue's 15 minutes: see the machine's speed in the sections' times)"
    plans_run = ", then ".join(dict.fromkeys(ran)) or first_plan
    parts.append(f"The suite ran in {total:.0f} s (plan {plans_run}, the calibration included), budget "
                 f"{args.budget:.0f} s{over}." + "".join(f" Re-planned {r}." for r in replans) + "\n")
    Path(args.out).write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
