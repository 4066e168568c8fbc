"""Time to the same quality: `lorakit train` (its defaults) vs the usual transformers + PEFT recipe.

Both fine-tune the embedded SmolLM2-135M-Instruct on the built-in Rotten Tomatoes task with the same
LoRA (r = 8, alpha 16, all linear layers), learning rate, warm-up + cosine schedule, batch size,
gradient clipping and number of steps; eval loss on the same held-out examples every few steps.

- lorakit: ``lorakit.train.loop.train`` with its defaults (``--precision auto``: bf16 base weights
  where the CPU supports bf16, fp32 adapters; length-bucketed batches; head and loss only at answer
  tokens, chunked; short-sequence attention).
- recipe: what a user typically writes with transformers + PEFT: fp32 model, ``get_peft_model``,
  batches padded to the longest row, ``model(input_ids, attention_mask, labels).loss`` (full
  logits), AdamW.

Each run trains in a fresh process of its own (which one starts first alternates with the seed), so
neither inherits the other's warmed-up allocator or kernels, and hands its adapter copies back in a
file. ``--seeds`` repeats the comparison with other seeds (other batches, another LoRA init); the
table gives each seed's ratios and their median.

Both runs see the same batches in the same order — lorakit's (``epoch_batches``, length-bucketed,
so the recipe pads as little as lorakit does): over a few dozen steps the order alone decides much
of the curve (an audit: the recipe's eval loss after 6 steps was 0.516 with its own shuffle and
0.259 with lorakit's first 6 batches), so with different orders the ratio measured the order. Both
run with the same number of torch threads (the recipe's default; ``lorakit train`` is given it
rather than choosing its own).

Evaluation is outside both runs' timed steps: each run's adapter is copied at every eval point, and
after both runs one evaluator — the fp32 base with the same LoRA injected by lorakit — loads each
copy in turn (PEFT's parameter names mapped to lorakit's) and computes the same ``eval_loss``, so
the two curves differ only by the adapters. Step 0 is the base model itself for both (a fresh LoRA
has B = 0), evaluated once.

Both runs start from the same adapter: B zero, and A drawn once (``shared_init``: the range both
libraries' default init draws from, the same values in both runs), so that the curves differ by the
training alone.

Two target qualities: the worse of the two runs' final eval losses (a level both reach: the
headline), and the recipe's final eval loss (strict); the table gives each run's training time
(evaluation excluded) to first reach each, interpolating between eval points, and the ratio. The
strict one favours lorakit: the recipe's time to its own final loss is its whole run, while
lorakit's curve may cross that level earlier by noise, or not at all (the seed then drops out); the
common level treats both alike. The eval loss moves between eval points by more than the runs
differ, so a crossing can come an eval point early or late by chance; the training time per step
(same batches, same number of steps) is the steadier ratio.

    python benchmarks/time_to_quality.py [--steps 24] [--eval-every 6] [--eval-samples 128] [--seeds 1] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, ratio_stats  # noqa: E402


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """First training time at which the eval-loss curve [(seconds, loss)] reaches ``target`` (interpolated)."""
    prev = None
    for t, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return t
            (t0, l0) = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return None


def shared_init(model, seed: int) -> int:
    """Give every LoRA A of ``model`` (lorakit's or PEFT's) the values the other run's gets: uniform in
    ±1/sqrt(in), the range both libraries' default init (``kaiming_uniform_(a=√5)``) draws from, from a
    generator seeded by ``seed`` and the module's path; B stays zero. Without it the two runs started
    from different draws (the libraries draw in other orders), and their curves differed by that too.
    Returns how many A's it set."""
    import zlib

    import torch

    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.removeprefix("base_model.model.").removesuffix(".weight")
            if ".lora_A." not in key:
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            bound = 1 / math.sqrt(p.shape[1])
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound))
            count += 1
    return count


