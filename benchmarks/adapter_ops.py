"""Adapter operations, lorakit ÷ PEFT 0.21, on the embedded model: inject, save, load, merge.

Each operation is timed on lorakit and on PEFT in the same rounds, who goes first alternating:

* ``inject``: ``lk.get_lora_model`` / ``peft.get_peft_model`` on a fresh copy of the base model;
* ``save``: ``lk.save_adapter`` / ``save_pretrained`` (the same adapter numbers; lorakit's write
  is atomic and synced to disk, PEFT's is neither);
* ``load``: ``lk.load_adapter`` / ``PeftModel.from_pretrained`` of the files each saved, into a
  fresh copy of the base model;
* ``merge_and_unload``: fold the adapter in and remove the LoRA layers (on fresh copies of two LoRA
  models made before the clock starts);
* ``merge``, then ``unmerge``: fold in and take out again, the LoRA layers kept (lorakit's
  ``lk.merge`` / ``lk.unmerge``, PEFT's ``merge_adapter`` / ``unmerge_adapter``), on the same two
  models round after round.

lorakit does more than PEFT in the last pair: its merge keeps a fingerprint of each merged
adapter's tensors (``lorakit.layers.guard``), and its unmerge checks them, refusing to subtract an
adapter changed since it was merged where PEFT subtracts whatever the adapter holds now
(tests/test_merge_guard.py). ``merge_and_unload`` needs no such check (nothing unmerges a removed
layer) and takes no fingerprints. The table also says whether the two libraries' merged weights are
the same bits (both adapters hold the same numbers).

Adapter: r = 16, alpha 32 on all linear layers of the embedded SmolLM2-135M-Instruct (fp32), non-zero
A and B. One round first, untimed (one-time costs: imports, first allocations); then ratios: medians
of the per-round ratios (min–max), the garbage collector paused during each timed call.

Run: ``python benchmarks/adapter_ops.py`` (``--rounds N``, default 5).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ratio_stats  # noqa: E402

OPS = ("inject", "save", "load", "merge_and_unload", "merge", "unmerge")
CONFIG = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)


def build(base):
    """(lorakit model, PEFT model) on copies of ``base``, the PEFT adapter holding lorakit's numbers."""
    import peft
    import torch

    import lorakit as lk

    torch.manual_seed(0)
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**CONFIG))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
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
    from lorakit.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer()
    return run(args.rounds, f"python benchmarks/adapter_ops.py --rounds {args.rounds}", base)


def _timed(fn):
    """``(fn(), seconds)``, with Python's cyclic garbage collector run before and paused during the
    call (as ``timeit`` does): a collection over the heap of the copies of the model this script
    keeps, falling into one library's call and not the other's, moved single rounds by 2-6x."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start
    finally:
        gc.enable()


def run(rounds: int, command: str, base) -> dict:
    """Time the operations over ``rounds`` rounds on adapters over ``base`` and print the table;
    returns the per-round ratios by operation and whether the merged weights were the same bits."""
    import peft

    import lorakit as lk

    ours, theirs = build(base)
    times = {op: {"lorakit": [], "peft": []} for op in OPS}
    same_bits = None
    calls = {
        "inject": {"lorakit": lambda m: lk.get_lora_model(m, lk.LoraConfig(**CONFIG)),
                   "peft": lambda m: peft.get_peft_model(m, peft.LoraConfig(**CONFIG))},
        "save": {"lorakit": lambda d: lk.save_adapter(ours, d), "peft": lambda d: theirs.save_pretrained(d)},
        "load": {"lorakit": lambda m, d: lk.load_adapter(m, d), "peft": lambda m, d: peft.PeftModel.from_pretrained(m, d)},
        "merge_and_unload": {"lorakit": lk.merge_and_unload, "peft": lambda m: m.merge_and_unload()},
        "merge": {"lorakit": lambda: lk.merge(ours), "peft": theirs.merge_adapter},
        "unmerge": {"lorakit": lambda: lk.unmerge(ours), "peft": theirs.unmerge_adapter},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(-1, rounds):  # (round -1: the warm-up, untimed)
            order = ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit")
            for op in OPS:
                if op in ("inject", "load", "merge_and_unload"):  # (each on fresh copies, made off the clock)
                    made = {who: copy.deepcopy(base if op != "merge_and_unload" else ours if who == "lorakit" else theirs)
                            for who in order}
                    outs = {}
                    for who in order:
                        args = (made[who], f"{tmp}/{who}{i}") if op == "load" else (made[who],)
                        outs[who], seconds = _timed(lambda: calls[op][who](*args))
                        times[op][who].append(seconds)
                    if op == "merge_and_unload" and same_bits is None:
                        mine, peers = _weights(outs["lorakit"]), _weights(outs["peft"])
                        same_bits = mine.keys() == peers.keys() and all(bool((mine[k] == peers[k]).all()) for k in mine)
                    del made, outs
                elif op == "save":
                    for who in order:
                        times[op][who].append(_timed(lambda: calls[op][who](f"{tmp}/{who}{i}"))[1])
                else:
                    for who in order:
                        times[op][who].append(_timed(calls[op][who])[1])
    times = {op: {who: seconds[1:] for who, seconds in t.items()} for op, t in times.items()}  # (less the warm-up)
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
