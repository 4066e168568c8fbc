"""Measure the peak tensor memory of a real training step on CPU, to validate the estimator.

How the peak is measured, and why this way: PyTorch's CPU allocator reports every allocation
and every free to the profiler when ``profile_memory=True``. Replaying those events in time order
gives the exact number of tensor bytes alive at each instant of the step; its maximum, added to
the bytes already alive when the step starts (parameters, buffers, optimizer states, the batch),
is the step's peak. This counts what the estimator models — tensors — and nothing else: no
allocator caching, no fragmentation, no library code pages, so it is deterministic and does not
depend on what else runs on the machine. (The process's resident set size is the other common
measure; ``benchmarks/estimate_vs_measured.py`` reports it too, from a fresh subprocess, as a
cross-check with those overheads included.)

A warm-up step runs first so that the optimizer states exist, as in every step but the first.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lorakit.analysis.estimate import ModelShape

MEMORY_EVENT = "[memory]"


@dataclass
class StepMemory:
    """Measured memory of one training step (bytes).

    Attributes:
        baseline: tensors alive before the step (parameters, buffers, optimizer states, batch).
        peak: baseline + the highest rise during the step.
        end: tensors alive after the step (gradients kept, as after ``optimizer.step()``).
    """

    baseline: int
    peak: int
    end: int


def live_tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, batch: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p for p in model.parameters()] + [b for b in model.buffers()] + list(batch)
    out += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def measure_step_peak(
    model: nn.Module,
    input_ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    warmup: int = 1,
    step_fn: Callable[[], None] | None = None,
) -> StepMemory:
    """Run ``warmup`` training steps, then measure the peak tensor memory of one more.

    A step is ``zero_grad(set_to_none=True)``; ``loss = model(input_ids, labels=input_ids).loss``;
    ``loss.backward()``; ``optimizer.step()``.

    Args:
        model: a causal LM returning an object with ``.loss``.
        input_ids: (batch, seq) token ids.
        optimizer: the optimizer over the trainable parameters.
        warmup: steps run before measuring (>= 1 so optimizer states exist).
        step_fn: optional replacement for the step above.

    Returns:
        A :class:`StepMemory`.
    """
    from torch.profiler import ProfilerActivity, profile

    def default_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()

    step = step_fn or default_step
    model.train()
    for _ in range(max(0, warmup)):
        step()
    optimizer.zero_grad(set_to_none=True)
    # Tensors a step leaves in reference cycles (a forward's outputs can form some) live until the
    # cycle collector runs, whose timing depends on every object the process made before: run
    # mid-step, it freed them before the peak, and the measured peak fell by their size (a CI run:
    # 0.61 MB, a logits tensor, under the usual value). So: earlier steps' cycles collected now, and
    # the collector paused while the step is measured.
    gc.collect()
    baseline = live_tensor_bytes(_state_tensors(model, optimizer, [input_ids]))
    enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        if enabled:
            gc.enable()
    # Memory events carry the signed size of one allocation (+) or free (-) and a timestamp.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    events.sort(key=lambda e: e.start_ns())
    current = rise = 0
    for e in events:
        current += e.nbytes()
        rise = max(rise, current)
    end = live_tensor_bytes(_state_tensors(model, optimizer, [input_ids]))
    return StepMemory(baseline=baseline, peak=baseline + rise, end=end)


def build_llama(shape: ModelShape, seed: int = 0, attention: str = "sdpa") -> nn.Module:
    """A randomly initialised ``transformers`` LlamaForCausalLM with the given shape (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings, attention_bias=shape.attention_bias,
        mlp_bias=shape.mlp_bias, max_position_embeddings=4096,
    )
    cfg._attn_implementation = attention
    return LlamaForCausalLM(cfg)


def add_lora(model: nn.Module, r: int, target_modules: tuple[str, ...]) -> nn.Module:
    """Inject LoRA adapters (alpha = 2r, no dropout) and freeze the base.

    Uses lorakit's own injection when the core is available, PEFT otherwise.
    """
    try:
        from lorakit import LoraConfig, get_lora_model  # type: ignore[attr-defined]
    except ImportError:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        return get_peft_model(model, PeftLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                    target_modules=list(target_modules)))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(target_modules))
    return get_lora_model(model, cfg)


def measure_config(
    shape: ModelShape,
    method: str,
    batch_size: int,
    seq_len: int,
    r: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    optimizer: str = "adamw",
    model: nn.Module | None = None,
    seed: int = 0,
    attention: str = "sdpa",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Build (or take) a model, train one measured step in fp32, and return the measurement.

    Args:
        shape: model shape (used to build a random model when ``model`` is None).
        method: "full" or "lora".
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        r: LoRA rank.
        target_modules: LoRA targets.
        optimizer: "adamw" or "sgd".
        model: an existing fp32 model with this shape (e.g. the embedded one).
        seed: RNG seed for the model and the batch.
        attention: "sdpa" or "eager" (for a built model).
        gradient_checkpointing: enable transformers' per-layer checkpointing (non-reentrant).

    Returns:
        {"baseline", "peak", "end"} in bytes.

    Raises:
        ValueError: on an unsupported method or optimizer.
    """
    if method not in ("full", "lora"):
        raise ValueError(f"measurement supports method 'full' or 'lora', got {method!r}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"measurement supports optimizer 'adamw' or 'sgd', got {optimizer!r}")
    net = model if model is not None else build_llama(shape, seed, attention)
    if gradient_checkpointing:
        from lorakit.models import enable_checkpointing

        enable_checkpointing(net)
        if method == "lora":
            net.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if method == "lora":
        net = add_lora(net, r, target_modules)
    params = [p for p in net.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    else:
        opt = torch.optim.SGD(params, lr=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab_size, (batch_size, seq_len), generator=gen)
    m = measure_step_peak(net, ids, opt)
    return {"baseline": m.baseline, "peak": m.peak, "end": m.end}
