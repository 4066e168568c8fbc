"""The training loop: LoRA (or full) fine-tuning of a causal LM with resumable checkpoints.

One obvious path, top to bottom in ``train``:

1. read and validate all data (a bad line fails before any model is loaded);
2. load the model, inject LoRA (``--method lora``) or unfreeze everything (``--method full``);
3. AdamW over the trainable parameters, linear warm-up then cosine decay, gradient clipping,
   gradient accumulation; loss only on answer tokens, logits only where there are labels;
4. evaluate before, train, evaluate after; print the table and write the run directory.

Under ``torchrun`` the same loop runs in every process, each on its share of every micro-batch,
with one gradient sum per step (``lorakit.train.distributed``); the first process writes the files.

Resuming is exact because everything a step depends on is either saved or a pure function of
(seed, step): parameters, AdamW moments and the scheduler are saved; the batch order of an
epoch is recomputed from ``(seed, epoch)``; the torch RNG (dropout) is saved. A run killed at any
moment and resumed therefore ends with the same adapter as an uninterrupted run.

Run directory layout (``runs/<name>/``)::

    adapter_config.json, adapter_model.safetensors   the trained adapter (PEFT format), or
    model/                                           the full fine-tune (transformers format)
    lorakit_run.json      base model, config, before/after metrics
    train_config.yaml     the exact configuration (for --resume and reproducibility)
    log.jsonl             one line per step (+ eval lines);  loss.png  the loss curve
    eval.jsonl            the held-out examples the table was measured on
    checkpoint/           the latest resumable state
"""
from __future__ import annotations

import array
import contextlib
import copy
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from lorakit.config import read_json_object
from lorakit.inject import get_state
from lorakit.io import atomic_write_bytes, write_new_directory
from lorakit.models import checkpointing_on, disable_checkpointing, enable_checkpointing
from lorakit.ops.attention import restore_attention
from lorakit.train.config import RESUME_FIXED, TrainConfig, target_module_spec
from lorakit.train.data import (BUILTIN_TASK, Example, Tokenized, collate, epoch_batches,
                                load_examples, pad_id_of, read_jsonl, tokenize_all, write_jsonl)
from lorakit.train.distributed import Dist, setup as setup_distributed
from lorakit.train.generate import (RUN_INFO, NothingToScore, auto_threads, autocast, eval_loss_sum, evaluate,
                                    fit_to_positions, format_metric, loss_sum, quantize_qlora_base, read_run_info,
                                    resolve_precision)

