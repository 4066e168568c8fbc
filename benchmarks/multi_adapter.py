"""Mixed-adapter batches, loaded-adapter overhead and hot swap, lorakit vs PEFT, on CPU.

Model: a random Llama with SmolLM2-135M's shapes (hidden 576, 9 heads, 3 kv heads, intermediate
1536, vocab 49152, tied embeddings): ``--layers`` decoder layers for the prefill shapes (default 6, to
fit the time), ``--decode-layers`` (default all 30) for the decode shapes, loaded cost and hot swap. Adapters: r=16, alpha=32 on all seven linear projections, random non-zero.

Measured, with interleaved repeats (every configuration once per round, rounds rotated) and medians:

* mixed batch: rows cycling over 4 (and 8) different adapters (row i uses adapter i mod k, so the
  groups are not contiguous) vs the same batch with one active adapter, for a prefill-like
  forward (8 x 128 tokens, logits of the last position only, as ``generate`` does) and a one-token
  decode-like forward (16 x 1, no KV cache); PEFT 0.21 measured the same way in the same run
  (``PeftModel(input_ids, adapter_names=[...])`` vs ``set_adapter``);
* 1, 4 and 16 adapters loaded, one active (decode-like step);
* the first 8-adapter decode step after an adapter's weights changed (stacks rebuilt) vs the next;
* ``hotswap_adapter`` on the decode-depth model (milliseconds, median of 5).

Run: ``python benchmarks/multi_adapter.py`` (``--write docs/multi_adapter.md`` to update the doc).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit as lk  # noqa: E402
from _common import build_base  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
MEASUREMENTS = "## Measurements"


def add_lk_adapters(model, n_adapters: int):
    from lorakit.inject import inject_adapter

    for i in range(n_adapters):
        inject_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False), f"a{i}")
    lk.set_adapter(model, "a0")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def peft_model(base, n_adapters: int):
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    model.set_adapter("a0")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def names_for(rows: int, k: int) -> list[str]:
    return [f"a{i % k}" for i in range(rows)]


def run_rounds(cases: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per case and round; each round runs every case once, the order rotated per round.

    With one torch thread the clock is the main thread's CPU time (``time.thread_time``): on a
    machine shared with other jobs it counts the work done, not the time spent waiting for a core.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    keys = list(cases)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            order = keys[r % len(keys):] + keys[: r % len(keys)]
            for k in order:
                start = clock()
                cases[k]()
                elapsed = clock() - start
                if r >= warmup:
                    times[k].append(elapsed)
    return times


def ratio(times: dict, case, baseline) -> str:
    """Median (min–max) over rounds of time(case) / time(baseline) measured in the same round, then
    the ratio of the two fastest rounds ("best": the least disturbed, as ``timeit`` advises)."""
    per_round = [a / b for a, b in zip(times[case], times[baseline])]
    best = min(times[case]) / min(times[baseline])
    return f"{statistics.median(per_round):.3f} ({min(per_round):.2f}–{max(per_round):.2f}), best {best:.3f}"


def ms(times: dict, case) -> str:
    return f"{1000 * statistics.median(times[case]):.1f}"


def mixed_cases(lkm, pm, ids: torch.Tensor, extra: dict) -> dict:
    rows = ids.shape[0]
    cases = {
        ("lorakit", 1): lambda: lkm(ids, **extra),
        ("peft", 1): lambda: pm(input_ids=ids, **extra),
    }
    for k in (4, 8):
        names = names_for(rows, k)
        cases[("lorakit", k)] = (lambda n: lambda: lkm(ids, adapter_names=n, **extra))(names)
        cases[("peft", k)] = (lambda n: lambda: pm(input_ids=ids, adapter_names=n, **extra))(names)
    # The same 8 adapters with the rows sorted by adapter (contiguous groups: slices, no gather/scatter).
    ordered = sorted(names_for(rows, 8))
    cases[("lorakit", "8s")] = lambda: lkm(ids, adapter_names=ordered, **extra)
    cases[("peft", "8s")] = lambda: pm(input_ids=ids, adapter_names=ordered, **extra)
    return cases


def hotswap_ms(base, repeats: int = 5) -> tuple[float, int]:
    """Median ms of ``hotswap_adapter`` on ``base`` (adapter of r=16 on 7 projections)."""
    cfg = lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    model = lk.get_lora_model(base, cfg, "live")
    n_params = lk.count_parameters(model)[0]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for i in range(2):
            with torch.no_grad():
                for _, layer in lk.iter_lora_layers(model):
                    layer.lora_B["live"].normal_(std=0.01)
            dirs.append(lk.save_adapter(model, Path(tmp) / f"v{i}", adapter_name="live"))
        for i in range(repeats + 1):
            start = time.perf_counter()
            lk.hotswap_adapter(model, dirs[i % 2], "live")
            if i:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), n_params


def restack_ms(base, decode: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """Median ms of an 8-adapter mixed decode step right after an adapter's weights changed (the
    batched path rebuilds its per-layer stacks) and of the next, warm step."""
    model = add_lk_adapters(copy.deepcopy(base), 8)
    names = names_for(decode.shape[0], 8)
    cold, warm = [], []
    with torch.inference_mode():
        model(decode, adapter_names=names, use_cache=False)
        for _ in range(repeats):
            for _, layer in lk.iter_lora_layers(model):
                layer.lora_B["a3"].add_(0.0)  # an in-place update, as an optimizer step or hot swap makes
            for sink in (cold, warm):
                start = time.perf_counter()
                model(decode, adapter_names=names, use_cache=False)
                sink.append(time.perf_counter() - start)
    return 1000 * statistics.median(cold), 1000 * statistics.median(warm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers for the prefill shapes (default: 6)")
    parser.add_argument("--decode-layers", type=int, default=30,
                        help="decoder layers for decode shapes, loaded-adapter cost and hot swap (default: 30)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the prefill shapes (default: 9)")
    parser.add_argument("--decode-rounds", type=int, default=None,
                        help="interleaved rounds of the decode shapes and the loaded-adapter cost, which take "
                        "a tenth of a prefill round (default: 3 x --rounds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; with 1 (default) times are CPU time of the main thread")
    parser.add_argument("--write", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 2 + 2 layers (numbers not for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.layers, args.decode_layers = 2, 2, 2
    if args.decode_rounds is None:
        args.decode_rounds = 3 * args.rounds
    if min(args.rounds, args.decode_rounds) < 1:
        parser.error("--rounds and --decode-rounds must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(3, 49152, (8, 128), generator=gen)
    decode = torch.randint(3, 49152, (16, 1), generator=gen)
    shapes = {f"prefill 8x128, {args.layers} layers": (args.layers, prefill, {"logits_to_keep": 1, "use_cache": False}, args.rounds),
              f"decode 16x1, {args.decode_layers} layers": (args.decode_layers, decode, {"use_cache": False}, args.decode_rounds)}
    results = {}
    for label, (layers, ids, extra, rounds) in shapes.items():
        base = build_base(layers)
        lkm, pm = add_lk_adapters(copy.deepcopy(base), 8), peft_model(base, 8)
        results[label] = run_rounds(mixed_cases(lkm, pm, ids, extra), rounds)
        del lkm, pm
        print(f"[{time.perf_counter() - t0:.0f}s] {label} done", file=sys.stderr)

    # base is now the decode-depth model: loaded-adapter cost and hot swap run on it.
    loaded = {n: add_lk_adapters(copy.deepcopy(base), n) for n in (1, 4, 16)}
    load_cases = {n: (lambda m: lambda: m(decode, use_cache=False))(m) for n, m in loaded.items()}
    load_times = run_rounds(load_cases, args.decode_rounds)
    del loaded
    print(f"[{time.perf_counter() - t0:.0f}s] loaded-adapter cost done", file=sys.stderr)
    cold_ms, warm_ms = restack_ms(base, decode)
    swap_ms, swap_params = hotswap_ms(base)
    total = time.perf_counter() - t0

    cmd = "python benchmarks/multi_adapter.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"Command: `{cmd}` on {platform.machine()} ({os.cpu_count()} CPUs, shared).",
        "",
        f"Random Llama with SmolLM2-135M shapes (prefill: **{args.layers} decoder layers** of 30, to fit the "
        f"time; decode, loaded-adapter cost and hot swap: {args.decode_layers} layers), fp32, "
        f"torch {torch.__version__}, {args.threads} thread(s), "
        f"{'CPU time of the main thread' if args.threads == 1 else 'wall-clock time'}; adapters r={RANK}, alpha={ALPHA} on "
        f"{', '.join(TARGETS)}; median of {args.rounds} interleaved rounds (prefill) and {args.decode_rounds} "
        "(decode, loaded-adapter cost). Mixed batch rows cycle over "
        "k adapters (row i uses adapter i mod k: non-contiguous groups). Prefill computes the logits of "
        "the last position only (as `generate` does); decode is one token per row without a KV cache. "
        "Ratio = time / time of the same batch with one active adapter, in the same library and the "
        "same round: median (min–max) over rounds; best = fastest round ÷ fastest round.",
        "",
        "| shape | library | 1 adapter (ms) | 4 adapters (ms) | ratio 4 | 8 adapters (ms) | ratio 8 | ratio 8, rows sorted | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in results.items():
        target = "<= 1.05" if label.startswith("prefill") else "<= 1.15"  # the targets
        for lib in ("lorakit", "peft"):
            one = (lib, 1)
            lines.append(f"| {label} | {lib} | {ms(res, one)} | {ms(res, (lib, 4))} | {ratio(res, (lib, 4), one)} | "
                         f"{ms(res, (lib, 8))} | {ratio(res, (lib, 8), one)} | {ratio(res, (lib, '8s'), one)} | {target} |")
    lines += [
        "",
        f"Adapters loaded, one active (decode 16x1, {args.decode_layers} layers, lorakit):",
        "",
        "| loaded | ms | ratio to 1 loaded, median (min–max) |",
        "|---|---|---|",
        *[f"| {n} | {ms(load_times, n)} | {ratio(load_times, n, 1)} |" for n in load_times],
        "",
        f"Decode steps of 8 adapters use stacked copies of the adapters (two `bmm` per layer for all "
        f"of them), rebuilt when an adapter changes: the first step after a change took {cold_ms:.0f} ms, "
        f"the next {warm_ms:.0f} ms (medians of 5, wall clock).",
        "",
        f"Hot swap (`hotswap_adapter`, {args.decode_layers}-layer model, adapter of {swap_params:,} parameters, "
        f"read from safetensors + checked + copied in place): **{swap_ms:.0f} ms** (median of 5).",
        "",
        f"Whole benchmark: {total:.0f} s.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_report(args.write, report)
    return 0


def write_report(path: Path, report: str) -> None:
    """Put ``report`` (which starts with its "Command:" line) under the "## Measurements" heading
    of the doc at ``path``, replacing only the previous report: the prose above the heading and the
    notes between the heading and the previous report's "Command:" line stay."""
    head, notes = "# Multi-adapter inference\n\n", ""
    if path.is_file():
        head, found, section = path.read_text().partition(MEASUREMENTS)
        if not found:  # a doc without the section: keep all of it, add the section at its end
            head = head.rstrip() + "\n\n"
        notes = section.split("\nCommand: `python benchmarks/multi_adapter.py")[0].strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = f"{notes}\n\n" if notes else ""
    path.write_text(f"{head}{MEASUREMENTS}\n\n{notes}{report}\n")


if __name__ == "__main__":
    sys.exit(main())
