"""LoRA variants side by side on the embedded task (same data, seed, steps and hyper-parameters).

    python benchmarks/variants_compare.py [--steps 10] [--batch-size 4] [--ranks 8 64] [--eval 48] [--json out.json]

Methods: lora, rslora (alpha/√r), dora, pissa (``pissa_niter_4``), loraplus (η_B = 16·η_A) and
qlora (NF4 base, LoRA on top), each at every rank, on SmolLM2-135M-Instruct / rotten-tomatoes
sentiment (lorakit.train.data). Every run is a fresh subprocess, so the peak resident memory
(ru_maxrss) belongs to that run alone. Reported: held-out loss on answer tokens, 2-way accuracy
(is the reference label's first token more likely than the other label's, at the answer position;
one forward pass, no generation), mean step time (steps 3..N), peak RSS.

The loop here is deliberately minimal (AdamW, linear warm-up + cosine, clip 1.0, loss on answer
tokens via lorakit.train.generate.loss_sum): lorakit.train.loop.train builds its own plain-LoRA
config and AdamW, so it has no hook yet for a variant's LoraConfig fields, a LoRA+ optimizer or a
quantised base.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("lora", "rslora", "dora", "pissa", "loraplus", "qlora")


def lora_config(method: str, rank: int, alpha: float):
    """The LoraConfig a method uses (LoRA+ and QLoRA use plain LoRA's)."""
    import lorakit as lk

    extra = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True},
             "pissa": {"init_lora_weights": "pissa_niter_4"}}.get(method, {})
    return lk.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM", **extra)


