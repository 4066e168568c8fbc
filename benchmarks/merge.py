"""Merging adapters into the base weights: lorakit ÷ PEFT 0.21, on the embedded model.

Three operations, each timed on lorakit and on PEFT in the same rounds, who goes first alternating:

* ``merge_and_unload``: fold the adapter in and remove the LoRA layers (each round on fresh copies
  of two LoRA models made before the clock starts);
* ``merge``, then ``unmerge``: fold in and take out again, the LoRA layers kept (lorakit's
  ``lk.merge`` / ``lk.unmerge``, PEFT's ``merge_adapter`` / ``unmerge_adapter``), on the same two
  models round after round.

lorakit does more than PEFT in the second pair: its merge keeps a fingerprint of each merged
adapter's tensors (``lorakit.layers.guard``), and its unmerge checks them, refusing to subtract an
adapter changed since it was merged where PEFT subtracts whatever the adapter holds now
(tests/test_merge_guard.py). ``merge_and_unload`` needs no such check (nothing unmerges a removed
layer) and takes no fingerprints. The table also says whether the two libraries' merged weights are
the same bits (both adapters hold the same numbers).

Adapter: r = 16, alpha 32 on all linear layers of the embedded SmolLM2-135M-Instruct (fp32), non-zero
A and B. Ratios: medians of the per-round ratios (min–max).

Run: ``python benchmarks/merge.py`` (``--rounds N``, default 5).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ratio_stats  # noqa: E402

OPS = ("merge_and_unload", "merge", "unmerge")


def build(base=None):
    """(lorakit model, PEFT model) on copies of ``base`` (default: the embedded model), the PEFT
    adapter holding lorakit's numbers."""
    import peft
    import torch

    import lorakit as lk
    from lorakit.models import load_model_and_tokenizer

    if base is None:
        base, _ = load_model_and_tokenizer()
    torch.manual_seed(0)
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    mine = {name: p for name, p in ours.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").removesuffix(".weight")  # (lorakit: lora_A.<name>)
                p.copy_(mine[key])
    return ours, theirs


def _weights(model) -> dict:
    """The linear weights by module path (PEFT's prefix and base_layer left out)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and "lora_" not in name:
            out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return run(args.rounds, f"python benchmarks/merge.py --rounds {args.rounds}")


def run(rounds: int, command: str, base=None) -> dict:
    """Time the three operations over ``rounds`` rounds and print the table; returns the per-round
    ratios by operation and whether the merged weights were the same bits."""
    import lorakit as lk

    ours, theirs = build(base)
    times = {op: {"lorakit": [], "peft": []} for op in OPS}
    same_bits = None
    for i in range(rounds):
        order = ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit")
        fresh = {"lorakit": copy.deepcopy(ours), "peft": copy.deepcopy(theirs)}
        unloaded = {}
        for who in order:
            start = time.perf_counter()
            unloaded[who] = lk.merge_and_unload(fresh[who]) if who == "lorakit" else fresh[who].merge_and_unload()
            times["merge_and_unload"][who].append(time.perf_counter() - start)
        if same_bits is None:
            mine, peers = _weights(unloaded["lorakit"]), _weights(unloaded["peft"])
            same_bits = mine.keys() == peers.keys() and all(bool((mine[k] == peers[k]).all()) for k in mine)
        del fresh, unloaded
        for op in ("merge", "unmerge"):
            for who in order:
                start = time.perf_counter()
                if who == "lorakit":
                    (lk.merge if op == "merge" else lk.unmerge)(ours)
                else:
                    (theirs.merge_adapter if op == "merge" else theirs.unmerge_adapter)()
                times[op][who].append(time.perf_counter() - start)
    ratios = {op: [a / b for a, b in zip(t["lorakit"], t["peft"])] for op, t in times.items()}
    print(f"Machine: {machine()}\n")
    print(f"Command: `{command}`\n")
    print("| operation | lorakit ÷ PEFT | lorakit (ms, median) | PEFT (ms, median) |")
    print("|---|---|---|---|")
    for op in OPS:
        print(f"| {op} | {ratio_stats(ratios[op])} | {1e3 * statistics.median(times[op]['lorakit']):.0f} | "
              f"{1e3 * statistics.median(times[op]['peft']):.0f} |")
    print(f"\n{rounds} round(s). Merged weights the same bits as PEFT's: {'yes' if same_bits else 'no'}.")
    return {"ratios": ratios, "same_bits": same_bits}


if __name__ == "__main__":
    main()
