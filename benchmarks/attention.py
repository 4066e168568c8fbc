"""Attention kernels: lorakit's matmul path (``lorakit.ops.attention``) vs transformers' SDPA call.

Shapes of SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64), causal, batch x length as
in fine-tuning; forward + backward (and forward only), fp32 and bf16; median of interleaved rounds.
The ratio column is lorakit ÷ SDPA (below 1: lorakit faster). ``SHORT_ATTENTION_MAX_KEYS`` (any
mask) and ``CAUSAL_ATTENTION_MAX_KEYS`` (causal, in blocks of ``QUERY_BLOCK`` queries) are chosen
from this table: the matmul path is used in half precision up to that many keys.

    python benchmarks/attention.py [--rounds 7] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


class _Module:  # what transformers' attention functions read from the attention module
    num_key_value_groups = 3
    is_causal = True
    training = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.ops.attention import CAUSAL_ATTENTION_MAX_KEYS, QUERY_BLOCK, SHORT_ATTENTION_MAX_KEYS, ShortAttention

    shapes = [(8, 32), (8, 64), (8, 96), (8, 128), (4, 192), (4, 256)]
    if args.quick:
        shapes, args.rounds = [(8, 64), (4, 256)], 2
    module = _Module()

    def ours(q, k, v):
        return ShortAttention.apply(q, k, v, None, q.shape[-1] ** -0.5, True).transpose(1, 2).contiguous()

    def sdpa(q, k, v):
        return sdpa_attention_forward(module, q, k, v, None, scaling=q.shape[-1] ** -0.5)[0]

    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/attention.py --rounds {args.rounds}`\n")
    print(f"9 query / 3 key-value heads, head dim 64, causal; time of one layer's attention; median of "
          f"{args.rounds} interleaved rounds. In half precision the matmul path is used up to "
          f"{SHORT_ATTENTION_MAX_KEYS} keys with any mask and up to {CAUSAL_ATTENTION_MAX_KEYS} keys for causal "
          f"attention, which runs in blocks of {QUERY_BLOCK} queries (as here).\n")
    print("| batch x length | dtype | fwd+bwd SDPA (ms) | fwd+bwd lorakit (ms) | ratio | forward SDPA (ms) | forward lorakit (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, length in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            q = torch.randn(batch, 9, length, 64, dtype=dtype, requires_grad=True)
            k = torch.randn(batch, 3, length, 64, dtype=dtype, requires_grad=True)
            v = torch.randn(batch, 3, length, 64, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, length, 9, 64, dtype=dtype)

            def train(fn):
                torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

            def infer(fn):
                with torch.no_grad():
                    fn(q, k, v)

            times: dict[tuple[str, str], list[float]] = {}
            reps = max(3, int(200 / length))
            for _ in range(args.rounds):
                for mode, runner in (("train", train), ("infer", infer)):
                    for name, fn in (("sdpa", sdpa), ("ours", ours)):
                        runner(fn)
                        start = time.perf_counter()
                        for _ in range(reps):
                            runner(fn)
                        times.setdefault((mode, name), []).append((time.perf_counter() - start) / reps * 1e3)
            med = {key: statistics.median(v) for key, v in times.items()}
            print(f"| {batch} x {length} | {str(dtype).removeprefix('torch.')} | {med['train', 'sdpa']:.2f} | "
                  f"{med['train', 'ours']:.2f} | {med['train', 'ours'] / med['train', 'sdpa']:.2f} | "
                  f"{med['infer', 'sdpa']:.2f} | {med['infer', 'ours']:.2f} | "
                  f"{med['infer', 'ours'] / med['infer', 'sdpa']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
