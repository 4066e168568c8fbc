"""LoRA training steps on small random Llamas, lorakit vs PEFT, where per-call costs dominate.

On a model of the embedded one's size the step is its matrix products; on a tiny one (hidden 32,
a few dozen tokens) it is mostly the Python and the fixed cost of each kernel call. This script
measures lorakit's step ÷ PEFT's there, for

* ``lorakit``: as ``lorakit train`` runs it (LoRA layers and training kernels) with the library's
  size rules: the kernels engage from ``lorakit.layers.fused.KERNELS_MIN_NUMEL`` input elements,
  oneDNN's fp32 products from ``lorakit.layers.gemm.ONEDNN_MIN_MACS`` multiply-adds on CPUs where
  it pays (``gemm.ONEDNN_PAYS``: not on Intel's, with MKL);
* ``every size``: the same with both thresholds at 0 and oneDNN on any CPU (kernels and oneDNN at
  every size, as before the rules existed);
* ``no kernels``: lorakit's LoRA layers alone (no ``use_lora_training_kernels``), with the rules.

Each model: 2 decoder layers, intermediate 2 x hidden, vocab 256, r = 8 on all linear layers, AdamW
(torch's default on both sides), fp32, one thread (``--threads``). Every configuration runs one step
per round, interleaved; the ratios are medians over the rounds (min–max of the per-round ratios).

Run: ``python benchmarks/small_models.py`` (``--rounds``, ``--shapes 32x2x16,64x4x64``).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ratio_stats  # noqa: E402

KINDS = ("peft", "lorakit", "every size", "no kernels")
DEFAULT_SHAPES = "32x2x16,64x4x64,128x4x128"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"HIDDENxBATCHxSEQ,..."`` as (hidden, batch, seq) triples; hidden a multiple of 4 (4 heads)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            hidden, batch, seq = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item.strip()!r}: expected HIDDENxBATCHxSEQ, e.g. 32x2x16") from None
        if min(hidden, batch, seq) < 1 or hidden % 4:
            raise argparse.ArgumentTypeError(f"shape {item.strip()!r}: sizes must be positive and hidden a multiple of 4")
        shapes.append((hidden, batch, seq))
    return shapes


def steppers(hidden: int, batch: int, seq: int) -> dict:
    """One step function per configuration in ``KINDS``, each on its own copy of one random model."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk
    from lorakit.train.generate import loss_sum
    from lorakit.train.loop import use_lora_training_kernels

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(64, seq))
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def make(kind: str):
        model = copy.deepcopy(base)
        if kind == "peft":
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

            def loss():
                return model(**data).loss
        else:
            lk.get_lora_model(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
            if kind != "no kernels":
                use_lora_training_kernels(model)

            def loss():
                total, n = loss_sum(model, data)
                return total / n
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> float:
            t0 = time.perf_counter()
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        return step

    return {kind: make(kind) for kind in KINDS}


def measure(hidden: int, batch: int, seq: int, rounds: int, warmup: int = 5) -> dict[str, list[float]]:
    """Per-round step times of every configuration, interleaved (one step of each per round)."""
    from lorakit.layers import fused, gemm

    rules = (fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS, gemm.ONEDNN_PAYS)
    steps = steppers(hidden, batch, seq)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for i in range(warmup + rounds):
            for kind in KINDS:
                fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS, gemm.ONEDNN_PAYS = (0, 0, True) if kind == "every size" else rules
                t = steps[kind]()
                if i >= warmup:
                    times[kind].append(t)
    finally:
        fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS, gemm.ONEDNN_PAYS = rules
    return times


def report(results: list[tuple[tuple[int, int, int], dict[str, list[float]]]], rounds: int, argv: list[str]) -> str:
    lines = [f"Machine: {machine()}", "",
             "Command: `python benchmarks/small_models.py" + "".join(" " + a for a in argv) + "`", "",
             "| hidden, tokens | PEFT step (ms) | lorakit ÷ PEFT | every size ÷ PEFT | no kernels ÷ PEFT |",
             "|---|---|---|---|---|"]
    for (hidden, batch, seq), times in results:
        peft_t = times["peft"]
        cells = [ratio_stats([a / b for a, b in zip(times[kind], peft_t)]) for kind in KINDS[1:]]
        lines.append(f"| {hidden}, {batch} × {seq} | {statistics.median(peft_t) * 1e3:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Median of {rounds} per-round ratios (min–max); 2 layers, r = 8 on all linear layers, fp32."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                    help=f"comma-separated HIDDENxBATCHxSEQ (default {DEFAULT_SHAPES})")
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds per shape (default 60)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    results = [(shape, measure(*shape, args.rounds)) for shape in args.shapes]
    print(report(results, args.rounds, argv))


if __name__ == "__main__":
    main()
