"""The suite's GPU rows: the same ratios as train_step.py and inference.py, on a CUDA device, fp32 and bf16.

Runs only where ``torch.cuda.is_available()``; elsewhere it prints that the GPU rows are skipped
and exits 0 (``make bench`` includes it either way). ``--device cpu --quick`` runs the same code on
the CPU as a smoke test of the script itself (not a measurement for the docs).

On one device, in one process: lorakit (as ``lorakit train`` sets it up: ``get_lora_model`` +
``use_lora_training_kernels`` + its loss at label positions) and PEFT 0.21 (``get_peft_model`` +
``model(**batch).loss``), r = 16 on all linear layers, alpha 32, AdamW, batches of 4 × 256 tokens
(the CPU suite's) and 8 × 1024 (enough work to keep an H200 busy) on the embedded SmolLM2-135M-Instruct's
shapes; steps alternate between the two (who goes first rotates), the clock
read after ``torch.cuda.synchronize()``. Per row: step time lorakit ÷ PEFT, the step's peak device
memory (``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it: both
models stay resident in the process, so their weights are left out on both sides) and bytes saved
for backward (``saved_tensors_hooks``, distinct storages). LoRA ÷ full fine-tuning (fp32) the same way,
and inference (unmerged ÷ base, merged ÷ base, PEFT ÷ base at 4 × 128, 16 × 1 and 16 × 512 tokens).
Each training row also says how busy the device was during a profiled step: a small model's step at
a small batch is set by the host (Python and kernel launches), not by the GPU.

    python benchmarks/gpu.py [--steps 6] [--rounds 7] [--device cuda] [--model auto] [--profile DIR]
        [--train-shapes 4x256,8x1024] [--infer-shapes 4x128,16x1,16x512] [--quick]

``--model embedded`` loads the embedded model; ``random`` builds a randomly initialised Llama of
its shapes (``_common.build_base``): the same layers, sizes and kernels, so the same times, for
machines that cannot hold the embedded wheel (its GGUF is 98 MB; the lent GPU machines here take
a 64 MiB working tree). ``auto`` (the default) takes the embedded model where it loads, else the
random one, and the output says which. ``--profile DIR`` also writes, per precision, the
``torch.profiler`` table of one training step of each library (top operators by device time).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_base, machine, ratio_stats, saved_for_backward  # noqa: E402
from train_step import BATCH, RANK, SEQ, make_batch, setup  # noqa: E402


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_peak_mb(device, step) -> float:
    """Device memory a step allocates at its peak above what was allocated before it (activations,
    gradients, temporaries; not the resident weights of the models held in this process)."""
    import torch

    if device.type != "cuda":
        step()
        return float("nan")
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4x256,8x1024' -> [(4, 256), (8, 1024)] (rows x tokens)."""
    try:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 4x256,8x1024 (rows x tokens), got {text!r}")
    return shapes


def build(kind: str, base, device, dtype, shape: tuple[int, int] = (BATCH, SEQ)):
    """A training setup on ``device``: (model, step function, saved-bytes function, (trainable, frozen) counts)."""
    import torch

    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model.train()
    batch = {k: v.to(device) for k, v in make_batch("lm", model.config.vocab_size, shape).items()}
    model, loss_fn = setup(kind, model, batch)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start

    def saved_mb() -> float:
        loss, saved = saved_for_backward(model, loss_fn)
        loss.backward()
        opt.zero_grad(set_to_none=True)
        return saved / 2**20

    counts = (sum(p.numel() for p in params), sum(p.numel() for p in model.parameters() if not p.requires_grad))
    return model, step, saved_mb, counts


def profile_step(step, device, path: Path | None) -> tuple[float, float]:
    """Profile one ``step``; return (seconds the device spent in kernels, that time ÷ the step's wall
    time: near 1 the step is device-bound; small, the host's Python and kernel launches set the
    pace). With ``path``, write the profiler's operator table (sorted by device time) there."""
    from torch.profiler import ProfilerActivity, profile

    nan = float("nan")
    if device.type != "cuda":
        return nan, nan
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall = step()
    except Exception as exc:  # a profiler problem must not cost the measured rows
        if path is not None:
            path.write_text(f"profiling failed: {type(exc).__name__}: {exc}\n")
        return nan, nan
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40,
                                                      max_name_column_width=60))
        except Exception as exc:
            path.write_text(f"profile table failed: {type(exc).__name__}: {exc}\n")
    try:  # kernels only: user annotations (the optimizer's range, say) span kernels and would count twice
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
        busy = sum(getattr(e, "self_device_time_total", e.device_time_total) for e in kernels) / 1e6
        return busy, busy / wall
    except Exception:
        return nan, nan


