"""QLoRA base quality on the embedded model: NF4 memory, NF4 vs int4 error, NF4 vs original eval loss.

    python benchmarks/qlora_quality.py [--texts 200] [--max-length 128] [--json out.json]

Measures, on SmolLM2-135M-Instruct (every nn.Linear except the tied lm_head, as quantize_model_nf4 does):

1. resident memory of the quantised weights: bits per parameter including every scale level;
2. weight reconstruction error, block size 64 for all: NF4 with double quantisation (lorakit),
   NF4 with fp32 scales, int4 absmax (15 symmetric levels round(7·w/absmax), fp32 scale), and
   torchao's NF4Tensor when torchao is importable (a cross-check of our implementation);
3. held-out language-model loss / perplexity of the original model, the NF4 model and the int4
   model on the first ``--texts`` reviews of the task's held-out split (plain text, every token).

Note: the embedded weights themselves come from a Q4_1 GGUF file (4-bit, block 32, fp16 scale and
minimum), so "original" here means those dequantised weights; NF4 re-quantises them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.quant import dequantize_nf4, nf4_memory, quantize_model_nf4, quantize_nf4  # noqa: E402

BLOCK = 64


def int4_absmax(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Fake-quantise ``w`` to symmetric int4 with one fp32 absmax per block of ``block`` weights."""
    flat = w.reshape(-1, block).float()
    scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7
    return (torch.round(flat / scale).clamp(-7, 7) * scale).reshape(w.shape)


def nf4_fp32_scales(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """NF4 with one fp32 absmax per block (no double quantisation)."""
    from lorakit.quant import NF4_LEVELS

    levels = torch.tensor(NF4_LEVELS)
    flat = w.reshape(-1, block).float()
    scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    idx = torch.bucketize(flat / scale, (levels[1:] + levels[:-1]) / 2)
    return (levels[idx] * scale).reshape(w.shape)


def torchao_nf4(w: torch.Tensor) -> torch.Tensor | None:
    """torchao's NF4Tensor round trip (scale group = largest divisor of the block count <= 256), or None."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except Exception:
        return None
    n_blocks = w.numel() // BLOCK
    group = max(d for d in range(1, 257) if n_blocks % d == 0)
    return to_nf4(w.float().contiguous(), BLOCK, group).get_original_weight()


def weight_errors(model: nn.Module) -> dict[str, dict[str, float]]:
    """Relative Frobenius error ‖W − Q(W)‖/‖W‖ and mean |W − Q(W)| over all quantised weights."""
    sums: dict[str, list[float]] = {}
    total_sq = total_abs = 0.0
    count = 0
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or name.endswith("lm_head"):
            continue
        w = m.weight.detach().float()
        total_sq += float(w.square().sum())
        total_abs += float(w.abs().sum())
        count += w.numel()
        recon = {
            "nf4_double_quant (lorakit)": dequantize_nf4(quantize_nf4(w), w.shape),
            "nf4_fp32_scales": nf4_fp32_scales(w),
            "int4_absmax_fp32_scales": int4_absmax(w),
        }
        ao = torchao_nf4(w)
        if ao is not None:
            recon["nf4_double_quant (torchao)"] = ao
        for key, q in recon.items():
            err = (q.float() - w)
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += float(err.square().sum())
            acc[1] += float(err.abs().sum())
    return {k: {"rel_frobenius": math.sqrt(v[0] / total_sq), "mean_abs_err": v[1] / count,
                "mean_abs_weight": total_abs / count} for k, v in sums.items()}


@torch.no_grad()
def lm_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over every non-padding token."""
    total, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["input_ids"][:, 1:]
        mask = b["attention_mask"][:, 1:].bool()
        total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        n += int(mask.sum())
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=200, help="held-out reviews to score")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.data import load_rotten_tomatoes

    t0 = time.time()
    model, tok = load_model_and_tokenizer()
    _, test = load_rotten_tomatoes()
    texts = [ex.messages[0]["content"].split("\n")[0].removeprefix("Review: ") for ex in test[: args.texts]]
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc = tok(texts[i : i + args.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    errors = weight_errors(model)
    original_loss = lm_loss(model, batches)

    int4_model = copy.deepcopy(model)
    for name, m in int4_model.named_modules():
        if type(m) is nn.Linear and not name.endswith("lm_head"):
            m.weight.data = int4_absmax(m.weight.data)
    int4_loss = lm_loss(int4_model, batches)
    del int4_model

    dense_linear_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                             if type(m) is nn.Linear and not n.endswith("lm_head"))
    all_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model_nf4(model, skip=["lm_head"])
    mem = nf4_memory(model)
    nf4_loss = lm_loss(model, batches)
    nf4_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + mem["bytes"]

    result = {
        "texts": len(texts), "tokens": n_tokens,
        "memory": {"quantised_params": mem["params"], "nf4_bytes": mem["bytes"], "bits_per_param": mem["bits_per_param"],
                   "fp32_bytes_of_same_weights": dense_linear_bytes,
                   "whole_model_bytes_fp32": all_param_bytes, "whole_model_bytes_nf4": nf4_param_bytes},
        "weight_error": errors,
        "eval": {name: {"loss": loss, "perplexity": math.exp(loss)} for name, loss in
                 (("original", original_loss), ("nf4", nf4_loss), ("int4_absmax", int4_loss))},
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    print("\n| base weights | eval loss | perplexity |\n|---|---|---|")
    for name, v in result["eval"].items():
        print(f"| {name} | {v['loss']:.4f} | {v['perplexity']:.2f} |")
    print("\n| quantiser (block 64) | rel. Frobenius error | mean abs error |\n|---|---|---|")
    for name, v in errors.items():
        print(f"| {name} | {v['rel_frobenius']:.4f} | {v['mean_abs_err']:.3e} |")
    print(f"\nNF4 storage: {mem['bits_per_param']:.3f} bits/param over {mem['params']:,} weights "
          f"({mem['bytes'] / 2**20:.1f} MiB vs {dense_linear_bytes / 2**20:.1f} MiB fp32)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