CHECKPOINT = "checkpoint"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped and kept its last good checkpoint."""


class SimulatedKill(BaseException):
    """Raised by test hooks to stop a run the way SIGKILL would: no cleanup, no checkpoint."""


@dataclass
class TrainResult:
    """What a run produced (also written to ``lorakit_run.json``)."""

    run_dir: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_mb: float = 0.0  # (of this process: each of several holds its own model)
    losses: list[float] = field(default_factory=list)
    processes: int = 1  # how many trained it (torchrun): a step's batch is this many shares
    train_examples: int = 0  # size of the training set (a step takes at most this many)


# --------------------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak LR at ``step`` (0-based; step k is the (k+1)-th optimizer step): linear
    warm-up from 1/(warmup+1), then a cosine decay towards 0 that the last step does not quite reach."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> tuple[int, int]:
    """``(batches_per_epoch, total_optimizer_steps)`` for a dataset of ``n_examples`` (``world``
    processes: each micro-batch holds ``cfg.batch_size`` examples per process)."""
    per_epoch = math.ceil(n_examples / (cfg.batch_size * world))
    if cfg.max_steps:
        return per_epoch, cfg.max_steps
    return per_epoch, max(1, math.ceil(math.ceil(cfg.epochs * per_epoch) / cfg.grad_accum))


def step_micro_batches(cfg: TrainConfig, step: int, per_epoch: int) -> range:
    """The run-wide indices of optimizer step ``step``'s micro-batches: ``cfg.grad_accum`` of them,
    except that a run sized by ``--epochs`` ends where its epochs do, so its last step may have fewer
    (``--epochs 1`` sees each example once). A ``--max-steps`` run wraps into further epochs."""
    start = step * cfg.grad_accum
    end = start + cfg.grad_accum
    if not cfg.max_steps:
        end = min(end, max(1, math.ceil(cfg.epochs * per_epoch)))
    return range(start, end)


def micro_batch(data: list[Tokenized], cfg: TrainConfig, index: int, per_epoch: int, pad_id: int,
                cache: dict[int, list[list[int]]], dist: Dist = Dist()
                ) -> tuple[int, dict[str, torch.Tensor] | None, int]:
    """The ``index``-th micro-batch of the run (epochs wrap around).

    Returns ``(epoch, batch, n_labels)``: the batch is this process's share of the micro-batch
    (all of it in a single process; None where a short last batch leaves this process nothing),
    ``n_labels`` the loss positions of the whole micro-batch, which every process divides by.
    """
    epoch, pos = divmod(index, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches([len(t.input_ids) for t in data], cfg.batch_size * dist.world, cfg.seed, epoch)
    items = cache[epoch][pos]
    # the loss is over the shifted labels: position 0 is never predicted
    n_labels = sum(data[i].n_predicted for i in items)
    mine = dist.share(items)
    return epoch, collate([data[i] for i in mine], pad_id) if mine else None, n_labels


# --------------------------------------------------------------------------- model set-up
def prepare_model(model: Any, cfg: TrainConfig, base_name: str | None) -> Any:
    """Inject LoRA (frozen base) or make every weight trainable (full fine-tuning).

    Also switches SDPA attention to ``lorakit.ops.attention`` (faster bf16 backward at short
    lengths; ``train`` switches it back when the loop ends). It engages where q, k and v are half
    precision: LoRA on a bf16 base. A full fine-tune in bf16 runs an fp32 model under autocast,
    where transformers' rotary embedding hands the attention fp32 tensors, so SDPA runs there.
    """
    from lorakit.ops.attention import use_lorakit_attention

    use_lorakit_attention(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from lorakit import LoraConfig, get_lora_model

    # names or dotted name ends (a list entry matches a full name or its end at a dot), or a regex
    targets = target_module_spec(cfg.target_modules)
    if cfg.method == "qlora":
        quantize_qlora_base(model)  # QLoRA: the frozen base held in NF4 (train() has done it already)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                      init_lora_weights=True if cfg.init == "default" else cfg.init,
                      task_type="CAUSAL_LM", base_model_name_or_path=base_name)
    model = get_lora_model(model, lcfg)
    use_lora_training_kernels(model)
    return model


def use_lora_training_kernels(model: Any) -> None:
    """lorakit's training kernels on a model with LoRA injected (``prepare_model`` and the train-step
    benchmark use this one list): SwiGLU MLPs (Llama, SmolLM2, Qwen2, Mistral, ...) keep 2 instead of
    4 wide tensors for backward, the LoRA nodes after each RMSNorm rebuild its output instead of
    keeping it, q/k/v projections (and the MLP's gate/up) run as one node each, and SDPA attention
    becomes ``lorakit.ops.attention`` (engages in bf16 at <= 128 keys, <= 256 when causal)."""
    from lorakit.ops import fuse_qkv_projections, fuse_rmsnorms, fuse_swiglu_mlps, use_lorakit_attention

    fuse_swiglu_mlps(model)
    fuse_qkv_projections(model)
    fuse_rmsnorms(model)
    use_lorakit_attention(model)


def _undo_kernels(model: Any, attention_before: str | None) -> None:
    """Undo ``use_lora_training_kernels`` (they serve training only), and the attention switch when
    the model came with SDPA: a model given to ``train`` goes back to its caller unpatched."""
    from lorakit.ops import unfuse_qkv_projections, unfuse_rmsnorms, unfuse_swiglu_mlps
    from lorakit.ops.patching import hub_kernels_back

    unfuse_swiglu_mlps(model)
    unfuse_qkv_projections(model)
    unfuse_rmsnorms(model)
    hub_kernels_back(model)  # (the kernels turned them off: model.train() would have undone the fused norms)
    if attention_before == "sdpa":
        restore_attention(model)


def fused_if_supported(make: Callable[..., torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """``make(fused=True)``: AdamW's fused implementation, one pass over all tensors per step, where
    torch has it for these parameters (CPU since torch 2.4, CUDA); else ``make()``.

    The same update up to rounding (~1e-8 apart after three steps); on this repo's CPU a step over
    the demo's 420 LoRA tensors (2.4M numbers) took 6.1 ms instead of 16.5 ms, and on a GPU it
    replaces hundreds of small kernel launches with a few."""
    try:
        return make(fused=True)
    except (RuntimeError, ValueError, TypeError):  # torch refuses fused for these tensors or version
        return make()


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters by name (what a checkpoint must restore)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- shared evaluation
def evaluate_shared(dist: Dist, model: Any, tokenizer: Any, examples: list[Example], max_length: int,
                    batch_size: int, precision: str) -> dict[str, Any]:
    """``evaluate`` with the held-out examples dealt out over the processes (every ``world``-th
    example from ``rank``; a single process evaluates them all): the same loss (summed over the
    answer tokens of all shares, then divided) and accuracy (correct answers over all shares), the
    predictions in the examples' order. Every process gets the combined result."""
    if dist.world == 1:
        return evaluate(model, tokenizer, examples, max_length, batch_size, precision)
    error = None
    try:
        part = evaluate(model, tokenizer, dist.share(examples), max_length, batch_size, precision)
    except NothingToScore as exc:  # this share has nothing to score (the others may)
        part, error = None, str(exc)
    everyone = dist.gather_objects(part)  # in rank order
    for rank, p in enumerate(everyone):
        for q in p["predictions"] if p is not None else []:
            q["example"] = rank + dist.world * q["example"]  # its place in ``examples``
    parts = [p for p in everyone if p is not None]
    if not parts:  # (every process raises alike, none waits for another)
        raise NothingToScore(error or "eval data: nothing to score")
    n_labels = sum(p["n_labels"] for p in parts)
    predictions = sorted((q for p in parts for q in p["predictions"]), key=lambda q: q["example"])
    correct = sum(q["correct"] for q in predictions)
    return {"loss": sum(p["loss"] * p["n_labels"] for p in parts) / max(n_labels, 1),
            "accuracy": correct / len(predictions) if predictions else None, "n": sum(p["n"] for p in parts),
            "n_dropped": len(examples) - sum(p["n"] for p in parts),
            "n_labels": n_labels, "n_accuracy": len(predictions), "n_generated": sum(p["n_generated"] for p in parts),
            "predictions": predictions}


def eval_loss_shared(dist: Dist, model: Any, data: list[Tokenized], batch_size: int, pad_id: int,
                     precision: str) -> float:
    """Mean cross-entropy per answer token over ``data``, each process scoring its share."""
    total, count = eval_loss_sum(model, dist.share(data), batch_size, pad_id, precision)
    total, count = dist.sum([total, count])
    return total / max(count, 1)


# --------------------------------------------------------------------------- checkpoints
def save_run_adapter(model: Any, directory: Path, cfg: TrainConfig) -> None:
    """The run's adapter in PEFT format, as the final artefact and in each checkpoint alike.
    PiSSA / OLoRA adapters are exported as plain LoRA against the original base weights."""
    from lorakit import save_adapter

    save_adapter(model, directory, convert_to_lora=cfg.init.lower().startswith(("pissa", "olora")))


def save_checkpoint(run_dir: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: dict[str, Any], cfg: TrainConfig, rng_states: list[torch.Tensor] | None = None) -> Path:
    """Write the resumable state atomically: a temp directory, then renames.

    Contents: ``trainable.safetensors`` (every trainable tensor), ``optimizer.pt`` and
    ``scheduler.pt`` (state dicts of plain tensors/numbers, loadable with weights_only=True),
    ``rng.pt`` (torch RNG state; with several processes, ``rng_states``: each one's, in rank order),
    ``trainer_state.json`` (step, data position, metrics so far)
    and, for LoRA, the adapter in PEFT format.
    """
    from lorakit.io import ordinary_modes, writing

    final = run_dir / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-tmp-", dir=run_dir))
    try:
        with writing(run_dir):
            _write_checkpoint_files(tmp, model, optimizer, scheduler, state, cfg, rng_states)
        ordinary_modes(tmp)  # (mkdtemp and safetensors make theirs private, whatever the umask)
        old = run_dir / ".checkpoint-old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)  # older than final, which stays until the new one is in place
            os.rename(final, old)  # a kill between these renames leaves .checkpoint-old: still usable
        os.rename(tmp, final)  # (with no final, e.g. after a resume from .checkpoint-old, that one stays till here)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_checkpoint_files(tmp: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                            state: dict[str, Any], cfg: TrainConfig, rng_states: list[torch.Tensor] | None) -> None:
    """``save_checkpoint``'s files, into its temporary directory ``tmp``."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if rng_states is not None and len(rng_states) > 1:
        rng["ranks"] = list(rng_states)
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if cfg.method != "full":
        save_run_adapter(model, tmp / "adapter", cfg)


def shell_quote(arg: str, windows: bool = os.name == "nt") -> str:
    """``arg`` quoted for a command line the user copies: POSIX shell quoting, or on Windows (no
    single quotes there) double quotes wherever cmd.exe would split or redirect at a character."""
    if not windows:
        return shlex.quote(arg)
    quoted = subprocess.list2cmdline([arg])
    if not quoted.startswith('"') and any(c in arg for c in "&|<>^()"):
        quoted = f'"{quoted}"'
    return quoted


def resume_command(run_dir: Path, dist: Dist = Dist()) -> str:
    """The command that continues the run (with as many processes: a checkpoint needs that many)."""
    if dist.world == 1:
        return f"lorakit train --resume {shell_quote(str(run_dir))}"
    if os.environ.get("LOCAL_WORLD_SIZE", str(dist.world)) == str(dist.world):  # one machine
        return f"torchrun --nproc-per-node {dist.world} -m lorakit.cli train --resume {shell_quote(str(run_dir))}"
    return (f"the same torchrun launch ({dist.world} processes) of: -m lorakit.cli train --resume "
            f"{shell_quote(str(run_dir))}")


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    for name in (CHECKPOINT, ".checkpoint-old"):
        path = run_dir / name
        if (path / "trainer_state.json").is_file():
            return path
    return None


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    dist: Dist = Dist()) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG from ``path``; return the trainer state.
    (``dist``: this process's place in a run of several; it takes its own RNG state.)

    Raises:
        ValueError: if a checkpoint file is unreadable, the checkpoint does not fit the model
            (names or shapes differ), or it was trained in another number of processes.
    """
    from safetensors.torch import load_file

    state = _read_checkpoint_file(path, "trainer_state.json", _read_trainer_state)
    saved_world = state.get("world_size", 1)
    if saved_world != dist.world:
        how = f"torchrun --nproc-per-node {saved_world}" if saved_world > 1 else "one process (without torchrun)"
        raise ValueError(f"cannot resume from {str(path)!r} in {dist.world} process(es): it was trained in "
                         f"{saved_world} (the batches of each step depend on it); resume it with {how}")

    saved = _read_checkpoint_file(path, "trainable.safetensors", lambda f: load_file(str(f)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {extra}")
    for name, p in params.items():  # (every file read and checked before anything is changed)
        if p.shape != saved[name].shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {list(saved[name].shape)}, "
                             f"the model expects {list(p.shape)}")
    optimizer_state, scheduler_state = [_read_checkpoint_file(path, name, lambda f: torch.load(f, weights_only=True))
                                        for name in ("optimizer.pt", "scheduler.pt")]
    _read_checkpoint_file(path, "optimizer.pt", lambda f: _check_optimizer_state(optimizer, optimizer_state))
    rng = _read_checkpoint_file(path, "rng.pt", lambda f: _rng_state(torch.load(f, weights_only=True), dist.rank))
    # (the optimizer and scheduler check what they are given only as they take it: given back as they
    # were if either refuses)
    before = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    try:
        _read_checkpoint_file(path, "optimizer.pt", lambda f: optimizer.load_state_dict(optimizer_state))
        _read_checkpoint_file(path, "scheduler.pt", lambda f: scheduler.load_state_dict(scheduler_state))
    except ValueError:
        optimizer.load_state_dict(before[0])
        scheduler.load_state_dict(before[1])
        raise
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    torch.set_rng_state(rng)
    return state


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Refuse an optimizer state whose per-parameter tensors (AdamW's moments) do not have their
    parameter's shape: ``load_state_dict`` takes it, and the first step failed on it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        if not 0 <= index < len(params):
            raise ValueError(f"state for parameter {index}, the optimizer has {len(params)}")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise ValueError(f"{key} of parameter {index} has shape {list(value.shape)}, the parameter "
                                 f"{list(params[index].shape)}")


def _rng_state(saved: Any, rank: int) -> torch.Tensor:
    """This process's torch RNG state in ``rng.pt`` (one per process of a distributed run), checked
    to be what ``torch.set_rng_state`` takes."""
    state = saved["ranks"][rank] if isinstance(saved, dict) and "ranks" in saved else saved["torch"]
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.shape != torch.get_rng_state().shape:
        raise ValueError("not a torch RNG state")
    return state


def _read_trainer_state(path: Path) -> dict[str, Any]:
    state = read_json_object(path)
    missing = [k for k in ("step", "tokens", "train_seconds", "epoch", "micro_batch") if k not in state]
    if missing:
        raise ValueError(f"missing {missing}")
    return state


def _read_checkpoint_file(path: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(path / name)``; a truncated or corrupt file becomes a ValueError saying what to do."""
    try:
        return read(path / name)
    except Exception as exc:  # safetensors, torch.load, json: each has its own error types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        run_dir = path.parent
        other = next((c for c in (run_dir / CHECKPOINT, run_dir / ".checkpoint-old")
                      if c != path and (c / "trainer_state.json").is_file()), None)
        todo = (f"delete {str(path)!r} to resume from the previous checkpoint {str(other)!r}, or " if other else "")
        raise ValueError(f"checkpoint {str(path)!r} is unreadable: {name}: {reason}. To continue, {todo}delete "
                         f"the run directory {str(run_dir)!r} and start the run again without --resume") from None


# --------------------------------------------------------------------------- outputs
def plot_losses(log_path: Path, out_png: Path) -> None:
    """Draw the loss curve (train per step, eval points) from ``log.jsonl`` into a PNG."""
    from lorakit.analysis.plots import pyplot

    plt = pyplot()

    steps, losses, esteps, elosses = [], [], [], []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "eval_loss" in rec:
            esteps.append(rec["step"])
            elosses.append(rec["eval_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {k})")
    if esteps:
        ax.plot(esteps, elosses, "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def examples_per_step(cfg: TrainConfig, result: TrainResult) -> int:
    """Examples one optimizer step takes: batch x accumulation x processes, or the whole training
    set where that is smaller."""
    nominal = cfg.batch_size * cfg.grad_accum * result.processes
    return min(nominal, result.train_examples) if result.train_examples > 0 else nominal


def method_summary(cfg: TrainConfig) -> str:
    """One line naming the method and every adapter option that differs from plain LoRA."""
    if cfg.method == "full":
        return "full"
    parts = [f"{cfg.method} r={cfg.rank} alpha={cfg.alpha:g} on {cfg.target_modules}"]
    parts += [name for name, on in (("DoRA", cfg.use_dora), ("rsLoRA", cfg.use_rslora)) if on]
    if cfg.init != "default":
        parts.append(f"init {cfg.init}")
    if cfg.lora_plus_ratio:
        parts.append(f"LoRA+ ratio {cfg.lora_plus_ratio:g}")
    if cfg.dropout:
        parts.append(f"dropout {cfg.dropout:g}")
    return ", ".join(parts)


def results_table(result: TrainResult, cfg: TrainConfig) -> str:
    """The end-of-run summary table (plain text)."""
    b, a = result.before, result.after
    rows = [
        ("", "before", "after"),
        ("held-out accuracy (exact match)", format_metric(b.get("accuracy"), True), format_metric(a.get("accuracy"), True)),
        ("held-out loss (answer tokens)", format_metric(b.get("loss")), format_metric(a.get("loss"))),
    ]
    pct = 100 * result.trainable_params / max(1, result.total_params)
    lines = [f"{r[0]:<34}{r[1]:>10}{r[2]:>10}" for r in rows]
    lines.append("-" * 54)
    extra = [
        ("method", method_summary(cfg)),
        ("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} ({pct:.2f}%)"),
        ("held-out examples", f"{b.get('n', a.get('n', 0))}"),
        ("optimizer steps", f"{result.steps} x {examples_per_step(cfg, result)} examples"
                            + (f" ({result.processes} processes)" if result.processes > 1 else "")),
        ("training time", f"{result.train_seconds:.0f} s (total {result.wall_seconds:.0f} s incl. load + evals)"),
        ("training throughput", f"{result.tokens_per_second:.0f} tokens/s"),
        ("peak memory (RSS)", f"{result.peak_memory_mb:.0f} MB" + (" (first process)" if result.processes > 1 else "")),
        ("saved to", str(result.run_dir)),
    ]
    lines += [f"{k:<34}{v}" for k, v in extra]
    return "\n".join(lines)


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in KiB, macOS in bytes;
    Windows has no ``resource`` module: psutil's peak working set there, NaN without psutil)."""
    try:
        import resource
    except ImportError:
        try:
            import psutil  # (accelerate's dependency)

            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


# --------------------------------------------------------------------------- the loop
def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<task>-<method>-<timestamp>``."""
    task = Path(cfg.data).stem if cfg.data and cfg.data != BUILTIN_TASK else BUILTIN_TASK
    return Path("runs") / f"{task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in a run directory (for ``--resume``).

    Raises:
        FileNotFoundError: if ``run_dir`` is not a run directory.
    """
    path = Path(run_dir) / "train_config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {str(path)!r} not found (is {str(run_dir)!r} a lorakit run directory?)")
    return TrainConfig.from_yaml(path)


def train(cfg: TrainConfig, resume: bool = False, model: Any = None, tokenizer: Any = None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          log: Callable[[str], None] = print, before_eval: dict[str, Any] | None = None) -> TrainResult:
    """Run a training job end to end.

    Args:
        cfg: the configuration; ``cfg.output`` is the run directory (created, or resumed).
        resume: continue the run in ``cfg.output`` from its checkpoint.
        model: an already loaded model to train instead of loading ``cfg.model`` (tests, sweeps).
            It is changed in place: LoRA is injected and trained (QLoRA: its linear layers become
            NF4 first). The training kernels and attention switch are undone when the loop ends,
            and a run that fails removes its LoRA layers again (the model's trainability and
            ``use_cache`` as they were), so the same model can be given to a retry.
        tokenizer: its tokenizer (required with ``model``).
        progress: show a tqdm progress bar.
        on_step: called as ``on_step(step, loss)`` after each optimizer step (tests use it to
            simulate a kill).
        log: where human-readable messages go.
        before_eval: the held-out evaluation of the untrained model to report instead of running it
            (``TrainResult.before`` of a run on the same base, eval data and settings: a sweep's
            runs differ only in the adapter, which starts as the base model).

    Returns:
        The TrainResult (also written to ``lorakit_run.json``).

    Raises:
        FileNotFoundError / ValueError: bad data, model or configuration (before training starts).
        FileExistsError: the output directory already holds a run and ``resume`` is False.
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.

    Under ``torchrun`` (or in a process group the caller started) every process calls this with
    the same arguments and trains its share of each batch (``lorakit.train.distributed``); only
    the first one logs, shows progress and writes files; the evaluations are shared.
    """
    dist = setup_distributed()
    threads = torch.get_num_threads()
    # (one process only: with several, a process waiting in a collective would take the signal only
    # when its peer arrives, up to gloo's timeout; there SIGTERM keeps ending it at once)
    before_loop = _signals_as_ctrl_c() if dist.world == 1 else None
    locks: list[int | None] = []
    try:
        result = _train(cfg, resume, model, tokenizer, progress, on_step, log, dist, before_eval, locks)
    finally:
        torch.set_num_threads(threads)  # (cfg.threads is this run's: a caller's process keeps its own)
        _restore_sigint(before_loop)
        for fd in locks:
            if fd is not None:
                os.close(fd)  # (gives the run directory's lock back)
    dist.barrier()  # the others wait for the first process's final phase: all end together
    return result


def _silent(*_args: Any) -> None:
    pass


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its model and data paths made absolute where they name existing files, so the
    run's records (train_config.yaml, lorakit_run.json, the adapter's base_model_name_or_path) mean
    the same files from any directory: a relative ``model`` read from elsewhere would load another base."""
    from dataclasses import replace

    def absolute(value: str | None) -> str | None:
        if not value or value == BUILTIN_TASK or not Path(value).expanduser().exists():
            return value
        return str(Path(value).expanduser().resolve())
    return replace(cfg, model=absolute(cfg.model), data=absolute(cfg.data), eval_data=absolute(cfg.eval_data))


def _train(cfg: TrainConfig, resume: bool, model: Any, tokenizer: Any, progress: bool,
           on_step: Callable[[int, float], None] | None, log: Callable[[str], None], dist: Dist,
           before_eval: dict[str, Any] | None = None, locks: list[int | None] | None = None) -> TrainResult:
    if not dist.main:  # one voice: the first process logs and draws the progress bar
        log, progress = _silent, False
    wall_start = time.perf_counter()
    cfg = with_absolute_paths(cfg)
    # normpath: "runs/typo/.." is "runs" (what mkdir(parents=True) would make it), so the checks
    # below see the directory the run would really write to
    run_dir = Path(os.path.normpath(cfg.output)) if cfg.output else default_run_dir(cfg)
    ckpt = _check_run_dir(cfg, run_dir, resume, dist)
    threads = auto_threads(cfg.threads)
    precision = resolve_precision(cfg.precision)
    # bf16 for LoRA = bf16 base weights (frozen) with fp32 adapters: half the memory traffic, and the
    # LoRA layers compute their branch in fp32. bf16 for full fine-tuning = fp32 master weights
    # under bf16 autocast (AdamW on bf16 weights would lose small updates to rounding).
    weight_dtype = torch.bfloat16 if precision == "bf16" and cfg.method != "full" else torch.float32
    amp = "bf16" if precision == "bf16" and cfg.method == "full" else "fp32"

    # 1. Data first: every line is validated before a model is loaded or a step is taken.
    train_examples, eval_examples = _read_examples(cfg, run_dir, resume, log)

    # The run directory is claimed now, before the slow model load, by creating its
    # train_config.yaml exclusively: a second run on the same directory is refused, and the
    # clean-up of a failed new run removes only what this run wrote.
    # The first process also locks the directory until the run ends (lock_run_dir): a second
    # --resume of the same run is refused while this one trains.
    lock = dist.main and locks is not None
    if resume:
        created = False  # (its train_config.yaml is rewritten once the checkpoint has loaded)
        if lock:
            locks.append(lock_run_dir(run_dir))
    else:
        run_dir, created = _claim_run_dir_once(run_dir, cfg, dist)
        if lock:
            with contextlib.suppress(FileExistsError):  # (the claim is this run's alone already)
                locks.append(lock_run_dir(run_dir))
    attention_before = None
    handed = None  # (a model given to train(): its state before LoRA, restored if the run fails)
    old_handler = None  # the SIGINT handler the loop replaced, until the run is safe on disk
    try:
        # 2. Model.
        torch.manual_seed(cfg.seed)  # (the data order has a generator of its own, from the seed)
        given = model is not None
        model, tokenizer = _model_for_run(cfg, model, tokenizer, weight_dtype)
        pad_id = pad_id_of(tokenizer)
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        max_length = fit_to_positions(model, cfg.max_length, log)
        train_data = tokenize_all(tokenizer, train_examples, max_length, what="training data")
        eval_data = tokenize_all(tokenizer, eval_examples, max_length, what="eval data") if eval_examples else []
        if dist.world > 1:
            _check_processes_agree(dist, cfg, train_data, eval_data)

        # the adapter's base_model_name_or_path: a model given in-process (train(model=...)) without
        # cfg.model is named by its own config, not taken for the embedded model
        own_name = getattr(getattr(model, "config", None), "_name_or_path", None) if given else None
        base_name = cfg.model or (own_name or None if given else "SmolLM2-135M-Instruct")
        if eval_examples and dist.main and not (resume and (run_dir / "eval.jsonl").exists()):
            write_jsonl(eval_examples, run_dir / "eval.jsonl")  # (also when --eval-data is added on resume)

        def run_eval(tag: str) -> dict[str, Any]:
            if not eval_examples:
                return {}
            t0 = time.perf_counter()
            res = evaluate_shared(dist, model, tokenizer, eval_examples, max_length, max(cfg.batch_size, 16), amp)
            graded = "" if res["n_accuracy"] == res["n"] else f" (of {res['n_accuracy']} graded)"
            log(f"[{tag}] held-out loss {res['loss']:.4f}, accuracy {format_metric(res['accuracy'], True)}{graded} "
                f"on {res['n']} examples ({time.perf_counter() - t0:.0f} s)")
            return {k: v for k, v in res.items() if k != "predictions"} | {"samples": res["predictions"][:5]}

        if cfg.method == "qlora":  # the "before" column is the model QLoRA trains: the NF4 base
            quantize_qlora_base(model)
        if resume:
            before = {}
        elif before_eval is not None and eval_examples:
            before = before_eval
            log(f"[before] held-out loss {before['loss']:.4f}, accuracy {format_metric(before['accuracy'], True)} "
                f"on {before['n']} examples (measured once for these runs)")
        else:
            before = run_eval("before")

        attention_before = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if given and cfg.method != "full" and get_state(model) is None:
            # what a failed run undoes on the caller's model (a retry on it said "adapter 'default'
            # already exists"): the LoRA layers, the parameters' trainability, use_cache
            handed = ([(p, p.requires_grad) for p in model.parameters()], getattr(model.config, "use_cache", None))
        model = prepare_model(model, cfg, base_name)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # trainable weights are always fp32 (AdamW precision)
        # (both given back when the loop ends, however it ends; the final phase below then turns the
        # cache on for its evaluation and a full fine-tune's saved config)
        run_settings = (checkpointing_on(model), getattr(model.config, "use_cache", None))
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        if dist.world > 1:
            dist.broadcast_parameters(params)  # one starting point (a resume loads the checkpoint's)
            if dist.rank:
                torch.manual_seed(cfg.seed + dist.rank)  # dropout masks of its own in each process
        n_train, n_total = _count_parameters(model, params)

        # 3. Optimizer, schedule and the resume point; then the loop.
        per_epoch, total_steps = plan_steps(cfg, len(train_data), dist.world)
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        optimizer = _make_optimizer(model, params, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))

        step, tokens_done, train_seconds, wall_before = 0, 0, 0.0, 0.0
        losses: list[float] = []
        if ckpt is not None:
            state = _restore_checkpoint(ckpt, model, optimizer, scheduler, dist, total_steps, warmup, run_dir)
            step, tokens_done, train_seconds = state["step"], state["tokens"], state["train_seconds"]
            wall_before = float(state.get("wall_seconds", 0.0))
            before, losses = state.get("before", {}), state.get("losses", [])
            if dist.main:
                _write_run_config(run_dir, cfg)  # flags given with --resume are the run's config from now on
            log(f"resumed {run_dir} at step {step}/{total_steps} (epoch {state['epoch']}, micro-batch {state['micro_batch']})")
        log_path = run_dir / "log.jsonl"
        if dist.main:
            _truncate_log(log_path, step)

        saved_at = {"step": None}  # the step of the checkpoint this process wrote last

        def write_checkpoint() -> None:  # (every process calls it: each one's RNG state is kept)
            saved_at["step"] = step
            rng_states = dist.gather_objects(torch.get_rng_state())
            if not dist.main:
                return
            epoch, pos = divmod(step * cfg.grad_accum, per_epoch)
            save_checkpoint(run_dir, model, optimizer, scheduler, {
                "step": step, "total_steps": total_steps, "epoch": epoch, "micro_batch": pos,
                "tokens": tokens_done, "train_seconds": train_seconds, "before": before, "losses": losses,
                "wall_seconds": wall_before + time.perf_counter() - wall_start,
                "seed": cfg.seed, "world_size": dist.world}, cfg, rng_states)

        procs = f" in each of {dist.world} processes" if dist.world > 1 else ""
        log(f"training {cfg.method} on {len(train_data)} examples: {total_steps} steps of "
            f"{cfg.batch_size}x{cfg.grad_accum}{procs}, lr {cfg.learning_rate:g}, {precision}, {threads} thread(s), "
            f"{n_train:,} trainable parameters -> {run_dir}")
        stop = {"flag": False}
        batches_cache: dict[int, list[list[int]]] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        old_handler = _install_sigint(stop, dist)  # (after the bar: nothing between it and the try can fail)
        interrupted = agreed_stop = False
        model.train()
        try:
            with log_path.open("a", encoding="utf-8") if dist.main else contextlib.nullcontext() as log_fh:
                while step < total_steps:
                    t0 = time.perf_counter()
                    micro = [micro_batch(train_data, cfg, index, per_epoch, pad_id, batches_cache, dist)
                             for index in step_micro_batches(cfg, step, per_epoch)]
                    step_loss, step_tokens = _accumulate_gradients(model, micro, amp, dist, step, run_dir)
                    if dist.world > 1:
                        # The one exchange of the step: gradients, loss and tokens summed over the
                        # processes, and whether any of them was asked to stop (all stop together).
                        step_loss, tokens, stops = dist.sum_gradients(params, [step_loss, step_tokens, stop["flag"]])
                        step_tokens, agreed_stop = int(tokens), stops > 0
                        if not math.isfinite(step_loss):
                            raise NonFiniteLossError(_diverged_message(step + 1, "loss", run_dir))
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
                    if not torch.isfinite(norm):
                        raise NonFiniteLossError(_diverged_message(step + 1, "gradient norm", run_dir))
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    dt = time.perf_counter() - t0
                    train_seconds += dt
                    tokens_done += step_tokens
                    losses.append(step_loss)
                    rec = {"step": step, "epoch": micro[-1][0], "loss": round(step_loss, 6), "lr": lr,
                           "grad_norm": round(float(norm), 6), "tokens": step_tokens,
                           "tokens_per_s": round(step_tokens / max(dt, 1e-9), 1), "step_s": round(dt, 6),
                           "elapsed_s": round(train_seconds, 2)}
                    if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps and eval_data:
                        rec["eval_loss"] = eval_loss_shared(dist, model, eval_data, max(cfg.batch_size, 16), pad_id, amp)
                    if log_fh is not None:
                        log_fh.write(json.dumps(rec) + "\n")
                        log_fh.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_done / max(train_seconds, 1e-9):.0f}")
                        bar.update(1)
                    elif cfg.logging_steps and step % cfg.logging_steps == 0:
                        log(f"step {step}/{total_steps} loss {step_loss:.4f} lr {lr:.2e}")
                    if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                        write_checkpoint()
                    if on_step is not None:
                        on_step(step, step_loss)
                    # (several processes stop on the request they exchanged: a Ctrl-C that arrives
                    # after this step's exchange stops all of them after the next step)
                    if (stop["flag"] if dist.world == 1 else agreed_stop) and step < total_steps:
                        interrupted = True
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C mid-step: the model may be half-updated, so nothing is saved; the last
            # checkpoint on disk stays the resume point.
            if find_checkpoint(run_dir) is not None and dist.main:
                log(f"stopped during step {step + 1}; resume from the last checkpoint with: "
                    f"{resume_command(run_dir, dist)}")
            else:
                log(f"stopped during step {step + 1}, before the first checkpoint")
            raise
        finally:
            if bar is not None:
                bar.close()
            _undo_kernels(model, attention_before)  # (training only): hand the model back as it came
            if cfg.gradient_checkpointing and not run_settings[0]:
                disable_checkpointing(model)
            model.config.use_cache = run_settings[1]

        result = TrainResult(run_dir=run_dir, steps=step, total_steps=total_steps, interrupted=interrupted,
                             before=before, trainable_params=n_train, total_params=n_total,
                             train_seconds=train_seconds, tokens_per_second=tokens_done / max(train_seconds, 1e-9),
                             losses=losses, processes=dist.world, train_examples=len(train_data))
        if interrupted:
            optimizer.zero_grad(set_to_none=True)
            if saved_at["step"] != step:  # (else this step's --save-steps checkpoint is on disk)
                write_checkpoint()
            _restore_sigint(old_handler)
            log(f"interrupted at step {step}/{total_steps}: checkpoint saved; continue with: "
                f"{resume_command(run_dir, dist)}")
            return result
        if cfg.method != "full" and dist.broadcast_object(ckpt_step(run_dir) != step if dist.main else None):
            # The loop is done: a checkpoint at its last step (an adapter's worth of bytes) keeps the
            # run resumable if the final phase below is stopped; --resume then skips to that phase.
            # (Not for full fine-tuning, whose checkpoint is the whole model and optimizer.) The
            # loop's Ctrl-C handler stays until it is written: a Ctrl-C just after the last step
            # raised KeyboardInterrupt here, and the clean-up of a run without a checkpoint then
            # deleted the whole finished run.
            write_checkpoint()
        _restore_sigint(old_handler)
        old_handler = None
        if stop["flag"] and dist.world == 1 and cfg.method != "full":
            result.interrupted = True
            log(f"interrupted after the last step ({step}/{total_steps}): checkpoint saved; the adapter and "
                f"evaluation are written on resume: {resume_command(run_dir, dist)}")
            return result
    except BaseException as exc:
        _restore_sigint(old_handler)
        if model is not None:  # hand the caller's model back as it came
            _undo_kernels(model, attention_before)
            if handed is not None and not isinstance(exc, SimulatedKill):
                _give_back(model, handed)
        # A new run that stops before its first checkpoint leaves nothing to resume: remove what it
        # wrote, so the same command can simply be run again. A simulated SIGKILL cleans up nothing;
        # a diverged run keeps its log.jsonl, which shows how the loss went (its message says so).
        if (not resume and dist.main and not isinstance(exc, (SimulatedKill, NonFiniteLossError))
                and find_checkpoint(run_dir) is None):
            _discard_new_run(run_dir, created, log)
        raise

    # 4. Final artefacts (the first process writes them), then the after-training evaluation (shared).
    model.eval()
    if dist.main:
        _write_trained(model, tokenizer, cfg, run_dir)
        plot_losses(log_path, run_dir / "loss.png")
    model.config.use_cache = True
    result.after = run_eval("after")
    result.wall_seconds = wall_before + time.perf_counter() - wall_start  # (over every process of a resumed run)
    result.peak_memory_mb = peak_memory_mb()
    if not dist.main:
        return result
    info = {
        "finished": True, "model": cfg.model or (base_name if given else None), "method": cfg.method,
        "config": cfg.to_dict(),
        "steps": step, "before": before, "after": result.after,
        "trainable_params": n_train, "total_params": n_total, "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(result.wall_seconds, 2), "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_memory_mb": round(result.peak_memory_mb, 1), "precision": precision, "threads": threads,
        "processes": dist.world,
    }
    if given and not cfg.model and not base_name:
        info["model_in_process"] = True  # a nameless model given to train(): inference must be told the base
    # (atomically: a kill inside a plain write left a half file that --resume and eval both refused)
    atomic_write_bytes(run_dir / RUN_INFO, json.dumps(info, indent=1).encode("utf-8"))
    # (lorakit_run.json says "finished" first, so --resume refuses even if a kill lands below)
    for leftover in [run_dir / CHECKPOINT, run_dir / ".checkpoint-old", *run_dir.glob(".checkpoint-tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    log(results_table(result, cfg))
    return result


def _check_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool, dist: Dist) -> Path | None:
    """Refuse what cannot start before anything is read or loaded: an output that is a file, a
    resume of a finished run, of a run without a checkpoint or with changed fixed settings, a new
    run in a directory that holds files. Returns the checkpoint to resume from (None: a new run)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"output {str(run_dir)!r} is a file, not a directory: choose another --output")
    if resume:
        try:
            finished = read_run_info(run_dir).get("finished")
        except ValueError as exc:  # (written whole since; a file cut by a kill in older versions)
            raise ValueError(f"{exc}: the run's record is damaged; if {str(run_dir / CHECKPOINT)!r} is there, delete "
                             f"{str(run_dir / RUN_INFO)!r} and resume again") from None
        if finished:
            raise ValueError(f"run {str(run_dir)!r} already finished; nothing to resume")
    ckpt = find_checkpoint(run_dir) if resume else None
    if resume and (run_dir / "train_config.yaml").is_file():
        saved = with_absolute_paths(load_run_config(run_dir))
        changed = [n for n in RESUME_FIXED if getattr(cfg, n) != getattr(saved, n)]
        if changed:
            diffs = ", ".join(f"{n} {getattr(saved, n)!r} -> {getattr(cfg, n)!r}" for n in changed)
            raise ValueError(f"cannot resume {str(run_dir)!r} with a different {', '.join(changed)} ({diffs}): "
                             "the checkpoint was trained with the saved values (they define the model, the "
                             "optimizer groups or the data order); start a new run to change them")
    if resume and ckpt is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {str(run_dir)!r} (the run stopped before writing "
                                f"one: delete {str(run_dir)!r} and start it again without --resume)")
    if (not resume and dist.world == 1 and cfg.output and run_dir.exists()  # (a default name gets a suffix)
            and any(run_dir.iterdir())):  # (several processes: the claim below refuses it in all alike)
        raise FileExistsError(_holds_files(run_dir))
    return ckpt


def _read_examples(cfg: TrainConfig, run_dir: Path, resume: bool, log: Callable[[str], None]
                   ) -> tuple[list[Example], list[Example]]:
    """The training and held-out examples, every line validated (before a model is loaded). A
    resumed run must hold out the same examples as its ``eval.jsonl``."""
    train_examples = load_examples(cfg.data, "train")
    if cfg.max_train_samples:
        train_examples = train_examples[: cfg.max_train_samples]
    if cfg.eval_data:
        eval_examples: list[Example] = load_examples(cfg.eval_data, "test")
    elif cfg.data is None or cfg.data == BUILTIN_TASK:
        eval_examples = load_examples(BUILTIN_TASK, "test")
    else:
        eval_examples = []
    if cfg.eval_samples:
        eval_examples = eval_examples[: cfg.eval_samples]
    if resume and (run_dir / "eval.jsonl").is_file() and read_jsonl(run_dir / "eval.jsonl") != eval_examples:
        # (the options may name the same examples otherwise, or the same file hold others by now)
        raise ValueError(f"cannot resume {str(run_dir)!r} with another held-out set than its eval.jsonl "
                         f"({len(eval_examples)} examples from --eval-data / --eval-samples now): the run's "
                         "'before' numbers were measured on that one; resume with the options it had, or start "
                         "a new run")
    if cfg.eval_steps and not eval_examples:
        log(f"warning: eval_steps {cfg.eval_steps} has nothing to evaluate: give --eval-data (your --data has no "
            "held-out split)")
    return train_examples, eval_examples


def _model_for_run(cfg: TrainConfig, model: Any, tokenizer: Any, weight_dtype: torch.dtype) -> tuple[Any, Any]:
    """The model and tokenizer to train: ``cfg.model`` loaded in ``weight_dtype``, or the ones
    given to ``train()`` (cast to ``weight_dtype`` only where a weight is in another dtype)."""
    if model is None:
        from lorakit.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=weight_dtype)
    elif tokenizer is None:
        raise ValueError("train(model=...) also needs its tokenizer")
    elif any(p.is_floating_point() and p.dtype != weight_dtype for p in model.parameters()):
        # Only when needed: ``.to`` also casts buffers (e.g. rotary inv_freq), which loading in
        # ``weight_dtype`` keeps in fp32, so a model already in that dtype is left exactly as loaded.
        model = model.to(weight_dtype)
    return model, tokenizer