def train_rows(base, device, dtype, steps: int, shape: tuple[int, int], profile_stem: Path | None = None) -> dict:
    """lorakit ÷ PEFT (time, peak memory, saved bytes) at one precision and batch shape; steps alternating."""
    runs = {kind: build(kind, base, device, dtype, shape) for kind in ("lorakit", "peft")}
    peaks, saved, busy, times = {}, {}, {}, {k: [] for k in runs}
    for kind, (_, step, saved_fn, _) in runs.items():
        step()  # warm-up: kernels chosen, optimizer state allocated
        saved[kind] = saved_fn()
        peaks[kind] = _step_peak_mb(device, step)
        busy[kind] = profile_step(step, device, profile_stem and profile_stem.with_name(f"{profile_stem.name}_{kind}.txt"))
    for i in range(steps):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for kind in order:
            times[kind].append(runs[kind][1]())
    return {"time": [a / b for a, b in zip(times["lorakit"], times["peft"])],
            "peak": peaks["lorakit"] / peaks["peft"], "saved": saved["lorakit"] / saved["peft"],
            "kernels": busy["lorakit"][0] / busy["peft"][0] if busy["peft"][0] else float("nan"),
            "abs": {k: (statistics.median(v), peaks[k], saved[k], busy[k]) for k, v in times.items()}}


def lora_vs_full(base, device, steps: int, shape: tuple[int, int]) -> tuple[list[float], float]:
    """LoRA ÷ full fine-tuning step time (fp32), steps alternating; and the floor 2/3 + P/N."""
    import torch

    runs = {kind: build(kind, base, device, torch.float32, shape) for kind in ("lorakit", "full")}
    for _, step, _, _ in runs.values():
        step()
    times = {k: [] for k in runs}
    for i in range(steps):
        for kind in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[kind].append(runs[kind][1]())
    trainable, frozen = runs["lorakit"][3]
    return [a / b for a, b in zip(times["lorakit"], times["full"])], 2 / 3 + trainable / frozen


