"""Training step: lorakit vs PEFT 0.21 (same model, rank, batch, precision, optimizer), and LoRA vs full.

Each measurement runs in a fresh process (so peak RSS is its own), lorakit and PEFT interleaved,
repeated; the table reports ratios (median, min–max over repeats), never absolute times alone.

    python benchmarks/train_step.py [--repeats 2] [--steps 2]

Each process times ``--steps`` steps after a warm-up step and reports the fastest (the least disturbed
by other work on a shared machine).

Workloads (batch 4 × 256 tokens of the embedded SmolLM2-135M-Instruct, r = 16 on all linear layers,
lora_alpha 32, AdamW, fp32; LoRA dropout 0 — both libraries' default — and 0.05 for ``lm``; and
``lm`` with the frozen base in bf16, adapters fp32 in both libraries):
- ``lm``: every position is a label (plain language-model batch);
- ``sft``: only the last 32 tokens of each row are labels (prompt masked, as in instruction tuning).
PEFT runs the usual recipe: ``model(input_ids, attention_mask, labels).loss``. lorakit runs what
``lorakit train`` runs: ``get_lora_model`` + ``use_lora_training_kernels`` (fused SwiGLU tails and
RMSNorms; its attention switch does not engage at 256 tokens) and its training loss
(``lorakit.train.generate.loss_sum``: head + loss only at label positions, chunked). The full
fine-tuning step uses lorakit's loss too, so LoRA ÷ full compares like with like.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, ratio_stats, reset_peak_rss, run_worker  # noqa: E402

BATCH, SEQ, RANK, ANSWER = 4, 256, 16, 32
#: (workload, LoRA dropout, base dtype): dropout 0 is the default of both LoraConfigs and of
#: `lorakit train`, 0.05 is common in recipes; bf16 is `lorakit train`'s default on CPUs with bf16.
WORKLOADS = [("lm", 0.0, "fp32"), ("sft", 0.0, "fp32"), ("lm", 0.05, "fp32"), ("lm", 0.0, "bf16")]


def make_batch(workload: str, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    if workload == "sft":
        labels[:, : SEQ - ANSWER] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def worker(lib: str, method: str, workload: str, steps: int, dropout: float, dtype: str = "fp32") -> dict:
    import time

    import torch

    from lorakit.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()  # bf16: the frozen base in bf16; both libraries keep the adapters in fp32
    batch = make_batch(workload, model.config.vocab_size)
    if lib == "peft":
        import peft

        cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear")
        model = peft.get_peft_model(model, cfg)

        def loss_fn():
            return model(**batch).loss
    else:
        import lorakit as lk
        from lorakit.train.generate import loss_sum

        if method == "lora":  # as `lorakit train` sets it up (lorakit.train.loop.prepare_model)
            from lorakit.train.loop import use_lora_training_kernels

            lk.get_lora_model(model, lk.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear"))
            use_lora_training_kernels(model)  # its attention engages only in bf16 at <= 128 keys; these are 256

        def loss_fn():
            loss, n = loss_sum(model, batch)
            return loss / n

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    # bytes autograd keeps for backward in one forward (distinct storages)
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    opt.step()  # this first step is also the warm-up (it allocates the optimizer state)
    opt.zero_grad(set_to_none=True)
    del loss
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(v for k, v in seen.items() if k not in param_ptrs)

    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"time": min(times), "peak_mb": peak_rss_mb(), "saved_mb": saved / 2**20,
            "trainable": trainable, "frozen": frozen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process; the fastest counts")
    ap.add_argument("--worker", nargs=6, metavar=("LIB", "METHOD", "WORKLOAD", "STEPS", "DROPOUT", "DTYPE"))
    args = ap.parse_args()
    if args.worker:
        lib, method, workload, steps, dropout, dtype = args.worker
        print(json.dumps(worker(lib, method, workload, int(steps), float(dropout), dtype)))
        return
    script = Path(__file__)
    rows = []
    for workload, dropout, dtype in WORKLOADS:
        runs: dict[str, list[dict]] = {"lorakit": [], "peft": [], "full": []}
        for _ in range(args.repeats):
            for key, lib, method in (("lorakit", "lorakit", "lora"), ("peft", "peft", "lora"), ("full", "lorakit", "full")):
                if key == "full" and (dropout or workload != "lm" or dtype != "fp32"):
                    continue  # LoRA ÷ full is measured once, on the fp32 lm workload without dropout
                runs[key].append(run_worker(script, [lib, method, workload, str(args.steps), str(dropout), dtype]))
                print(f"  {workload} p={dropout} {dtype} {key}: {runs[key][-1]}", file=sys.stderr, flush=True)
        t = [a["time"] / b["time"] for a, b in zip(runs["lorakit"], runs["peft"])]
        m = [a["peak_mb"] / b["peak_mb"] for a, b in zip(runs["lorakit"], runs["peft"])]
        s = [a["saved_mb"] / b["saved_mb"] for a, b in zip(runs["lorakit"], runs["peft"])]
        f = [a["time"] / b["time"] for a, b in zip(runs["lorakit"], runs["full"])]
        lk0 = runs["lorakit"][0]
        floor = 2 / 3 + lk0["trainable"] / lk0["frozen"]
        rows.append((f"{workload}, dropout {dropout:g}, {dtype}", t, m, s, f, floor, runs))
    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/train_step.py --repeats {args.repeats} --steps {args.steps}`\n")
    print("| workload | step time lorakit ÷ PEFT | peak RSS lorakit ÷ PEFT | saved-for-backward lorakit ÷ PEFT | LoRA ÷ full step (floor 2/3 + P/N) |")
    print("|---|---|---|---|---|")
    for workload, t, m, s, f, floor, runs in rows:
        lora_full = f"{ratio_stats(f)} (floor {floor:.3f})" if f else "—"
        print(f"| {workload} | {ratio_stats(t)} | {ratio_stats(m)} | {ratio_stats(s)} | {lora_full} |")
    print("\nAbsolute medians (for scale only; this machine is noisy):\n")
    print("| workload | run | step s | peak RSS MiB | saved MiB |")
    print("|---|---|---|---|---|")
    for workload, *_, runs in rows:
        for key, vals in runs.items():
            if not vals:
                continue  # full fine-tuning runs only in the first row
            print(f"| {workload} | {key} | {statistics.median(v['time'] for v in vals):.2f} | "
                  f"{statistics.median(v['peak_mb'] for v in vals):.0f} | {statistics.median(v['saved_mb'] for v in vals):.0f} |")


if __name__ == "__main__":
    main()
