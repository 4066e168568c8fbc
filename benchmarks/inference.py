"""Inference cost of LoRA: unmerged forward ÷ base, merged ÷ base, for lorakit and PEFT 0.21.

One process holds the base model, lorakit's and PEFT's unmerged models built on it (module
structure copied, the base weights themselves shared, so every unmerged ratio is the adapters' cost
on the very same weight memory; ``--separate-copies`` gives each its own copy as before), and a
merged lorakit model (its own copy of every weight: it does the base model's computation on another
copy of the weights, so its ratio shows what the placement of 540 MB in memory alone does), and times them
in rounds of one forward each (every model once per round, the order shuffled), so machine noise
hits all alike: ``--rounds N`` is 20·N rounds at 16 × 1 and 2·N at 4 × 128. Ratios are medians of
the per-round ratios with the interquartile range (the min–max spread of many short rounds shows
only the rarest bursts of noise), then "best": the fastest round of each ÷ the fastest of the base
(the least disturbed measurement on a shared machine, as ``timeit`` advises).

    python benchmarks/inference.py [--rounds 7] [--threads 1] [--one-thread-rounds N]

With ``--threads 1`` the clock is the main thread's CPU time (``time.thread_time``, as in
benchmarks/multi_adapter.py: on a shared machine it counts the work done, not the waits for a
core); otherwise wall-clock time with torch's default threads. The two differ at 16 × 1: the
base model's matmuls use every core, while the rank-r products at 16 tokens are too small to be
split, so the adapters' share of the step is larger with two threads than with one.
``--one-thread-rounds N`` measures again at one thread (CPU time, N rounds) after the main
measurement, on the same models in the same process (``make bench`` does this: one model build
serves both tables).

Shapes: 4 × 128 tokens with logits at every position (a scoring forward, the issue's "unmerged
forward"), the same with the last position's logits only (``logits_to_keep=1``, as a prefill before
generation: without the vocabulary head's products at 127 of each row's 128 positions, about a
fifth of the forward, the adapters' share of what is left is larger), and 16 × 1 (one token per row, as in a
decode step without a cache). Adapter: r = 16 on all linear layers of the embedded SmolLM2-135M-Instruct, non-zero weights.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ratio_stats  # noqa: E402


def sharing_weights(model):
    """A deep copy of ``model``'s modules that holds the same parameter and buffer tensors."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}  # persistent or not
    copied = copy.deepcopy(model, memo)
    shared = [a is b for a, b in zip(model.parameters(), copied.parameters())]
    assert all(shared) and len(shared) == sum(1 for _ in model.parameters()), "weights not shared"
    return copied


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); with 1 the clock is the main thread's CPU time")
    ap.add_argument("--separate-copies", action="store_true",
                    help="give each unmerged model its own copy of the base weights (the old method)")
    ap.add_argument("--one-thread-rounds", type=int, default=0, metavar="N",
                    help="then measure again at one thread (CPU time), N rounds, on the same models (default 0: no)")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.rounds < 1 or args.one_thread_rounds < 0:
        ap.error("--rounds must be >= 1 and --one-thread-rounds >= 0")

    import peft
    import torch

    import lorakit as lk
    from lorakit.models import load_model_and_tokenizer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer()
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    loaded, base = base, copy.deepcopy(base)  # every model in anonymous memory (copies, not the file map)
    if args.separate_copies:
        ours = lk.get_lora_model(copy.deepcopy(loaded), lk.LoraConfig(**cfg))
        theirs = peft.get_peft_model(copy.deepcopy(loaded), peft.LoraConfig(**cfg))
    else:
        # The LoRA models wrap the very tensors the base model holds (module structure copied,
        # parameters and buffers shared): the ratio is then the adapters' cost alone, not also the
        # difference between two placements of the same 540 MB in memory (which the merged row,
        # a separate copy doing the base computation, shows).
        ours = lk.get_lora_model(sharing_weights(base), lk.LoraConfig(**cfg))
        theirs = peft.get_peft_model(sharing_weights(base), peft.LoraConfig(**cfg))
    merged = lk.merge_and_unload(copy.deepcopy(ours))  # its own copy of every tensor
    del loaded
    models = {"base": base, "lorakit": ours, "lorakit merged": merged, "peft": theirs}
    for m in models.values():
        m.eval()
    flags = f" --threads {args.threads}" if args.threads is not None else ""
    if args.one_thread_rounds:
        flags += f" --one-thread-rounds {args.one_thread_rounds}"
    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/inference.py --rounds {args.rounds}{flags}`\n")
    measure_and_print(models, args.rounds)
    if args.one_thread_rounds:
        torch.set_num_threads(1)
        print()
        measure_and_print(models, args.one_thread_rounds)


def measure_and_print(models: dict, rounds_arg: int) -> None:
    """Time every model in shuffled rounds at the current torch thread count and print the table:
    with one thread the clock is the main thread's CPU time, otherwise the wall clock."""
    import torch

    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    base = models["base"]
    shapes = {"4 x 128": (4, 128, {}), "4 x 128, last logits": (4, 128, {"logits_to_keep": 1}), "16 x 1": (16, 1, {})}
    rounds = {"4 x 128": 2 * rounds_arg, "4 x 128, last logits": 2 * rounds_arg,
              "16 x 1": 20 * rounds_arg}  # one forward per model and round
    results: dict[str, dict[str, list[float]]] = {s: {k: [] for k in models} for s in shapes}
    order = random.Random(0)
    with torch.inference_mode():
        for shape_name, (b, t, kw) in shapes.items():
            ids = torch.randint(3, base.config.vocab_size, (b, t))
            for m in models.values():  # warm-up
                m(input_ids=ids, use_cache=False, **kw)
            names = list(models)
            for _ in range(rounds[shape_name]):
                order.shuffle(names)  # no model always runs right after the same other one
                for name in names:
                    m = models[name]
                    start = clock()
                    m(input_ids=ids, use_cache=False, **kw)
                    results[shape_name][name].append(clock() - start)

    print(f"{torch.get_num_threads()} torch thread(s), "
          f"{'CPU time of the main thread' if clock is time.thread_time else 'wall-clock time'}:\n")
    print("| shape | lorakit unmerged ÷ base | lorakit merged ÷ base | PEFT unmerged ÷ base |")
    print("|---|---|---|---|")
    for shape_name, res in results.items():
        cols = []
        for name in ("lorakit", "lorakit merged", "peft"):
            best = min(res[name]) / min(res["base"])
            ratios = [a / b for a, b in zip(res[name], res["base"])]
            cols.append(f"{ratio_stats(ratios, quartiles=True)}, best {best:.3f}")
        print(f"| {shape_name} | {' | '.join(cols)} |")
    print(f"\nRounds: {', '.join(f'{s}: {n}' for s, n in rounds.items())}. Base forward medians (s): "
          + ", ".join(f"{s}: {statistics.median(r['base']):.4f}" for s, r in results.items()))


if __name__ == "__main__":
    main()
