"""Training step: lorakit vs PEFT 0.21 (same model, rank, batch, precision, optimizer), and LoRA vs full.

Step time: the setups on copies of one loaded model in ONE process, their steps alternating (who
goes first rotates), so machine noise hits all alike; the table gives the median of the per-round
ratios (min–max) and best = fastest ÷ fastest. Peak RSS and bytes saved for backward: each setup
alone in a fresh process (so each peak is its own; every process imports peft, so its ~100 MiB
count on both sides), the setups interleaved, repeated.

    python benchmarks/train_step.py [--repeats 2] [--steps 2] [--pairs 3]

Each single-library process reports its peak RSS over ``--steps`` steps after a warm-up step.

Workloads (batch 4 × 256 tokens of the embedded SmolLM2-135M-Instruct, r = 16 on all linear layers,
lora_alpha 32, AdamW, fp32; LoRA dropout 0 — both libraries' default — and 0.05 for ``lm``; and
``lm`` with the frozen base in bf16, adapter weights fp32 in both libraries — lorakit runs the
rank-r products in bf16, as autocast would, PEFT in fp32):
- ``lm``: every position is a label (plain language-model batch);
- ``sft``: only the last 32 tokens of each row are labels (prompt masked, as in instruction tuning).
PEFT runs the usual recipe: ``model(input_ids, attention_mask, labels).loss``. lorakit runs what
``lorakit train`` runs: ``get_lora_model`` + ``use_lora_training_kernels`` (fused SwiGLU tails and
RMSNorms; its attention, causal in blocks of 64 queries, engages in bf16 only) and its training loss
(``lorakit.train.generate.loss_sum``: head + loss only at label positions, chunked); in fp32 the
frozen weights' products go to oneDNN where it pays (``lorakit.layers.gemm``: not on Intel CPUs,
where they stay with MKL, as PEFT's through ``nn.Linear`` do everywhere). The full fine-tuning step uses lorakit's loss and the same products
(``same_products_for_full``: every ``nn.Linear``'s forward, dL/dx and dL/dW through
``lorakit.layers.gemm``), so LoRA ÷ full compares like with like.

Two more PEFT setups say how much of each ratio is whose: ``peft-sameloss`` is PEFT's LoRA with
lorakit's loss (what is left is the LoRA layers and training kernels), and ``peft-autocast`` (bf16
row) is PEFT under ``torch.autocast(bfloat16)`` with ``peft.helpers.disable_input_dtype_casting``:
the rank-r products in bf16 as lorakit runs them, settings a PEFT user can choose.

LoRA ÷ full is measured in one process holding three models (copies of the base taken before
injection): LoRA as ``lorakit train`` runs it, LoRA without the training kernels (the same ops as
the full step, less the frozen weights' gradients: what the arithmetic floor 2/3 + P/N counts), and
full fine-tuning; one step of each per round, who goes first rotating, so machine noise hits all
alike: the whole step, and forward + backward alone — the part the floor describes (a full step
also runs AdamW over all N weights, which the floor leaves out). The same rounds time the model's
attention alone (every layer's SDPA call, forward + backward, at the step's shapes): work both
steps do alike, which the floor leaves out too; the table also holds forward + backward against
the floor with that work added. ``--no-plain-lora`` leaves the second LoRA setup out (a round then
takes ~2/3 of the time: the lean plan of ``make bench`` runs three rounds, ``--full-rounds 3``, in
the time of two: with two, one slow step moved the median by half its delay). That process runs
with glibc keeping the memory it frees (``KEEP_FREED``): with glibc's defaults the full step's
model-sized buffers were mapped anew from the OS each step, 144,000-510,000 page faults a step
(~2.5 µs each here) depending on the order of earlier allocations, and the ratio moved with them
(0.51-0.72 over runs); ``--glibc-defaults`` measures that way.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, ratio_stats, reset_peak_rss, run_worker, saved_for_backward  # noqa: E402

BATCH, SEQ, RANK, ANSWER = 4, 256, 16, 32
PEER_LABELS = {"peft-sameloss": "PEFT with lorakit's loss", "peft-autocast": "PEFT under bf16 autocast, input casting off"}
#: (workload, LoRA dropout, base dtype): dropout 0 is the default of both LoraConfigs and of
#: `lorakit train`, 0.05 is common in recipes; bf16 is `lorakit train`'s default on CPUs with bf16.
#: Each workload's PEFT setups besides the usual one (``setup``'s kinds).
WORKLOADS = [("lm", 0.0, "fp32", ("peft-sameloss",)), ("sft", 0.0, "fp32", ("peft-sameloss",)),
             ("lm", 0.05, "fp32", ()), ("lm", 0.0, "bf16", ("peft-autocast",))]


def make_batch(workload: str, vocab: int, shape: tuple[int, int] = (BATCH, SEQ)):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, shape, generator=g)
    labels = ids.clone()
    if workload == "sft":
        labels[:, : shape[1] - ANSWER] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def setup(kind: str, model, batch: dict, dropout: float = 0.0):
    """The compared setups on ``model``: (the model to train, its loss function).

    ``"peft"``: PEFT 0.21's LoRA and the usual ``model(**batch).loss``; ``"peft-sameloss"``: the
    same with lorakit's loss (``loss_sum`` on the model PEFT wraps); ``"peft-autocast"``: the usual
    recipe under bf16 autocast, PEFT's cast of each adapted layer's input to the adapter's fp32 off
    (``disable_input_dtype_casting``), so its rank-r products run in bf16; ``"lorakit"``: LoRA as
    ``lorakit train`` sets it up (``get_lora_model`` + ``use_lora_training_kernels``, whose attention
    engages only in bf16: at <= 128 keys, or <= 256 when causal) with its loss at label positions;
    ``"lorakit-plain"``: the same without the training kernels; ``"full"``: every weight trained, with
    lorakit's loss and no training kernels (they engage only around frozen weights). r = RANK on all
    linear layers, alpha 2·RANK.
    """
    from lorakit.train.generate import loss_sum

    if kind in ("peft", "peft-sameloss", "peft-autocast"):
        import peft
        import peft.helpers
        import torch

        cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear")
        model = peft.get_peft_model(model, cfg)
        if kind == "peft-sameloss":
            inner = model.base_model.model

            def same_loss():
                loss, n = loss_sum(inner, batch)
                return loss / n
            return model, same_loss
        if kind == "peft-autocast":
            def autocast_loss():
                with torch.autocast("cpu", dtype=torch.bfloat16), peft.helpers.disable_input_dtype_casting(model):
                    return model(**batch).loss
            return model, autocast_loss
        return model, lambda: model(**batch).loss
    import lorakit as lk
    from lorakit.train.loop import use_lora_training_kernels

    if kind in ("lorakit", "lorakit-plain"):
        lk.get_lora_model(model, lk.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules="all-linear"))
        if kind == "lorakit":
            use_lora_training_kernels(model)
    elif kind == "full":
        same_products_for_full(model)
    else:
        raise ValueError(f"unknown setup {kind!r}: expected 'peft', 'peft-sameloss', 'peft-autocast', "
                         "'lorakit', 'lorakit-plain' or 'full'")

    def loss_fn():
        loss, n = loss_sum(model, batch)
        return loss / n

    return model, loss_fn


class _TrainedLinearForward:
    """An ``nn.Linear``'s instance forward for the full fine-tuning step: its products (forward, dL/dx,
    dL/dW) by ``lorakit.layers.gemm``, the kernels lorakit's LoRA step runs its frozen products with
    (oneDNN for fp32 on a CPU where it pays, torch's own otherwise)."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, x):
        return _trained_linear().apply(x, self.module.weight, self.module.bias)


@functools.cache
def _trained_linear():
    """The autograd Function of ``_TrainedLinearForward`` (made once; torch is imported lazily here)."""
    import torch

    from lorakit.layers import gemm

    class TrainedLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return gemm.linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            need = ctx.needs_input_grad
            gx = gemm.times_weight(g2, weight).view(x.shape) if need[0] else None
            gw = gemm.linear(g2.T, x2.T) if need[1] else None        # gᵀ x
            gb = g2.sum(0) if ctx.has_bias and need[2] else None
            return gx, gw, gb

    return TrainedLinear


def same_products_for_full(model) -> int:
    """Give every ``nn.Linear`` of ``model`` the products of ``lorakit.layers.gemm`` (so the full
    fine-tuning step and the LoRA steps it is compared with multiply alike: oneDNN for fp32 on a CPU
    where it pays, ``gemm.ONEDNN_PAYS``); returns how many. The head's products are ``linear_cross_entropy``'s, on both sides."""
    from torch import nn

    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _TrainedLinearForward(module)
            count += 1
    return count


#: glibc's tunables under which freed memory stays with the process (no mmap'd chunks, no trimming):
#: the LoRA ÷ full worker's allocator (docs/training.md, "Memory given back and mapped again").
KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def keep_freed_tunables() -> str:
    """``GLIBC_TUNABLES`` for a worker: this environment's own, with ``KEEP_FREED`` after them."""
    own = os.environ.get("GLIBC_TUNABLES")
    return f"{own}:{KEEP_FREED}" if own else KEEP_FREED


def pair_worker(kinds: tuple[str, ...], workload: str, dropout: float, dtype: str, steps: int) -> dict:
    """Two or more setups (``setup`` kinds, e.g. lorakit and PEFT) on copies of one loaded model in
    one process, one step of each per round, who goes first rotating, so machine noise hits all
    alike. Returns the (whole step, forward + backward seconds, minor page faults) of each step of
    each, and the trainable / frozen parameter counts of each."""
    import copy
    import resource
    import time

    import torch

    from lorakit.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    batch = make_batch(workload, model.config.vocab_size)
    # every setup on a copy taken before injection: the loaded model's weights are mapped from the
    # file, the copies' are ordinary memory, so none of them trains on weights held otherwise
    models = {kind: copy.deepcopy(model) for kind in kinds}
    del model

    def stepper(kind, model):
        model, loss_fn = setup(kind, model, batch, dropout)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if "full" in kinds:  # LoRA vs full: AdamW as `lorakit train` runs it, for both (fused)
            from lorakit.train.loop import fused_if_supported

            opt = fused_if_supported(lambda **kw: torch.optim.AdamW(params, lr=1e-4, **kw))
        else:
            opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> tuple[float, float]:
            t0 = time.perf_counter()
            loss_fn().backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0, t1 - t0

        return step, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters() if not p.requires_grad)

    steppers = {kind: stepper(kind, m) for kind, m in models.items()}
    config = next(iter(models.values())).config
    params = {kind: steppers[kind][1:] for kind in kinds}
    if "full" in kinds:  # the attention's own work, which LoRA and full steps do alike (see attention_step)
        steppers["attention"] = (attention_step(config, batch["input_ids"].shape, dtype),)
        kinds = (*kinds, "attention")
    # Warm-up (allocates the optimizer states): one round, two beside a full step. After one warm-up
    # step of each, the first timed LoRA step still faulted in ~130,000 fresh pages (the full step's
    # warm-up had grown and given back the heap: its 0.5 GB of gradients, 1 GB of AdamW state) and ran
    # 10-20% slower (4.84 s against 4.18 / 4.27 in the next rounds), later ones 5; with the lean plan's
    # two rounds that moved the LoRA ÷ full median by half as much. After a second round the first
    # timed LoRA step faulted 5 times.
    for _ in range(2 if "full" in kinds else 1):
        for fn, *_ in steppers.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for i in range(steps):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            whole, fwd_bwd = steppers[kind][0]()
            times[kind].append((whole, fwd_bwd, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    return {"times": times, "params": params}


def attention_step(config, shape: tuple[int, int], dtype: str):
    """A function timing the model's attention alone as a training step runs it: every layer's
    causal SDPA call (transformers' own, as the model makes it) forward + backward on q, k and v of
    the step's shapes. Returns (seconds, seconds), a step's (whole, forward + backward) pair.

    LoRA and full fine-tuning run exactly this work (no weights in it), so it is part of both steps
    but not of the arithmetic floor 2/3 + P/N, which counts the weights' products only."""
    import time

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True, "training": True})()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    batch, seq = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, seq, head_dim, generator=g, dtype=dt, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=dt)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(config.num_hidden_layers):
            out = sdpa_attention_forward(module, q, k, v, None, scaling=head_dim ** -0.5)[0]
            torch.autograd.grad(out, (q, k, v), grad)
        t = time.perf_counter() - t0
        return t, t

    return step