def _check_processes_agree(dist: Dist, cfg: TrainConfig, train_data: list[Tokenized],
                           eval_data: list[Tokenized]) -> None:
    """Several processes: refuse a run whose processes read different data or were given
    different settings (both hung or trained on silently before)."""
    # every process must hold the same examples (another file at the same path on another
    # node planned another number of steps: the run hung at the first step one process skipped)
    prints = dist.gather_objects((_data_fingerprint(train_data, eval_data), _settings(cfg)))
    if len({p[0] for p in prints}) > 1:
        raise ValueError("the processes of this run read different data (training examples per process: "
                         f"{[p[0][0] for p in prints]}): give every process the same --data and --eval-data "
                         "(on several nodes, the same file at the same path)")
    # ... and train with the same settings: another --max-steps hung at the last collective,
    # another --eval-steps or --rank died in gloo ("collective mismatch"), another --lr or
    # --seed trained on silently (rank 0 saved its own adapter; the shares overlapped)
    differ = sorted(k for k in prints[0][1] if len({repr(p[1].get(k)) for p in prints}) > 1)
    if differ:
        values = "; ".join(f"{k}: " + ", ".join(f"process {r}: {p[1].get(k)!r}" for r, p in enumerate(prints))
                           for k in differ[:4])
        raise ValueError(f"the processes of this run were given different settings ({values}): give every "
                         "process the same arguments (torchrun passes its own to all)")