def inference_rows(base, device, dtype, rounds: int, shapes: list[tuple[int, int]]) -> dict[str, dict[str, list[float]]]:
    """Forward time of unmerged / merged lorakit and PEFT ÷ the base model, interleaved rounds."""
    import peft
    import torch

    import lorakit as lk

    cfg = dict(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", init_lora_weights=False)
    plain = copy.deepcopy(base).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    ours = lk.get_lora_model(copy.deepcopy(plain), lk.LoraConfig(**cfg))
    models = {"base": plain, "lorakit": ours, "lorakit merged": lk.merge_and_unload(copy.deepcopy(ours)),
              "peft": peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**cfg))}
    for m in models.values():
        m.eval()
    out = {}
    with torch.inference_mode():
        for b, t in shapes:
            shape, inner = f"{b} x {t}", max(2, min(20, 2048 // (b * t)))
            ids = torch.randint(3, plain.config.vocab_size, (b, t), device=device)
            times = {k: [] for k in models}
            names = list(models)
            for m in models.values():
                m(input_ids=ids, use_cache=False)
            for r in range(rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    _sync(device)
                    start = time.perf_counter()
                    for _ in range(inner):
                        models[name](input_ids=ids, use_cache=False)
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            out[shape] = {k: [a / b for a, b in zip(v, times["base"])] for k, v in times.items() if k != "base"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="alternating timed steps per library and precision")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved inference rounds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", choices=("auto", "embedded", "random"), default="auto",
                    help="the embedded model, a random model of its shapes, or the first that loads")
    ap.add_argument("--profile", metavar="DIR", help="write per-library profiler tables of one step here")
    ap.add_argument("--train-shapes", type=parse_shapes, default=parse_shapes(f"{BATCH}x{SEQ},8x1024"),
                    help=f"training batches, rows x tokens (default {BATCH}x{SEQ},8x1024: the suite's batch, "
                         "and one that keeps the GPU busy)")
    ap.add_argument("--infer-shapes", type=parse_shapes, default=parse_shapes("4x128,16x1,16x512"),
                    help="inference batches, rows x tokens (default 4x128,16x1,16x512)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 2 rounds, the first training shape and two "
                    "inference shapes (a smoke run)")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA GPU on this machine: the GPU rows are skipped (the last measurement on an H200: "
              "docs/benchmarks_gpu.md).")
        return
    if args.quick:  # a smoke run: the first training shape and two inference shapes
        args.steps, args.rounds = 2, 2
        args.train_shapes, args.infer_shapes = args.train_shapes[:1], args.infer_shapes[:2]
    from lorakit.models import load_model_and_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    base, model_name = None, "a random Llama of the embedded model's shapes (SmolLM2-135M: 30 layers, hidden 576)"
    if args.model != "random":
        try:
            base, _ = load_model_and_tokenizer(dtype=torch.float32)
            model_name = "the embedded SmolLM2-135M-Instruct"
        except (FileNotFoundError, ImportError) as exc:
            if args.model == "embedded":
                raise
            print(f"(embedded model not loadable here: {type(exc).__name__}: {exc}; using a random model of its shapes)")
    if base is None:
        base = build_base(30)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"Device: {name}; host: {machine()}\n")
    print(f"Model: {model_name}.\n")
    shapes = lambda items: ",".join(f"{b}x{t}" for b, t in items)  # noqa: E731
    print(f"Command: `python benchmarks/gpu.py --steps {args.steps} --rounds {args.rounds} --device {args.device} "
          f"--model {args.model} --train-shapes {shapes(args.train_shapes)} --infer-shapes {shapes(args.infer_shapes)}`\n")
    print("Training step, r = 16 all-linear, AdamW; lorakit and PEFT steps alternating in one process; "
          "median (min–max) of the per-pair ratios. GPU kernel time: the device's time in kernels during one "
          "profiled step. Device busy: that time ÷ the step's wall time; where it is small, the host's Python "
          "and kernel launches set the pace, not the GPU:\n")
    print("| batch | precision | step time lorakit ÷ PEFT | GPU kernel time lorakit ÷ PEFT | step peak device memory "
          "lorakit ÷ PEFT | saved-for-backward lorakit ÷ PEFT | lorakit / PEFT: step, step peak | device busy lorakit / PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.train_shapes:
        for label, dtype in (("fp32", torch.float32), ("bf16 (adapters fp32)", torch.bfloat16)):
            stem = None
            if args.profile and shape == args.train_shapes[0]:
                stem = Path(args.profile) / f"profile_{label.split()[0]}"
            try:
                row = train_rows(base, device, dtype, args.steps, shape, stem)
            except Exception as exc:  # a failing row is reported, the others still run
                print(f"| {shape[0]} x {shape[1]} | {label} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | | | |")
                continue
            a = row["abs"]
            print(f"| {shape[0]} x {shape[1]} | {label} | {ratio_stats(row['time'])} | {row['kernels']:.3f} | "
                  f"{row['peak']:.3f} | {row['saved']:.3f} | {a['lorakit'][0]:.4f} s, {a['lorakit'][1]:.0f} MB / "
                  f"{a['peft'][0]:.4f} s, {a['peft'][1]:.0f} MB | "
                  f"{a['lorakit'][3][1]:.0%} ({a['lorakit'][3][0] * 1e3:.1f} ms) / "
                  f"{a['peft'][3][1]:.0%} ({a['peft'][3][0] * 1e3:.1f} ms) |", flush=True)
    print()
    for shape in args.train_shapes:
        try:
            ratios, floor = lora_vs_full(base, device, args.steps, shape)
            print(f"LoRA ÷ full fine-tuning step (fp32), batch {shape[0]} x {shape[1]}: {ratio_stats(ratios)} "
                  f"(arithmetic floor 2/3 + P/N = {floor:.3f})\n")
        except Exception as exc:
            print(f"LoRA ÷ full fine-tuning step, batch {shape[0]} x {shape[1]}: failed: {type(exc).__name__}: {str(exc)[:200]}\n")
    print("Inference (forward ÷ base model; models interleaved, median (min–max) over rounds):\n")
    print("| precision | shape | lorakit unmerged ÷ base | lorakit merged ÷ base | PEFT unmerged ÷ base |")
    print("|---|---|---|---|---|")
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            rows = inference_rows(base, device, dtype, args.rounds, args.infer_shapes)
        except Exception as exc:
            print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |")
            continue
        for shape, r in rows.items():
            print(f"| {label} | {shape} | {ratio_stats(r['lorakit'])} | {ratio_stats(r['lorakit merged'])} | "
                  f"{ratio_stats(r['peft'])} |", flush=True)


if __name__ == "__main__":
    main()