@torch.no_grad()
def evaluate_fast(model, tok, data, batch_size: int) -> tuple[float, float]:
    """(mean loss per answer token, 2-way accuracy) in one forward pass per batch.

    Accuracy: at the first answer position, is the logit of the reference label's first token
    higher than the other label's ("positive" vs "negative")? Same data as the training loop's
    generated-answer accuracy, without the cost of generation.
    """
    from lorakit.train.data import iter_eval_batches
    from lorakit.train.generate import IGNORE_INDEX, _label_rows

    first = {tok(w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")}
    if len(first) != 2:
        raise ValueError("the two labels share their first token; cannot score them apart")
    pos, neg = sorted(first)
    total, count, correct, n = 0.0, 0, 0, 0
    model.eval()
    for _, batch in iter_eval_batches(data, batch_size, tok.pad_token_id):
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        # Only the answer positions go through the head (as loss_sum does): no (tokens x vocab) logits.
        rows, head = _label_rows(model, batch, mask)
        logits = (rows if head is None else head(rows)).float()  # (n_labels, vocab), rows in order
        total += float(torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum"))
        count += int(mask.sum())
        offset = 0
        for row in range(labels.shape[0]):
            ref = int(labels[row][mask[row]][0])
            other = neg if ref == pos else pos
            correct += bool(logits[offset, ref] > logits[offset, other])
            offset += int(mask[row].sum())
            n += 1
    return total / max(count, 1), correct / max(n, 1)


def run_one(method: str, rank: int, args: argparse.Namespace) -> dict:
    """Train one (method, rank) and evaluate it; returns the measurements."""
    import lorakit as lk
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.data import collate, epoch_batches, load_rotten_tomatoes, tokenize_all
    from lorakit.train.generate import loss_sum

    torch.manual_seed(args.seed)
    model, tok = load_model_and_tokenizer()
    pad = tok.pad_token_id
    train_ex, test_ex = load_rotten_tomatoes()
    train = tokenize_all(tok, train_ex[: args.steps * args.batch_size], args.max_length)
    test = tokenize_all(tok, test_ex[: args.eval], args.max_length)
    if method == "base":
        loss, acc = evaluate_fast(model, tok, test, 16)
        return {"method": "base", "rank": 0, "eval_loss": loss, "accuracy": acc,
                "step_s": None, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if method == "qlora":
        lk.quantize_model_nf4(model, skip=["lm_head"])
    t_setup = time.time()
    lk.get_lora_model(model, lora_config(method, rank, args.alpha))
    setup_s = time.time() - t_setup
    model.config.use_cache = False
    if method == "loraplus":
        opt = lk.create_loraplus_optimizer(model, lr=args.lr, ratio=16)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    warmup = max(1, math.ceil(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))))
    order = epoch_batches([len(t.input_ids) for t in train], args.batch_size, args.seed, 0)
    model.train()
    times, losses = [], []
    for step in range(args.steps):
        batch = collate([train[i] for i in order[step % len(order)]], pad)
        t0 = time.time()
        loss, n = loss_sum(model, batch)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
        losses.append(float(loss) / max(n, 1))
    loss, acc = evaluate_fast(model, tok, test, 16)
    steady = times[2:] if len(times) > 3 else times
    return {"method": method, "rank": rank, "eval_loss": loss, "accuracy": acc,
            "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]), "step_s": sum(steady) / len(steady),
            "setup_s": setup_s, "trainable": lk.count_parameters(model)[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleaved_step_times(methods: list[str], rank: int, args: argparse.Namespace,
                           rounds: int = 4) -> dict[str, tuple[float, float]]:
    """Median training-step time and resident model size (parameters + buffers, MiB) of each method.

    Step times are measured round-robin in one process.

    On a shared machine the load changes from one run to the next, so the per-run step times of
    the sweep are not comparable; here every method's step k runs right after the others' step k.
    """
    import copy
    import statistics

    import lorakit as lk
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.data import collate, epoch_batches, load_rotten_tomatoes, tokenize_all
    from lorakit.train.generate import loss_sum

    torch.manual_seed(args.seed)
    base, tok = load_model_and_tokenizer()
    train = tokenize_all(tok, load_rotten_tomatoes()[0][: rounds * args.batch_size], args.max_length)
    order = epoch_batches([len(t.input_ids) for t in train], args.batch_size, args.seed, 0)
    setups = {}
    for method in methods:
        model = copy.deepcopy(base)
        if method == "qlora":
            lk.quantize_model_nf4(model, skip=["lm_head"])
        lk.get_lora_model(model, lora_config(method, rank, args.alpha))
        model.config.use_cache = False
        model.train()
        opt = (lk.create_loraplus_optimizer(model, lr=args.lr, ratio=16) if method == "loraplus" else
               torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr))
        setups[method] = (model, opt)
    del base
    times: dict[str, list[float]] = {m: [] for m in methods}
    for k in range(rounds + 1):
        batch = collate([train[i] for i in order[k % len(order)]], tok.pad_token_id)
        for method, (model, opt) in setups.items():
            t0 = time.time()
            loss, n = loss_sum(model, batch)
            (loss / max(n, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k:  # the first round warms up
                times[method].append(time.time() - t0)
    sizes = {m: (sum(p.numel() * p.element_size() for p in model.parameters())
                 + sum(b.numel() * b.element_size() for b in model.buffers())) / 2**20
             for m, (model, _) in setups.items()}
    return {m: (statistics.median(v), sizes[m]) for m, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + ["base"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--eval", type=int, default=48, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--timing-only", action="store_true",
                        help="only measure step times, round-robin over the methods in one process, per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing_only:
        for rank in args.ranks:
            times = interleaved_step_times([m for m in args.methods if m != "base"], rank, args)
            print(f"r={rank} interleaved median step time (s) / resident model (MiB): "
                  + ", ".join(f"{m} {t:.2f} / {mb:.0f}" for m, (t, mb) in times.items()), flush=True)
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), args)), flush=True)
        return
    passthrough = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--max-length={args.max_length}",
                   f"--lr={args.lr}", f"--alpha={args.alpha}", f"--eval={args.eval}", f"--seed={args.seed}",
                   f"--threads={args.threads}"]
    jobs = [("base", 0)] + [(m, r) for r in args.ranks for m in args.methods if m != "base"]
    rows = []
    t0 = time.time()
    for method, rank in jobs:
        out = subprocess.run([sys.executable, __file__, "--one", method, str(rank), *passthrough],
                             capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} r={rank} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        r = rows[-1]
        if args.json:  # written after every run, so a long sweep leaves partial results
            Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"{method:9s} r={rank:<3d} eval loss {r['eval_loss']:.4f} acc {r['accuracy']:.3f} "
              f"step {r['step_s'] or 0:.2f}s peak {r['peak_rss_mb']:.0f} MB  ({time.time() - t0:.0f}s)", flush=True)
    print(f"\n{args.steps} steps x batch {args.batch_size}, lr {args.lr:g}, alpha {args.alpha:g}, seed {args.seed}, "
          f"all-linear, eval on {args.eval} held-out examples; total {time.time() - t0:.0f}s\n")
    print("| method | r | eval loss | accuracy | step time (s) | peak RSS (MB) | trainable params |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "–"
        print(f"| {r['method']} | {r['rank'] or '–'} | {r['eval_loss']:.4f} | {r['accuracy']:.3f} | {step} | "
              f"{r['peak_rss_mb']:.0f} | {r.get('trainable', 0):,} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