def worker(kind: str, workload: str, steps: int, dropout: float, dtype: str = "fp32") -> dict:
    """One ``setup`` kind alone in this process: its peak RSS over ``steps`` steps after a warm-up
    step, the bytes it saves for backward, its fastest step."""
    import time

    import peft  # noqa: F401  (in every worker: the import's memory counts on both sides alike)
    import torch

    from lorakit.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()  # bf16: the frozen base in bf16; both libraries keep the adapters in fp32
    batch = make_batch(workload, model.config.vocab_size)
    model, loss_fn = setup(kind, model, batch, dropout)
    model.train()  # after the setup, as `lorakit train` does (a model.train() once undid lorakit's fused norms)

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
    loss, saved = saved_for_backward(model, loss_fn)
    loss.backward()
    opt.step()  # this first step is also the warm-up (it allocates the optimizer state)
    opt.zero_grad(set_to_none=True)
    del loss

    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"time": min(times), "peak_mb": peak_rss_mb(), "saved_mb": saved / 2**20,
            "trainable": trainable, "frozen": frozen}


def print_ratio_table(header: str, rows: list[tuple]) -> None:
    """A markdown table of step-time, peak-RSS and saved-bytes ratios: one row per ``(label, per-round
    (a, b) step times, peak ratios, saved ratios, ...)``, the step time as per-round ratios and best."""
    print(f"| {header} |\n|---|---|---|---|")
    for label, whole, peak, saved, *_ in rows:
        t = f"{ratio_stats([a / b for a, b in whole])}, best {min(a for a, _ in whole) / min(b for _, b in whole):.3f}"
        mem = [ratio_stats(v) if v else "not measured (--no-peer-memory)" for v in (peak, saved)]
        print(f"| {label} | {t} | {' | '.join(mem)} |")


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=positive, default=2)
    ap.add_argument("--steps", type=positive, default=2, help="timed steps per process; the fastest counts")
    ap.add_argument("--pairs", type=positive, default=3,
                    help="alternating step pairs in one process: lorakit / PEFT (step time) and LoRA / full")
    ap.add_argument("--full-rounds", type=positive, default=None,
                    help="rounds of the LoRA ÷ full worker (default: --pairs)")
    ap.add_argument("--no-plain-lora", action="store_true",
                    help="LoRA ÷ full without the row of LoRA without the training kernels (a round then takes "
                         "~2/3 of the time: the lean plan of make bench runs three rounds in the time of two)")
    ap.add_argument("--no-peer-memory", action="store_true",
                    help="no fresh processes for the other PEFT setups (PEFT with lorakit's loss, under autocast): "
                         "their rows give the step time only (the lean plan of make bench: three processes fewer)")
    ap.add_argument("--no-peer-rows", action="store_true",
                    help="no PEFT with lorakit's loss (the second table's fp32 rows; PEFT under bf16 autocast, the "
                         "bf16 row at the same arithmetic, stays): a third of the fp32 step-time rounds (the leaner "
                         "plan of make bench)")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="LoRA ÷ full with glibc's default allocator settings (default: its process keeps freed "
                         f"memory, GLIBC_TUNABLES={KEEP_FREED})")
    ap.add_argument("--worker", nargs=5, metavar=("KIND", "WORKLOAD", "STEPS", "DROPOUT", "DTYPE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--pair-worker", nargs=5, metavar=("KINDS", "WORKLOAD", "DROPOUT", "DTYPE", "ROUNDS"),
                    help=argparse.SUPPRESS)  # KINDS: comma-separated setup kinds
    args = ap.parse_args()
    if args.pair_worker:
        kinds, workload, dropout, dtype, rounds = args.pair_worker
        print(json.dumps(pair_worker(tuple(kinds.split(",")), workload, float(dropout), dtype, int(rounds))))
        return
    if args.worker:
        kind, workload, steps, dropout, dtype = args.worker
        print(json.dumps(worker(kind, workload, int(steps), float(dropout), dtype)))
        return
    script = Path(__file__)
    rows, extra_rows = [], []
    for workload, dropout, dtype, others in WORKLOADS:
        kinds = ("lorakit", "peft", *(o for o in others if not (args.no_peer_rows and o == "peft-sameloss")))
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for kind in kinds if repeat == 0 and not args.no_peer_memory else kinds[:2]:  # (the others: once)
                runs[kind].append(run_worker(script, [kind, workload, str(args.steps), str(dropout), dtype]))
                print(f"  {workload} p={dropout} {dtype} {kind}: {runs[kind][-1]}", file=sys.stderr, flush=True)
        pair = run_worker(script, [], extra=["--pair-worker", ",".join(kinds), workload, str(dropout), dtype,
                                             str(args.pairs)])
        print(f"  {workload} p={dropout} {dtype} {'/'.join(kinds)}: {pair}", file=sys.stderr, flush=True)
        label = f"{workload}, dropout {dropout:g}, {dtype}"
        for peer in kinds[1:]:
            whole = [(a[0], b[0]) for a, b in zip(pair["times"]["lorakit"], pair["times"][peer])]
            m = [a["peak_mb"] / b["peak_mb"] for a, b in zip(runs["lorakit"], runs[peer])]
            s = [a["saved_mb"] / b["saved_mb"] for a, b in zip(runs["lorakit"], runs[peer])]
            row = (label, whole, m, s, {"lorakit": runs["lorakit"], peer: runs[peer]})
            if peer == "peft":
                rows.append((label + (" base (rank-r products: lorakit bf16, PEFT fp32)" if dtype == "bf16" else ""),
                             *row[1:]))
            else:
                extra_rows.append((f"{label} vs {PEER_LABELS[peer]}", *row[1:]))
    # LoRA ÷ full: once, on the fp32 lm workload without dropout, its models (two with --no-plain-lora) in one process
    full_rounds = args.pairs if args.full_rounds is None else args.full_rounds
    full_kinds = "lorakit,full" if args.no_plain_lora else "lorakit,lorakit-plain,full"
    full = run_worker(script, [], extra=["--pair-worker", full_kinds, "lm", "0", "fp32", str(full_rounds)],
                      env=None if args.glibc_defaults else {"GLIBC_TUNABLES": keep_freed_tunables()})
    print(f"  lora vs full: {full}", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}\n")
    print(f"Command: `python benchmarks/train_step.py --repeats {args.repeats} --steps {args.steps} --pairs {args.pairs}"
          f"{f' --full-rounds {args.full_rounds}' if args.full_rounds is not None else ''}"
          f"{' --no-plain-lora' if args.no_plain_lora else ''}{' --no-peer-memory' if args.no_peer_memory else ''}"
          f"{' --no-peer-rows' if args.no_peer_rows else ''}{' --glibc-defaults' if args.glibc_defaults else ''}`\n")
    print(f"Step time: {args.pairs} rounds in one process of one step of each setup (lorakit, PEFT and, where the "
          "second table lists one, another PEFT setup; each on its own copy of one loaded model), who goes first "
          "rotating; median of the per-round ratios (min–max), and best = fastest ÷ fastest. Peak RSS "
          f"and saved bytes: each setup alone in a fresh process ({args.repeats} interleaved "
          f"repeat(s) of lorakit and PEFT, {'none' if args.no_peer_memory else 'one'} of the other PEFT setups), so "
          "each peak is its own; every process "
          "imports peft. Saved bytes: the storages autograd "
          "keeps for backward (`saved_tensors_hooks`), plus lorakit's dropout masks, which its nodes keep as bits.\n")
    counts = {key: rows[0][4][key][0]["trainable"] for key in ("lorakit", "peft")}
    from lorakit.layers import gemm

    kernel = ("oneDNN where torch's own `nn.Linear` runs MKL's sgemm" if gemm.ONEDNN_PAYS else
              "MKL's sgemm, as torch's own `nn.Linear` (oneDNN does not pay on an Intel CPU: `lorakit.layers.gemm`)")
    print(f"What is compared: the same model, adapters (r {RANK} on all linear layers: {counts['lorakit']:,} trainable "
          f"numbers in lorakit, {counts['peft']:,} in PEFT), batch and AdamW (torch's default implementation on "
          "both sides here; `lorakit train` itself uses the fused one); lorakit as `lorakit train` runs it "
          f"(its LoRA layers and training kernels, its fp32 products with the frozen weights in {kernel}, "
          "and the head + loss computed only at label positions, in chunks) "
          "against PEFT's usual `model(**batch).loss` (full logits). So in the sft row lorakit's head runs on the "
          f"{BATCH * ANSWER} label rows, PEFT's on all {BATCH * SEQ}. In the "
          "bf16 row both keep the adapter weights in fp32, but lorakit runs the rank-r products in bf16 (as bf16 "
          "autocast would; fp32 accumulation) and PEFT in fp32 (it casts each adapted layer's input to fp32, which "
          "is most of its saved bytes there): lorakit's default, not the same arithmetic (the second table holds "
          "PEFT under bf16 autocast, which is); lorakit's attention kernel also replaces SDPA there (it engages in "
          "bf16 only, at up to 256 causal keys, as in `lorakit train`).\n")
    print_ratio_table("workload | step time lorakit ÷ PEFT | peak RSS lorakit ÷ PEFT | saved-for-backward lorakit ÷ PEFT",
                      rows)
    print("\nWhose is each ratio: lorakit against PEFT set up otherwise in the same runs. "
          + ("" if args.no_peer_rows else "With lorakit's loss (head + loss at label positions, in chunks) PEFT "
             "keeps the usual recipe's LoRA layers, so what is left of the ratio is lorakit's LoRA layers and "
             "training kernels; ")
          + "under bf16 autocast with its input casting off (`peft.helpers.disable_input_dtype_casting`) PEFT runs "
          "the rank-r products in bf16 as lorakit does, with its usual loss."
          + (" (PEFT with lorakit's loss not measured: --no-peer-rows.)" if args.no_peer_rows else "") + "\n")
    print_ratio_table("workload vs | step time | peak RSS | saved-for-backward", extra_rows)
    trainable, frozen = full["params"]["lorakit"]
    floor = 2 / 3 + trainable / frozen
    allocator = ("glibc's default allocator settings" if args.glibc_defaults else
                 f"glibc keeping freed memory for the next step, GLIBC_TUNABLES={KEEP_FREED}, for both steps alike")
    print(f"\nLoRA ÷ full fine-tuning (lm, dropout 0, fp32; {full_rounds} rounds of one step each in one process "
          f"after two warm-up rounds, who goes first rotating, with {allocator}; arithmetic floor 2/3 + P/N = "
          f"{floor:.3f}):\n")
    # the attention's share of the full step's forward + backward, per round: a floor that also counts
    # that work (the same in both steps) is floor + (1 - floor) * share
    shares = [a[1] / f[1] for a, f in zip(full["times"]["attention"], full["times"]["full"])]
    floor_attn = [floor + (1 - floor) * s for s in shares]
    print("| LoRA setup | whole step (with AdamW) | forward + backward | forward + backward against the floor "
          "| against the floor with the attention |")
    print("|---|---|---|---|---|")
    for kind, label in (("lorakit", "as `lorakit train` runs it (LoRA layers, training kernels, loss at labels)"),
                        ("lorakit-plain", "the same ops as the full step (LoRA layers and loss, no training kernels)")):
        if kind not in full["times"]:
            print(f"| {label} | not measured (--no-plain-lora) | | | |")
            continue
        cols = []
        for k in (0, 1):  # whole step, forward + backward
            lora, fullt = [t[k] for t in full["times"][kind]], [t[k] for t in full["times"]["full"]]
            ratios = [a / b for a, b in zip(lora, fullt)]
            cols.append(f"{ratio_stats(ratios)}, best {min(lora) / min(fullt):.3f}")
        cols.append(f"{100 * (statistics.median(ratios) / floor - 1):+.1f}%")
        cols.append(f"{100 * (statistics.median(r / f for r, f in zip(ratios, floor_attn)) - 1):+.1f}%")
        print(f"| {label} | {' | '.join(cols)} |")
    faults = {k: statistics.median(t[2] for t in full["times"][k]) for k in ("lorakit", "full")}
    print(f"\nMinor page faults per step (median): LoRA {faults['lorakit']:,.0f}, full {faults['full']:,.0f} (each a "
          "fresh 4 KiB page the allocator maps: the full step's gradients are model-sized, the tied embedding's "
          "alone 113 MB, and where glibc hands such memory back and maps it again, the time that costs, ~2.5 µs a "
          "page here, is in the full step but not in the floor. glibc's defaults map the full step's model-sized "
          "buffers anew each step: 144,000–510,000 faults a full step were measured so, and LoRA ÷ full moved "
          "between 0.51 and 0.72 over runs with them; so this worker keeps freed memory unless --glibc-defaults, "
          "as docs/training.md suggests for long runs).")
    print("\nMedian of the per-round ratios (min–max); best = fastest LoRA step ÷ fastest full step "
          "(noise only ever slows a step down). Both steps use fused AdamW, as `lorakit train` does. The floor "
          "counts the weights' products of forward and backward only: the full step's AdamW over all N weights, "
          "which the whole-step ratio includes, is not in it, nor are the attention's own products (no weights; "
          "the same in both steps), so forward + backward is the column to hold against it. The full step runs "
          "lorakit's loss (whose head sums its weight gradient in place) and its products' kernels (in fp32 "
          f"{'oneDNN' if gemm.ONEDNN_PAYS else 'MKL'}'s, for the forward, dL/dx and dL/dW of every other linear layer, as the LoRA steps multiply) but none of the training kernels, which engage only around "
          "frozen weights (fused "
          "SwiGLU tail, q/k/v as one node, RMSNorm output recomputed): the second row does the same work as the "
          "full step less the frozen weights' gradients; the first is what the kernels take off that. "
          "The last column holds forward + backward against that floor with the attention added, measured in "
          "the same rounds: every layer's causal SDPA call forward + backward at the step's shapes took "
          f"{ratio_stats(shares)} of the full step's forward + backward, so that floor is "
          f"{ratio_stats(floor_attn)} (floor + (1 − floor) × share; the norms, rotary embedding, SiLU and the "
          "loss's softmax, also the same in both steps, are still left out of it). "
          "Full step medians: "
          f"{statistics.median(t[0] for t in full['times']['full']):.2f} s whole, "
          f"{statistics.median(t[1] for t in full['times']['full']):.2f} s forward + backward.")
    print("\nAbsolute medians (for scale only; this machine is noisy): step s from the alternating pairs; "
          "peak RSS and saved bytes from the single-library processes.\n")
    print("| workload | run | step s | peak RSS MiB | saved MiB |")
    print("|---|---|---|---|---|")
    for workload, whole, _, _, runs in rows:
        for i, (key, vals) in enumerate(runs.items()):
            print(f"| {workload} | {key} | {statistics.median(w[i] for w in whole):.2f} | "
                  f"{statistics.median(v['peak_mb'] for v in vals):.0f} | {statistics.median(v['saved_mb'] for v in vals):.0f} |")


if __name__ == "__main__":
    main()