def run_recipe(cfg, train_data, pad_id: int) -> tuple[dict[int, dict], dict[int, float]]:
    """Train with the recipe; returns (adapter copies at the eval points, training seconds at them),
    the copies under lorakit's parameter names."""
    import peft
    import torch

    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.data import collate, epoch_batches
    from lorakit.train.loop import lr_factor

    torch.manual_seed(cfg.seed)
    model, _ = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    shared_init(model, cfg.seed)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.max_steps, warmup))
    # lorakit's batches, in its order (epoch_batches as its loop calls it for one process)
    lengths = [len(t.input_ids) for t in train_data]
    epochs: dict[int, list[list[int]]] = {}
    snapshots: dict[int, dict] = {}
    elapsed: dict[int, float] = {}
    total = 0.0
    model.train()
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        epoch = (step - 1) // math.ceil(len(train_data) / cfg.batch_size)
        if epoch not in epochs:
            epochs[epoch] = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        idx = epochs[epoch][(step - 1) - epoch * len(epochs[0])]
        batch = collate([train_data[i] for i in idx], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total += time.perf_counter() - t0
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            # PEFT's "base_model.model.<path>.lora_A.default.weight" is lorakit's "<path>.lora_A.default"
            snapshots[step] = {n.removeprefix("base_model.model.").removesuffix(".weight"): p.detach().clone()
                               for n, p in model.named_parameters() if p.requires_grad}
            elapsed[step] = total
            print(f"  recipe step {step}: {total:.1f} s, loss {float(loss.detach()):.4f}", file=sys.stderr, flush=True)
    return snapshots, elapsed


def run_lorakit(cfg) -> tuple[dict[int, dict], dict[int, float]]:
    """Train with ``lorakit.train.loop.train``; returns (adapter copies at the eval points, training
    seconds at them)."""
    import torch

    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.data import load_examples, write_jsonl
    from lorakit.train.generate import resolve_precision
    from lorakit.train.loop import train

    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    holder: dict[str, object] = {}

    every = cfg.eval_steps
    cfg.eval_steps = 0  # no evaluation inside the run: the copies are evaluated afterwards

    def on_step(step: int, _loss: float) -> None:
        if step % every == 0 or step == cfg.max_steps:
            snapshots[step] = {n: p.detach().float().clone() for n, p in holder["model"].named_parameters()
                               if p.requires_grad}

    # Loaded as ``train`` loads it (bf16 weights where --precision auto picks bf16); train() then
    # injects LoRA into this very object, which the snapshots read.
    weight_dtype = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=weight_dtype)
    holder["model"] = model
    # the recipe's initial A's (shared_init), set right after train() injects LoRA: its loop calls
    # use_lora_training_kernels then, on the injected model
    from lorakit.train import loop

    kernels, inits = loop.use_lora_training_kernels, []

    def init_then_kernels(injected) -> None:
        inits.append(shared_init(injected, cfg.seed))
        kernels(injected)

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output = str(Path(tmp) / "run")
        # train()'s own before / after evaluations (outside its training time) on one held-out
        # example instead of ``eval_samples``: the curves come from the evaluator, and on 128 they
        # took ~18 s of each run's process (with generation for the accuracy)
        cfg.eval_data = str(Path(tmp) / "one.jsonl")
        write_jsonl(load_examples(None, "test")[:1], cfg.eval_data)
        loop.use_lora_training_kernels = init_then_kernels
        try:
            result = train(cfg, model=model, tokenizer=tokenizer, progress=False, on_step=on_step,
                           log=lambda s: print("  " + s, file=sys.stderr, flush=True))
        finally:
            loop.use_lora_training_kernels = kernels
        if not inits or not inits[0]:
            raise RuntimeError("train() did not call use_lora_training_kernels after injecting: the shared initial "
                               "adapter was not set (update run_lorakit)")
        log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    elapsed = {rec["step"]: rec["elapsed_s"] for rec in log}
    return snapshots, {step: elapsed[step] for step in snapshots}


