"""lorakit's memory estimate vs the measured peak memory of real training steps.

    python benchmarks/estimate_vs_measured.py [--quick] [--out benchmarks/results]

Models: a tiny random Llama (hidden 64, 2 layers) and the embedded SmolLM2-135M-Instruct (real
weights, fp32); methods: full fine-tuning and LoRA (r = 8 on q_proj, v_proj); AdamW; fp32; the
step is ``zero_grad(set_to_none=True)``, ``model(ids, labels=ids).loss.backward()``, ``step()``.

Two measurements per configuration:

* **tensor peak** (the one the ±15% check uses): every CPU allocation and free reported to the
  PyTorch profiler during the step, replayed in time order, plus the tensors alive at the start
  (parameters, buffers, optimizer states, batch). Exact and deterministic; it counts tensors,
  which is what the estimate models.
* **RSS rise** (cross-check): in a fresh subprocess, the resident set is read once the model is
  built and its weights touched (R0: libraries + weights), the peak-RSS counter (VmHWM) is reset, three steps run, and
  the rise VmHWM - R0 is compared with the estimate's peak minus the weights (optimizer states +
  the step's own peak). RSS adds what the tensor count leaves out (allocator slack and
  fragmentation, freed memory not yet returned, thread scratch buffers) and loses nothing, so it
  should land at or somewhat above the estimate.

Prints a Markdown table and writes ``estimate_vs_measured.json`` and ``.png`` into --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, reset_peak_rss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj")
TOLERANCE = 0.15


def _shape(name: str):
    from lorakit.analysis.estimate import ModelShape, load_shape

    if name == "tiny":
        return ModelShape(64, 160, 2, 4, 2, 16, 512, name="tiny")
    return load_shape("default")


def _model(name: str):
    if name == "tiny":
        return None  # measure_config builds it from the shape
    from lorakit.models import load_model_and_tokenizer

    return load_model_and_tokenizer(None)[0]


def measure(name: str, method: str, batch: int, seq: int) -> dict:
    """Tensor peak of one step, and the estimate for the same settings."""
    from lorakit.analysis.estimate import estimate_memory
    from lorakit.analysis.measure import measure_config

    shape = _shape(name)
    measured = measure_config(shape, method, batch, seq, r=8, target_modules=TARGETS, model=_model(name))
    est = estimate_memory(shape, method=method, batch_size=batch, seq_len=seq, precision="fp32", r=8,
                          target_modules=TARGETS)
    return {"model": name, "method": method, "batch": batch, "seq": seq, "measured_peak": measured["peak"],
            "measured_baseline": measured["baseline"], "estimate_peak": est.peak,
            "estimate_rise": est.peak - est.weights, "phase": est.peak_phase,
            "error": (est.peak - measured["peak"]) / measured["peak"]}


def rss_child(name: str, method: str, batch: int, seq: int) -> None:
    """Subprocess body: build, reset VmHWM, run three steps, print the RSS rise over R0 in bytes."""
    import gc

    import torch

    from lorakit.analysis.measure import add_lora, build_llama

    shape = _shape(name)
    net = _model(name) or build_llama(shape)
    if method == "lora":
        net = add_lora(net, 8, TARGETS)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    ids = torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    with torch.no_grad():  # fault in weights that from_pretrained left memory-mapped, so R0 holds them
        for p in net.parameters():
            p.sum()
    gc.collect()
    reset_peak_rss()
    before = peak_rss_mb()
    for _ in range(3):
        step()
    print(json.dumps({"rss_rise": int((peak_rss_mb() - before) * 2**20)}))


def rss_rise(name: str, method: str, batch: int, seq: int) -> int | None:
    cmd = [sys.executable, __file__, "--child", name, method, str(batch), str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["rss_rise"]
    print(f"RSS child failed: {proc.stderr[-400:]}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one setting per model, no RSS cross-check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        name, method, batch, seq = args.child
        rss_child(name, method, int(batch), int(seq))
        return 0

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = {"tiny": [(2, 32), (8, 256)], "smollm2": [(1, 64), (4, 256)]}
    if args.quick:
        settings = {k: v[:1] for k, v in settings.items()}
    rows = []
    for name, shapes in settings.items():
        for method in ("full", "lora"):
            for batch, seq in shapes:
                row = measure(name, method, batch, seq)
                row["rss_rise"] = None if args.quick else rss_rise(name, method, batch, seq)
                rows.append(row)
                print(f"  {name} {method} {batch}x{seq}: estimate {row['estimate_peak'] / 2**20:.1f} MiB, "
                      f"measured {row['measured_peak'] / 2**20:.1f} MiB ({100 * row['error']:+.2f}%)", file=sys.stderr)

    mib = lambda b: "—" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    print(f"\nMachine: {machine()}\n")
    print("| model | method | batch x seq | estimate (MiB) | measured tensor peak (MiB) | error | peak during "
          "| estimate − weights | measured RSS rise |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['batch']} x {r['seq']} | {mib(r['estimate_peak'])} | "
              f"{mib(r['measured_peak'])} | {100 * r['error']:+.2f}% | {r['phase']} | {mib(r['estimate_rise'])} | "
              f"{mib(r['rss_rise'])} |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nworst |error| {100 * worst:.2f}% (tolerance {100 * TOLERANCE:.0f}%)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate_vs_measured.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    from lorakit.analysis.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['model']}\n{r['method']} {r['batch']}x{r['seq']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["estimate_peak"] / 2**20 for r in rows], 0.4, label="estimate")
    ax.bar([i + 0.2 for i in x], [r["measured_peak"] / 2**20 for r in rows], 0.4, label="measured tensor peak")
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("Peak memory of one training step: estimate vs measured")
    ax.legend()
    _save(fig, out / "estimate_vs_measured.png")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
