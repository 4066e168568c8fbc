"""Rank and alpha recommendation: the lesson's rule table, a model-aware cost report, and a
data-driven mode that reads the effective rank of real weight updates.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.analysis.adapter_tools import DeltaSpectra, delta_spectra_details, energy_rank, target_filter
from lorakit.analysis.estimate import ModelShape, check_sizes, estimate_memory
from lorakit.analysis.names import TASKS
from lorakit.analysis.weights import load_config, weight_shapes

SIZES = ("7B", "13B", "70B")
# The lesson's table: task complexity x model size -> (rank, alpha).
RULES: dict[tuple[str, str], tuple[int, int]] = {
    ("simple", "7B"): (4, 8), ("simple", "13B"): (4, 8), ("simple", "70B"): (8, 16),
    ("medium", "7B"): (8, 16), ("medium", "13B"): (8, 16), ("medium", "70B"): (16, 32),
    ("complex", "7B"): (16, 32), ("complex", "13B"): (16, 32), ("complex", "70B"): (32, 64),
}
SMALL_DATA, LARGE_DATA, RANK_FLOOR, RANK_CAP = 1_000, 10_000, 4, 64
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*$")


def parse_model_size(model_size: str | int | float) -> tuple[str, str | None]:
    """Map a model size to the table's column: "7B", "13B" or "70B".

    Other sizes ("135M", "1.5B", 3e9) go to the nearest column by the rule ≤ 10B → 7B,
    ≤ 40B → 13B, else 70B; the second value explains that mapping (None for an exact column).

    Raises:
        ValueError: if the size cannot be read.
    """
    text = str(model_size).strip().upper()
    if text in SIZES:
        return text, None
    if isinstance(model_size, (int, float)) and not isinstance(model_size, bool):
        n = float(model_size)
    else:
        m = _SIZE.match(str(model_size))
        if not m:
            raise ValueError(f"model_size must be like 7B, 13B, 70B or 135M, got {model_size!r}")
        n = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
        if not m.group(2) and n < 1e6:  # "70" meant 70B, most likely: not a model of 70 parameters
            raise ValueError(f"model_size {model_size!r} has no unit: write it like 70B, 13B or 135M "
                             "(a bare number of 1,000,000 or more counts parameters)")
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"model_size must be a positive finite number, got {model_size!r}")
    column = "7B" if n <= 10e9 else "13B" if n <= 40e9 else "70B"
    shown = f"{model_size:,}" if isinstance(model_size, int) else model_size
    return column, f"{shown} parameters read as the {column} column (<=10B: 7B, <=40B: 13B, else 70B)"


def recommend_rank(task_complexity: str, data_size: int, model_size: str | int | float) -> dict[str, Any]:
    """The lesson's LoRA hyperparameter guide.

    Table (rank, alpha), task x model size: simple (4, 8) (4, 8) (8, 16); medium (8, 16) (8, 16)
    (16, 32); complex (16, 32) (16, 32) (32, 64) for 7B / 13B / 70B. Fewer than 1,000 examples
    halve the rank (not below 4) — little data cannot fill a larger update and overfits it; more
    than 10,000 double it (not above 64). Alpha stays as the table gives it.

    Args:
        task_complexity: "simple", "medium" or "complex".
        data_size: number of training examples.
        model_size: "7B", "13B", "70B" (other sizes map to the nearest column).

    Returns:
        {"rank": int, "alpha": int, "reasoning": str}.

    Raises:
        ValueError: on an unknown complexity, a negative data size or an unreadable model size.
    """
    task = str(task_complexity).strip().lower()
    if task not in TASKS:
        raise ValueError(f"task_complexity must be one of {', '.join(TASKS)}, got {task_complexity!r}")
    if isinstance(data_size, bool) or int(data_size) != data_size or data_size < 0:
        raise ValueError(f"data_size must be a non-negative integer, got {data_size!r}")
    column, mapped = parse_model_size(model_size)
    rank, alpha = RULES[(task, column)]
    why = []
    if mapped:
        why.append(mapped + ".")
    why.append(f"A {task} task on a {column} model starts at rank {rank}, alpha {alpha} (the table's alpha "
               "is 2 x its rank).")
    if data_size < SMALL_DATA:
        new = max(RANK_FLOOR, rank // 2)
        change = f"{rank} -> {new}" if new != rank else f"{rank} is already the floor"
        why.append(f"{data_size:,} examples is under {SMALL_DATA:,}: halve the rank to limit overfitting "
                   f"({change}; floor {RANK_FLOOR}).")
        rank = new
    elif data_size > LARGE_DATA:
        new = min(RANK_CAP, rank * 2)
        change = f"{rank} -> {new}" if new != rank else f"{rank} is already the cap"
        why.append(f"{data_size:,} examples is over {LARGE_DATA:,}: double the rank for capacity "
                   f"({change}; cap {RANK_CAP}).")
        rank = new
    else:
        why.append(f"{data_size:,} examples is between {SMALL_DATA:,} and {LARGE_DATA:,}: rank unchanged.")
    why.append(f"Alpha stays {alpha}: scaling alpha/r = {alpha / rank:g} (with rsLoRA, alpha/sqrt(r) = "
               f"{alpha / math.sqrt(rank):.3g}).")
    return {"rank": rank, "alpha": alpha, "reasoning": " ".join(why)}


def model_total_params(source: str | Path | None) -> int:
    """Number of parameters of a model, from its safetensors headers."""
    return sum(math.prod(s) for s in weight_shapes(source).values())


def model_cost(
    source: str | Path | None,
    rank: int,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    batch_size: int = 4,
    seq_len: int = 512,
    precision: str = "bf16",
    adapter_dtype_bytes: int = 4,
) -> dict[str, Any]:
    """What a recommendation costs on a real model: trainable parameters, adapter size, memory.

    Trainable parameters are r * (in + out) over every 2-D weight whose module matches
    ``target_modules`` (PEFT's suffix rule), read from the model's safetensors headers. The
    adapter file holds those parameters (fp32 by default) plus a small safetensors header.

    Returns:
        {"modules", "trainable_params", "adapter_bytes", "total_params", "narrower_than_rank" (the
        matched modules whose min(out, in) is below ``rank``, as "name (min N)": their update cannot
        reach that rank), "memory" (``estimate_memory``'s dict, or None), "memory_note" (why there
        is no estimate, or where it counts other modules than the cost: a layer-specific target)}.

    Raises:
        ValueError: if no weight matches the targets, or batch_size / seq_len is not a positive integer.
    """
    check_sizes(batch_size=batch_size, seq_len=seq_len)  # (before the estimate, whose errors become a note)
    shapes = weight_shapes(source)
    weights = dict(shapes)
    head = _tied_head(source, shapes)
    if head is not None:  # a tied lm_head is not stored, but PEFT and lorakit adapt it when targeted
        weights["lm_head.weight"] = head
    if not target_modules:
        raise ValueError("target_modules is empty: name modules, or all-linear")
    chosen = target_filter(target_modules)
    matched = {k[: -len(".weight")]: s for k, s in weights.items()
               if k.endswith(".weight") and len(s) == 2 and chosen(k[: -len(".weight")])}
    if not matched:
        raise ValueError(f"no 2-D weight matches target_modules {list(target_modules)!r} in {str(source)!r}")
    params = sum(rank * (s[0] + s[1]) for s in matched.values())
    header = 8 + 160 * 2 * len(matched)  # safetensors: length prefix + ~160 bytes of JSON per tensor
    out: dict[str, Any] = {"modules": len(matched), "trainable_params": params,
                           "adapter_bytes": params * adapter_dtype_bytes + header}
    total = sum(math.prod(s) for s in shapes.values())
    out["total_params"] = total
    out["narrower_than_rank"] = [f"{name} (min {min(shape)})" for name, shape in matched.items() if rank > min(shape)]
    try:
        shape = ModelShape.from_config(load_config(source), name=str(source or "default"))
        # the estimator knows projections by their last name ("self_attn.q_proj" -> "q_proj")
        projections = tuple(dict.fromkeys(t.rsplit(".", 1)[-1] for t in target_modules))
        est = estimate_memory(shape, "lora", batch_size=batch_size, seq_len=seq_len, precision=precision, r=rank,
                              target_modules=projections)
        out["memory"] = est.to_dict()
        if out["memory"]["trainable_params"] != params:  # (layers.0.q_proj: the estimate knows projections only)
            out["memory_note"] = (f"the memory estimate counts each targeted projection on every layer "
                                  f"({out['memory']['trainable_params']:,} trainable parameters; the targets "
                                  f"match {params:,})")
    except (ValueError, FileNotFoundError) as exc:
        out["memory"] = None
        out["memory_note"] = f"no memory estimate: {exc}"
    return out


def _tied_head(source: str | Path | None, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """Shape of a causal LM's ``lm_head`` weight where it is tied to the input embedding (so the
    weights file does not hold it), else None."""
    if "lm_head.weight" in shapes:
        return None
    try:
        tied = bool(load_config(source).get("tie_word_embeddings", False))
    except (ValueError, FileNotFoundError):
        return None
    embedding = next((s for k, s in shapes.items() if len(s) == 2 and k.endswith(
        ("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))), None)
    return tuple(embedding) if tied and embedding is not None else None


def _pow2_at_least(n: int) -> int:
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))


def data_driven_ranks(
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    tuned: str | Path | None = None,
    targets: list[str] | None = None,
    energy: float = 0.99,
    cap: int = RANK_CAP,
    progress: bool = False,
) -> dict[str, Any]:
    """Effective rank of each module's ΔW and a suggested ``r`` + ``rank_pattern`` (+ alphas).

    Each module needs rank k = the smallest number of singular values holding ``energy`` of
    ‖ΔW‖²; it is rounded up to a power of two and capped at ``cap`` and at the module's own largest
    rank (an adapter module's r, or min(out, in); "max_rank"). The global r is the most common such
    rank (the smaller on a tie), and modules that need another rank go into rank_pattern (PEFT's
    per-module override); ``alpha`` = 2r and ``alpha_pattern`` (2 × each pattern rank) keep every
    module's scaling alpha/r at 2, the rule table's. "kept" is the energy the suggested rank keeps (below ``energy`` where
    a cap bound it). Modules whose ΔW is exactly zero are left out.

    From a tuned model, ΔW also holds the rounding of the tuned weights to their dtype (bf16: ~2⁻⁸
    of each weight, a noise spread over every direction that can outweigh a small update's tail):
    singular values at or below a bound on the largest one that rounding alone gives
    (``rounding_floor``; "floor") are not counted as the update's, and a module with none above it
    is left out ("noise_only"). A grouped conv's suggested rank is a multiple of its groups.

    Args:
        adapter: a trained adapter directory; or
        base, tuned: a fully fine-tuned model beside its base.
        targets: restrict to these module names / suffixes (tuned-model mode).
        energy: energy fraction defining the suggested rank (0 < energy <= 1).
        cap: largest rank suggested (a positive integer).
        progress: show a progress bar over a tuned model's tensors on stderr (when a terminal).

    Returns:
        {"modules": [{module, max_rank, rank90, rank99, norm, floor, suggested, kept, capped}], "r",
        "rank_pattern", "alpha", "alpha_pattern", "energy", "noise_only": [module, ...]}.

    Raises:
        ValueError: on a bad energy or cap; when no module has a non-zero update above the rounding
            noise (an untrained adapter, whose B factors are zero; targets that match no 2-D weight;
            only changed tensors that are not matrices), the message saying which; a model weight
            holding NaN or inf.
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be a positive integer, got {cap!r}")
    found = delta_spectra_details(adapter=adapter, base=base, tuned=tuned, targets=targets, progress=progress)
    rows, noise_only = [], []
    for name, s in found.spectra.items():
        floor = found.floors.get(name, 0.0)
        signal = s[s > floor]
        if signal.numel() == 0:
            noise_only.append(name)
            continue
        need = energy_rank(signal, energy)
        suggested = min(cap, int(s.numel()), _pow2_at_least(max(1, need)))
        groups = found.groups.get(name, 1)
        if groups > 1:  # a grouped conv's rank is a multiple of its groups: rounded up (at most the
            # adapter's own r, itself a multiple), or down to one where that passes the cap
            up = groups * -(-suggested // groups)
            suggested = up if up <= cap or cap < groups else groups * (cap // groups)
        kept = float(signal[:suggested].square().sum() / signal.square().sum())
        rows.append({"module": name, "max_rank": int(s.numel()), "rank90": energy_rank(signal, 0.90),
                     "rank99": energy_rank(signal, 0.99), "norm": float(torch.linalg.vector_norm(s)),
                     "floor": floor, "suggested": suggested, "kept": kept, "capped": suggested < need})
    if not rows:
        raise ValueError(_no_update_message(found, noise_only, adapter, targets))
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["suggested"]] = counts.get(r["suggested"], 0) + 1
    r_global = max(sorted(counts), key=lambda k: counts[k])
    pattern = {r["module"]: r["suggested"] for r in rows if r["suggested"] != r_global}
    return {"energy": energy, "r": r_global, "rank_pattern": pattern, "alpha": 2 * r_global,
            "alpha_pattern": {m: 2 * k for m, k in pattern.items()}, "modules": rows, "noise_only": noise_only}


def _no_update_message(found: DeltaSpectra, noise_only: list[str], adapter: Any, targets: Any) -> str:
    """Why ``data_driven_ranks`` found nothing to analyse, in the words a user can act on."""
    if noise_only:
        return (f"no module has a non-zero weight update above the tuned weights' rounding noise: the "
                f"changes of {len(noise_only)} module(s) (e.g. {noise_only[0]!r}) are no larger than "
                "rounding them to their dtype gives")
    if adapter is not None:
        return "no module has a non-zero weight update to analyse (an untrained adapter: every B is zero)"
    if found.compared == 0:
        which = f"targets {list(targets)!r} match" if targets else "the tuned model has"
        return (f"no module has a non-zero weight update to analyse: {which} no 2-D weight that the base "
                "model has too")
    skipped = (f"; changed tensors that are not 2-D matrices were skipped: {', '.join(found.skipped[:3])}"
               f"{' ...' if len(found.skipped) > 3 else ''}") if found.skipped else ""
    return (f"no module has a non-zero weight update to analyse: the {found.compared} 2-D weight(s) compared "
            f"are equal in both models{skipped}")
