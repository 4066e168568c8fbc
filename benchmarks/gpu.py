"""The suite's GPU rows: the same ratios as train_step.py and inference.py, on a CUDA device, fp32 and bf16.

Runs only where ``torch.cuda.is_available()``; elsewhere it prints that the GPU rows are skipped
and exits 0 (``make bench`` includes it either way). ``--device cpu --quick`` runs the same code on
the CPU as a smoke test of the script itself (not a measurement for the docs).

On one device, in one process: lorakit (as ``lorakit train`` sets it up: ``get_lora_model`` +
``use_lora_training_kernels`` + its loss at label positions) and PEFT 0.21 (``get_peft_model`` +
``model(**batch).loss``), r = 16 on all linear layers, alpha 32, AdamW, batch 4 × 256 tokens of the
embedded SmolLM2-135M-Instruct; steps alternate between the two (who goes first rotates), the clock
read after ``torch.cuda.synchronize()``. Per row: step time lorakit ÷ PEFT, the step's peak device
memory (``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it: both
models stay resident in the process, so their weights are left out on both sides) and bytes saved
for backward (``saved_tensors_hooks``, distinct storages). LoRA ÷ full fine-tuning (fp32) the same way,
and inference (unmerged ÷ base, merged ÷ base, PEFT ÷ base at 4 × 128 and 16 × 1 tokens).

    python benchmarks/gpu.py [--steps 6] [--rounds 7] [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ratio_stats, saved_for_backward  # noqa: E402
from train_step import RANK, make_batch, setup  # noqa: E402


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


def build(kind: str, base, device, dtype):
    """A training setup on ``device``: (model, step function, saved-bytes function, (trainable, frozen) counts)."""
    import torch

    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    model.train()
    batch = {k: v.to(device) for k, v in make_batch("lm", model.config.vocab_size).items()}
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


def train_rows(base, device, dtype, steps: int) -> dict:
    """lorakit ÷ PEFT (time, peak memory, saved bytes) at one precision; steps alternating."""
    runs = {kind: build(kind, base, device, dtype) for kind in ("lorakit", "peft")}
    peaks, saved, times = {}, {}, {k: [] for k in runs}
    for kind, (_, step, saved_fn, _) in runs.items():
        step()  # warm-up: kernels chosen, optimizer state allocated
        saved[kind] = saved_fn()
        peaks[kind] = _step_peak_mb(device, step)
    for i in range(steps):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for kind in order:
            times[kind].append(runs[kind][1]())
    return {"time": [a / b for a, b in zip(times["lorakit"], times["peft"])],
            "peak": peaks["lorakit"] / peaks["peft"], "saved": saved["lorakit"] / saved["peft"],
            "abs": {k: (statistics.median(v), peaks[k], saved[k]) for k, v in times.items()}}


def lora_vs_full(base, device, steps: int) -> tuple[list[float], float]:
    """LoRA ÷ full fine-tuning step time (fp32), steps alternating; and the floor 2/3 + P/N."""
    import torch

    runs = {kind: build(kind, base, device, torch.float32) for kind in ("lorakit", "full")}
    for _, step, _, _ in runs.values():
        step()
    times = {k: [] for k in runs}
    for i in range(steps):
        for kind in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[kind].append(runs[kind][1]())
    trainable, frozen = runs["lorakit"][3]
    return [a / b for a, b in zip(times["lorakit"], times["full"])], 2 / 3 + trainable / frozen


def inference_rows(base, device, dtype, rounds: int) -> dict[str, dict[str, list[float]]]:
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
        for shape, (b, t), inner in (("4 x 128", (4, 128), 5), ("16 x 1", (16, 1), 20)):
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
    ap.add_argument("--quick", action="store_true", help="2 steps, 2 rounds (a smoke run)")
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA GPU on this machine: the GPU rows are skipped.")
        return
    if args.quick:
        args.steps, args.rounds = 2, 2
    from lorakit.models import load_model_and_tokenizer

    device = torch.device(args.device)
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer(dtype=torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"Device: {name}; host: {machine()}\n")
    print(f"Command: `python benchmarks/gpu.py --steps {args.steps} --rounds {args.rounds} --device {args.device}`\n")
    print("Training step, batch 4 x 256, r = 16 all-linear, AdamW; lorakit and PEFT steps alternating in one "
          "process; median (min–max) of the per-pair ratios:\n")
    print("| precision | step time lorakit ÷ PEFT | step peak device memory lorakit ÷ PEFT | saved-for-backward lorakit ÷ PEFT | "
          "lorakit / PEFT step s |")
    print("|---|---|---|---|---|")
    for label, dtype in (("fp32", torch.float32), ("bf16 (adapters fp32)", torch.bfloat16)):
        try:
            row = train_rows(base, device, dtype, args.steps)
        except Exception as exc:  # a failing row is reported, the others still run
            print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |")
            continue
        a = row["abs"]
        print(f"| {label} | {ratio_stats(row['time'])} | {row['peak']:.3f} | {row['saved']:.3f} | "
              f"{a['lorakit'][0]:.4f} / {a['peft'][0]:.4f} |", flush=True)
    try:
        ratios, floor = lora_vs_full(base, device, args.steps)
        print(f"\nLoRA ÷ full fine-tuning step (fp32): {ratio_stats(ratios)} (arithmetic floor 2/3 + P/N = {floor:.3f})")
    except Exception as exc:
        print(f"\nLoRA ÷ full fine-tuning step: failed: {type(exc).__name__}: {str(exc)[:200]}")
    print("\nInference (forward ÷ base model; models interleaved, median (min–max) over rounds):\n")
    print("| precision | shape | lorakit unmerged ÷ base | lorakit merged ÷ base | PEFT unmerged ÷ base |")
    print("|---|---|---|---|---|")
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            rows = inference_rows(base, device, dtype, args.rounds)
        except Exception as exc:
            print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |")
            continue
        for shape, r in rows.items():
            print(f"| {label} | {shape} | {ratio_stats(r['lorakit'])} | {ratio_stats(r['lorakit merged'])} | "
                  f"{ratio_stats(r['peft'])} |", flush=True)


if __name__ == "__main__":
    main()