def eval_curves(cfg, eval_data, pad_id: int, runs: dict[str, tuple[dict, dict]]) -> dict[str, list[tuple[float, float]]]:
    """Each run's curve [(training seconds, eval loss)], from step 0 (the base model, for all runs)
    through its adapter copies, every one loaded in turn into one fp32 evaluator model."""
    import torch

    from lorakit import LoraConfig, get_lora_model
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.generate import eval_loss

    base, _ = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    base_loss = eval_loss(base, eval_data, 16, pad_id, "fp32")
    model = get_lora_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    curves = {}
    for run, (snapshots, elapsed) in runs.items():
        curve = [(0.0, base_loss)]
        for step in sorted(snapshots):
            if set(snapshots[step]) != names:
                raise RuntimeError(f"the {run} adapter's parameters do not match a fresh lorakit injection's: "
                                   f"{sorted(set(snapshots[step]) ^ names)[:4]}")
            model.load_state_dict(snapshots[step], strict=False)
            curve.append((elapsed[step], eval_loss(model, eval_data, 16, pad_id, "fp32")))
            print(f"  {run} step {step}: {elapsed[step]:.1f} s, eval loss (fp32 base) {curve[-1][1]:.4f}",
                  file=sys.stderr, flush=True)
        curves[run] = curve
    return curves


def config(args: argparse.Namespace, seed: int):
    from lorakit.train.config import TrainConfig

    return TrainConfig(max_steps=args.steps, eval_steps=args.eval_every, eval_samples=args.eval_samples,
                       save_steps=0, seed=seed)


def worker(run: str, args: argparse.Namespace, seed: int, out: str) -> None:
    """One run (``recipe`` or ``lorakit``) in this fresh process; its adapter copies and the training
    seconds at them saved to ``out``."""
    import torch

    from lorakit.models import load_tokenizer
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import load_examples, tokenize_all

    cfg = config(args, seed)
    if run == "recipe":
        tokenizer = load_tokenizer(cfg.model)
        train_data = tokenize_all(tokenizer, load_examples(None, "train"), cfg.max_length)
        snapshots, elapsed = run_recipe(cfg, train_data, tokenizer.pad_token_id)
    else:
        threads = torch.get_num_threads()  # (the recipe's: torch's default)
        snapshots, elapsed = run_lorakit(TrainConfig(**{**cfg.to_dict(), "output": None, "threads": threads}))
    torch.save({"snapshots": snapshots, "elapsed": elapsed, "threads": torch.get_num_threads()}, out)