def _count_parameters(model: Any, params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(trainable numbers, all of the model's numbers: a tied weight once, an NF4 layer's weight too)."""
    from lorakit.layers.nf4_linear import LinearNF4

    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # an NF4 layer's weight is buffers, not a parameter: count its in x out weights too
    n_total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, LinearNF4))
    return n_train, n_total


def _make_optimizer(model: Any, params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` (fused where torch has it), or LoRA+'s groups (B's rate ``ratio`` x A's)."""
    if cfg.lora_plus_ratio:
        from lorakit import create_loraplus_optimizer  # LoRA+: B learns ratio x faster than A

        return fused_if_supported(lambda **kw: create_loraplus_optimizer(
            model, lr=cfg.learning_rate, ratio=cfg.lora_plus_ratio, weight_decay=cfg.weight_decay, **kw))
    # weight decay on matrices only: 1-D tensors (biases, norms) and DoRA's magnitudes (column
    # norms, 4-D on a Conv2d) are not pulled to zero, as in the LoRA+ groups and transformers' Trainer
    from lorakit.loraplus import without_weight_decay

    keep = without_weight_decay(model)
    flat = [p for p in params if id(p) in keep]
    groups = ([{"params": [p for p in params if id(p) not in keep]}, {"params": flat, "weight_decay": 0.0}]
              if cfg.weight_decay and flat else params)
    return fused_if_supported(lambda **kw: torch.optim.AdamW(
        groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **kw))


def _restore_checkpoint(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, dist: Dist,
                        total_steps: int, warmup: int, run_dir: Path) -> dict[str, Any]:
    """``load_checkpoint``, then this run's learning rates: the peak (a ``--lr`` given with
    ``--resume``) and the next step's rate from this run's plan. Returns the trainer state."""
    # this run's peak rates (a --lr given with --resume): loading the scheduler's and the
    # optimizer's states puts the saved ones back, so they are restored right after
    peaks = list(scheduler.base_lrs)
    state = load_checkpoint(ckpt, model, optimizer, scheduler, dist)
    scheduler.base_lrs = peaks
    for group, peak in zip(optimizer.param_groups, peaks):
        group["initial_lr"] = peak
    step = state["step"]
    if step > total_steps:  # (finishing here would delete the checkpoint of a longer run)
        raise ValueError(f"cannot resume {str(run_dir)!r}: its checkpoint is at step {step}, past the "
                         f"{total_steps} steps this run now has (--max-steps / --epochs); give more steps")
    # The learning rate the next step uses, from this run's schedule: the saved one came from
    # the saved plan, which a --max-steps / --epochs given with --resume changes (identical
    # otherwise: LambdaLR computes it the same way).
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(step, total_steps, warmup)
    return state


def _accumulate_gradients(model: Any, micro: list[tuple[int, dict[str, torch.Tensor] | None, int]], amp: str,
                          dist: Dist, step: int, run_dir: Path) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches (``micro_batch``'s tuples),
    each loss divided by the labels of the whole step, so the summed gradients are those of the
    step's mean loss. Returns (this process's part of that mean loss, its tokens)."""
    n_labels = sum(n for _, _, n in micro)
    step_loss, step_tokens = 0.0, 0
    for _, batch, _ in micro:
        if batch is None:  # this process's share of a short last batch is empty
            continue
        with autocast(amp):
            loss, _ = loss_sum(model, batch)
        loss = loss / max(n_labels, 1)  # mean over the whole accumulated step's labels
        if not torch.isfinite(loss) and dist.world == 1:  # (several: checked on the sum, after the exchange)
            raise NonFiniteLossError(_diverged_message(step + 1, "loss", run_dir))
        loss.backward()
        step_loss += float(loss.detach())
        step_tokens += int(batch["attention_mask"].sum())
    return step_loss, step_tokens


def _write_trained(model: Any, tokenizer: Any, cfg: TrainConfig, run_dir: Path) -> None:
    """The run's result: the adapter (PEFT format), or a full fine-tune's model and tokenizer in ``model/``."""
    if cfg.method != "full":
        save_run_adapter(model, run_dir, cfg)
        return
    model.config.use_cache = True

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    # (into a temporary directory renamed when whole: a kill mid-save left a model/ with
    # weights but no tokenizer, which eval and generate refused without saying why)
    shutil.rmtree(run_dir / "model", ignore_errors=True)  # (a resumed run's unfinished one)
    write_new_directory(run_dir / "model", write_model)


def _give_back(model: Any, handed: tuple[list[tuple[torch.nn.Parameter, bool]], bool | None]) -> None:
    """After a failed run on a model given to ``train()``: remove its LoRA layers and put back the
    parameters' trainability and ``use_cache`` as ``handed`` recorded them before the run."""
    if get_state(model) is None:
        return
    from lorakit.adapters import unload

    unload(model)
    flags, use_cache = handed
    for p, flag in flags:
        p.requires_grad_(flag)
    if use_cache is not None:
        model.config.use_cache = use_cache


#: What a run writes into its directory (the clean-up of a failed new run removes these only).
RUN_FILES = ("train_config.yaml", "eval.jsonl", "log.jsonl", "loss.png", "adapter_config.json",
             "adapter_model.safetensors", "model", CHECKPOINT, ".checkpoint-old", RUN_INFO)


def _run_config_text(run_dir: Path, cfg: TrainConfig) -> str:
    return yaml.safe_dump(dict(cfg.to_dict(), output=str(run_dir)), sort_keys=False)


def _write_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """(Re)write ``train_config.yaml`` atomically."""
    tmp = run_dir / ".train_config.yaml.tmp"
    tmp.write_text(_run_config_text(run_dir, cfg), encoding="utf-8")
    os.replace(tmp, run_dir / "train_config.yaml")


def lock_run_dir(run_dir: Path) -> int | None:
    """Lock ``run_dir`` for this process (``flock`` on the directory; released when the returned
    descriptor is closed, or the process ends however it ends). Two ``--resume`` of one run at once
    both trained and both said "saved", the second over the first. None where there is no flock.

    Raises:
        FileExistsError: another process holds the lock (a run is training in the directory).
    """
    try:
        import fcntl
    except ImportError:  # (not on Windows)
        return None
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # (EWOULDBLOCK: held by another process)
        os.close(fd)
        raise FileExistsError(_in_use(run_dir)) from None
    except OSError:  # a file system without flock (NFS wants the file open for writing, some FUSE
        os.close(fd)  # mounts have none): the run goes on unlocked, as before (was refused as "in use")
        return None
    return fd


def _in_use(path: Path) -> str:
    return (f"output directory {str(path)!r} is in use: another lorakit process is training in it; wait for it "
            "to end (or stop it), or choose another --output")


def _locked(path: Path) -> bool:
    """Whether a process holds ``lock_run_dir``'s lock on ``path``."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # (no flock on this file system: nobody can hold it)
        return False
    finally:
        os.close(fd)


def _holds_files(path: Path) -> str:
    """The refusal of a new run in a directory that already holds files."""
    if _locked(path):  # (a live run: "delete it" below would have deleted a run in progress)
        return _in_use(path)
    if (path / "train_config.yaml").is_file() and find_checkpoint(path) is None and not any(
            (path / name).exists() for name in ("adapter_config.json", "adapter_model.safetensors", "model", RUN_INFO)):
        # (a run killed before its first checkpoint: --resume refuses it, so pointing there was a loop)
        return (f"output directory {str(path)!r} holds a run that stopped before its first checkpoint, so there "
                f"is nothing to resume: delete {shell_quote(str(path))} and run again, or choose another --output")
    return (f"output directory {str(path)!r} already holds files; pass --resume {shell_quote(str(path))} to "
            "continue that run, or choose another --output")


def _claim_run_dir_once(run_dir: Path, cfg: TrainConfig, dist: Dist) -> tuple[Path, bool]:
    """``_claim_run_dir`` in the first process; the others learn its directory (or its refusal,
    raised in every process alike). Returns (the directory, whether this process created it)."""
    if dist.world == 1:
        return _claim_run_dir(run_dir, cfg, unique=not cfg.output)
    if not dist.main:
        refused, where = dist.broadcast_object(None)
        if refused:
            raise FileExistsError(where)
        return Path(where), False
    try:
        path, created = _claim_run_dir(run_dir, cfg, unique=not cfg.output)
    except FileExistsError as exc:
        dist.broadcast_object((True, str(exc)))
        raise
    try:
        dist.broadcast_object((False, str(path)))
    except BaseException:
        # another process failed before it got here (its error is printed): give back the claim, so
        # the same command can be run again
        (path / "train_config.yaml").unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return path, created


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` every process of a run must share: all but ``output`` (the main
    process's directory is the run's), ``threads`` (per process) and the data paths (their
    contents are compared by ``_data_fingerprint``)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("output", "threads", "data", "eval_data")}


def _data_fingerprint(train_data: list[Tokenized], eval_data: list[Tokenized]) -> tuple[int, int, str]:
    """(training examples, held-out examples, a hash of every token id and label): equal on every
    process of a run that read the same data."""
    digest = hashlib.sha256()
    for t in (*train_data, None, *eval_data):
        if t is None:
            digest.update(b"|")
            continue
        digest.update(array.array("q", t.input_ids).tobytes())
        digest.update(array.array("q", t.labels).tobytes())
    return len(train_data), len(eval_data), digest.hexdigest()


def _claim_run_dir(run_dir: Path, cfg: TrainConfig, unique: bool) -> tuple[Path, bool]:
    """Make ``run_dir`` this run's: create it (or take it empty) and create its train_config.yaml
    exclusively, so two runs never share a directory. ``unique`` (a default name): on a clash, try
    ``<name>-2``, ``<name>-3``, ... Returns (the directory, whether this run created it).

    Raises:
        FileExistsError: the directory holds files, or another run claimed it first.
    """
    for attempt in range(1, 1000):
        path = run_dir if attempt == 1 else run_dir.with_name(f"{run_dir.name}-{attempt}")
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            if unique:
                continue
            if not path.is_dir() or any(path.iterdir()):
                raise FileExistsError(_holds_files(path)) from None
            created = False
        try:
            with open(path / "train_config.yaml", "x", encoding="utf-8") as fh:
                fh.write(_run_config_text(path, cfg))
        except FileExistsError:
            if unique:
                continue
            raise FileExistsError(f"output directory {str(path)!r} was just taken by another run; "
                                  f"choose another --output") from None
        return path, created
    raise FileExistsError(f"no free run directory next to {str(run_dir)!r}")


def ckpt_step(run_dir: Path) -> int | None:
    """The step of the run's newest checkpoint, or None."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        step = read_json_object(ckpt / "trainer_state.json").get("step")
    except (OSError, ValueError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def _discard_new_run(run_dir: Path, created: bool, log: Callable[[str], None]) -> None:
    """Remove what a new run wrote (``RUN_FILES`` and its temporary checkpoints, nothing else), and
    the directory itself if the run created it and it is now empty."""
    for path in [*(run_dir / name for name in RUN_FILES), *run_dir.glob(".checkpoint-tmp-*"),
                 *run_dir.glob(".train_config.yaml.tmp")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty: anything another process put there stays
    log(f"the run stopped before its first checkpoint: removed what it wrote to {run_dir}; "
        "the same command starts it again")


def _diverged_message(step: int, what: str, run_dir: Path) -> str:
    ckpt = find_checkpoint(run_dir)
    where = (f"the last good checkpoint (step {ckpt_step(run_dir)}) "
             f"is kept in {ckpt}") if ckpt else (f"no checkpoint had been written yet (log.jsonl shows the "
                                                 f"losses; delete {str(run_dir)!r} to start the run again)")
    return (f"non-finite {what} at step {step}: training stopped; {where}. "
            "Try a lower --lr, --precision fp32 or a smaller --max-grad-norm.")


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines after ``step`` (written by a run killed after its last checkpoint)."""
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill mid-write
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, log_path)


#: Signals a run takes as a Ctrl-C: SIGTERM (a batch scheduler's pre-emption, ``kill``, torchrun
#: stopping its workers) and SIGHUP (the terminal closed, the ssh connection dropped).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _signals_as_ctrl_c() -> Any:
    """Outside the training loop (loading, the first evaluation, the final phase): SIGTERM and SIGHUP
    raise KeyboardInterrupt as Ctrl-C does, so the run cleans up as after a Ctrl-C — before, they
    killed the process at once, and a run stopped before its first checkpoint left its directory
    claimed (the same command was then refused). Ignored signals stay ignored (``_install_sigint``).
    Returns the replaced handlers, for ``_restore_sigint``."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS
            if sig != signal.SIGINT and signal.getsignal(sig) is not signal.SIG_IGN}


def _install_sigint(stop: dict[str, bool], dist: Dist = Dist()) -> Any:
    """First Ctrl-C: finish the current step, save a checkpoint, exit. Second: stop at once.
    (Several processes: the request goes out with the next gradient exchange, and all of them stop
    after that step; only the first process says so, torchrun passing a Ctrl-C to every process.)
    SIGTERM (a batch scheduler's pre-emption, ``kill``, torchrun stopping its workers) and SIGHUP
    (the terminal closed) are taken as a Ctrl-C: before, they killed the run at once and lost the
    steps since the last checkpoint.
    A signal this process ignores stays ignored: a shell script's background job (``lorakit train
    ... &``) starts with SIGINT ignored so that a Ctrl-C at the terminal leaves it running.
    Returns the replaced handlers, for ``_restore_sigint``."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if dist.world == 1:
            print(f"\n{what}: finishing this step and saving a checkpoint ({what} again stops at once)",
                  file=sys.stderr)
        elif dist.main:  # (torchrun passes a Ctrl-C or SIGTERM to every process: one says so)
            print(f"\n{what}: every process stops after the same step (this one or the next) and a checkpoint "
                  f"is saved ({what} again stops at once)", file=sys.stderr)

    return {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}


def _restore_sigint(old: Any) -> None:
    for sig, handler in (old or {}).items():
        signal.signal(sig, handler)
