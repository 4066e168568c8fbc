"""What data-parallel training sends per step: the gradient exchange of LoRA vs full fine-tuning.

Each process of ``torchrun ... lorakit.cli train`` sums the trainable gradients with the others once
per optimizer step (``lorakit.train.distributed.Dist.sum_gradients``: one all-reduce per bucket of
at most 16M numbers, plus one for the step's loss, token count and stop request). This starts
``--processes`` local processes (gloo, one thread each), gives each the gradients of the embedded
SmolLM2-135M's shapes — LoRA r = ``--rank`` on every linear layer of the decoder (the demo's
adapter: 2,442,240 numbers at r 8), and every weight (full fine-tuning) — and times the exchange.

    python benchmarks/distributed.py [--processes 2] [--rounds 12] [--rank 8] [--layers 30]

Times are the first process's wall clock, median (min–max) of ``--rounds`` exchanges after two
warm-up ones.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm_config  # noqa: E402


def gradient_shapes(rank: int, layers: int) -> dict[str, list[tuple[int, ...]]]:
    """The trainable tensors' shapes: LoRA's A (r, in) and B (out, r) on each decoder linear layer,
    and every parameter of the model (the tied embedding once) for full fine-tuning."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(smollm_config(layers))
    lora = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            lora += [(rank, module.in_features), (module.out_features, rank)]
    return {"LoRA": lora, "full fine-tuning": [tuple(p.shape) for p in model.parameters()]}


def _worker(rank: int, world: int, store: str, shapes: dict[str, list[tuple[int, ...]]], rounds: int) -> None:
    import torch
    import torch.distributed as dist

    from lorakit.train.distributed import Dist, init_gloo

    torch.set_num_threads(1)
    init_gloo(init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        group = Dist(world=world, rank=rank)
        for what, sizes in shapes.items():
            params = [torch.zeros(s, requires_grad=True) for s in sizes]
            for p in params:
                p.grad = torch.randn(p.shape)
            times = []
            for _ in range(rounds + 2):
                start = time.perf_counter()
                group.sum_gradients(params, [1.0, 100.0, 0.0])
                times.append(time.perf_counter() - start)
            if rank == 0:
                numel = sum(p.numel() for p in params)
                ms = [t * 1e3 for t in times[2:]]
                print(f"| {what} | {numel:,} in {len(params)} tensors | {statistics.median(ms):.1f} "
                      f"({min(ms):.1f}–{max(ms):.1f}) |", flush=True)
            del params
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2, help="local processes (default: 2)")
    ap.add_argument("--rounds", type=int, default=12, help="timed exchanges of each kind (default: 12)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8, the demo's)")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of SmolLM2's 30 (default: 30)")
    args = ap.parse_args(argv)
    if args.processes < 2 or args.rounds < 1 or args.rank < 1 or args.layers < 1:
        ap.error("--processes must be >= 2, and --rounds, --rank, --layers >= 1")
    import tempfile

    import torch.multiprocessing as mp

    # a file rendezvous: no port is picked in advance (a port found free can be taken before it is bound)
    store = Path(tempfile.mkdtemp(prefix="lorakit-dist-")) / "store"
    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/distributed.py --processes {args.processes} --rounds {args.rounds} "
          f"--rank {args.rank} --layers {args.layers}`\n")
    print(f"Gradient exchange per optimizer step, {args.processes} local processes (gloo, 1 thread each), "
          "ms, median (min–max):\n")
    print("| training | gradients summed | ms per step |")
    print("|---|---|---|")
    try:
        mp.spawn(_worker, args=(args.processes, str(store), gradient_shapes(args.rank, args.layers), args.rounds),
                 nprocs=args.processes, join=True)
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