def fresh_run(run: str, args: argparse.Namespace, seed: int, tmp: str) -> dict:
    out = str(Path(tmp) / f"{run}-{seed}.pt")
    argv = [sys.executable, __file__, "--worker", run, "--steps", str(args.steps), "--eval-every",
            str(args.eval_every), "--eval-samples", str(args.eval_samples), "--seeds", str(seed), "--out", out]
    proc = subprocess.run(argv, cwd=ROOT)  # (its progress goes to this process's stderr as it runs)
    if proc.returncode != 0:
        raise RuntimeError(f"the {run} run (seed {seed}) failed (exit status {proc.returncode}; its error is above)")
    import torch

    return torch.load(out, weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=6,
                    help="eval points resolve the time to target (default 6 steps; each eval point of the "
                         "recipe costs about two of its steps)")
    ap.add_argument("--eval-samples", type=int, default=128,
                    help="held-out examples; the loss is over 1-2 answer tokens each, so fewer than ~100 is noisy")
    ap.add_argument("--seeds", type=int, default=1, help="comparisons with seeds 0, 1, ... (default 1)")
    ap.add_argument("--quick", action="store_true", help="8 steps, for a smoke run")
    ap.add_argument("--worker", choices=["recipe", "lorakit"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_samples = 8, 4, 16
    if args.worker:  # (--seeds is the seed itself here)
        worker(args.worker, args, args.seeds, args.out)
        return

    from lorakit.models import load_tokenizer
    from lorakit.train.data import load_examples, tokenize_all

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            order = ("recipe", "lorakit") if seed % 2 == 0 else ("lorakit", "recipe")
            done = {run: fresh_run(run, args, seed, tmp) for run in order}
            cfg = config(args, seed)
            tokenizer = load_tokenizer(cfg.model)
            eval_data = tokenize_all(tokenizer, load_examples(None, "test")[: cfg.eval_samples], cfg.max_length)
            curves = eval_curves(cfg, eval_data, tokenizer.pad_token_id,
                                 {run: (done[run]["snapshots"], done[run]["elapsed"]) for run in ("recipe", "lorakit")})
            rows.append((seed, curves, done["recipe"]["threads"]))

    def fmt(t):
        return "not reached" if t is None else f"{t:.1f}"

    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/time_to_quality.py --steps {args.steps} --eval-every {args.eval_every} "
          f"--eval-samples {args.eval_samples} --seeds {args.seeds}`\n")
    cfg = config(args, 0)
    print(f"Same data in the same batches and order (lorakit's length-bucketed ones, from the seed), "
          f"{rows[0][2]} torch thread(s) each, each run in a fresh process of its own, LoRA (r {cfg.rank}, all "
          f"linear layers, the same initial adapter in both runs), lr {cfg.learning_rate:g} with warm-up + cosine, batch {cfg.batch_size}, {args.steps} "
          f"steps; eval loss on {args.eval_samples} held-out examples every {args.eval_every} steps: each run's "
          f"adapter copied there and evaluated afterwards by one evaluator (the fp32 base with lorakit's LoRA, the "
          f"same `eval_loss` call); step 0, the base model itself for both, evaluated once; seconds are training "
          f"time only. lorakit runs `lorakit train`'s defaults (bf16 base where the CPU has bf16, fused AdamW, "
          f"loss at answer tokens).\n")
    print("| seed | run | eval loss at each eval point (train seconds) | s per step |")
    print("|---|---|---|---|")
    for seed, curves, _ in rows:
        for name, run in (("transformers + PEFT recipe (fp32)", "recipe"), ("lorakit train (defaults)", "lorakit")):
            points = ", ".join(f"{loss:.3f} ({sec:.0f})" for sec, loss in curves[run])
            print(f"| {seed} | {name} | {points} | {curves[run][-1][0] / args.steps:.2f} |")
    print("\n| seed | lorakit ÷ recipe, training time per step | to the worse final loss of the two (s: recipe, "
          "lorakit) | to the recipe's final loss (s: recipe, lorakit) |")
    print("|---|---|---|---|")
    per_step, strict, common = [], [], []
    for seed, curves, _ in rows:
        recipe, ours = curves["recipe"], curves["lorakit"]
        per_step.append(ours[-1][0] / recipe[-1][0])
        cols = []
        for goal, keep in ((max(recipe[-1][1], ours[-1][1]), common), (recipe[-1][1], strict)):
            a, b = time_to(recipe, goal), time_to(ours, goal)
            if a and b is not None:
                keep.append(b / a)
            cols.append(f"{b / a:.3f} at loss {goal:.4f} ({fmt(a)}, {fmt(b)})" if a and b is not None
                        else f"— at loss {goal:.4f} ({fmt(a)}, {fmt(b)})")
        print(f"| {seed} | {per_step[-1]:.3f} | {' | '.join(cols)} |")
    if len(rows) > 1:
        med = [f"**{statistics.median(v):.3f}** ({min(v):.3f}–{max(v):.3f})" if v else "—"
               for v in (per_step, common, strict)]
        print(f"| median (min–max) | {' | '.join(med)} |")
    else:
        # one seed: the per-step ratio's spread over the runs' segments between eval points (the
        # same batches in both runs, so each segment is a repeat of the comparison)
        recipe, ours = rows[0][1]["recipe"], rows[0][1]["lorakit"]
        segments = [(b1 - b0) / (a1 - a0) for (a0, _), (a1, _), (b0, _), (b1, _)
                    in zip(recipe, recipe[1:], ours, ours[1:]) if a1 > a0]
        print(f"\nlorakit ÷ recipe: **{per_step[0]:.3f}** per step (over the {len(segments)} stretches between "
              f"eval points: {ratio_stats(segments)}); "
              + (f"**{common[0]:.3f}** to the worse final loss of the two; " if common else "")
              + (f"{strict[0]:.3f} to the recipe's final loss." if strict else "the recipe's final loss not reached."))


if __name__ == "__main__":
    main()
