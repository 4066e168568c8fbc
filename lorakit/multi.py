"""One base, many experts: mixed-adapter batches, exact adapter combination, hot swap.

* **Mixed batches.** ``model(input_ids, adapter_names=["medical", "__base__", "legal"])`` runs each
  row with only its own adapter (``"__base__"``: none). A forward pre-hook on the root model, put
  there at injection, pops ``adapter_names``, checks it and groups the rows by adapter *once per
  forward* (a ``MixedBatchPlan``); every LoRA layer reads the plan from a context object shared by
  the model's layers and handles each group with slices (contiguous rows) or index_select /
  index_add_ (``LoraLayer.mixed_forward``); for few tokens (decode steps) Linear layers run all
  groups in two batched matmuls instead (``LoraLinear.mixed_forward``). A forward hook with ``always_call=True`` clears the plan,
  also when the forward raises (after Ctrl-C, which skips that hook, the next call in the thread
  does). Plans are per thread. ``transformers``' ``generate`` rejects unknown model kwargs, so use
  ``lorakit.generate(model, ..., adapter_names=...)`` or ``with adapter_batch(model, names):``.
* **combine_adapters.** ``method="cat"`` is exactly Σ wᵢ·ΔWᵢ (the A's stacked, the weighted, scaled
  B's stacked; rank Σ rᵢ); ``method="svd"`` truncates that exact sum to a chosen rank and returns
  the relative Frobenius error it made. The result is an ordinary adapter that saves in PEFT format
  (scaling folded into B, ``lora_alpha = r`` per module).
* **hotswap_adapter.** New weights (and alpha) for a loaded adapter, without re-injection.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import (ModulesToSave, check_adapter_name, ends_another, find_target_modules, get_state, inject_adapter, iter_lora_layers,
                            iter_saved_modules, mark_trainable, require_state)
from lorakit.variants import variant_for

#: Name that, in ``adapter_names``, means "this row runs the base model only" (as in PEFT).
BASE_NAME = "__base__"
_CONTEXT_KEY = "_lorakit_batch"

# ---------------------------------------------------------------------------- mixed batches


@dataclass(frozen=True)
class MixedBatchPlan:
    """Rows of one forward grouped by adapter.

    Attributes:
        batch_size: Number of rows the plan was made for.
        groups: ``(adapter name, rows)`` per distinct name in order of first use; ``rows`` is a
            ``slice`` when the rows are contiguous, else a LongTensor of row indices.
        names: The per-row names the plan was made from.
    """

    batch_size: int
    groups: tuple[tuple[str, slice | torch.Tensor], ...]
    names: tuple[str, ...]
    #: Per-forward scratch shared by the layers (e.g. the token layout of the batched decode path).
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)


class MixedBatchContext:
    """Per-model holder of the current ``MixedBatchPlan`` (thread-local, a stack for nesting).

    Every LoRA layer and ``ModulesToSave`` of a model holds the same instance, so setting the plan
    once per forward reaches all of them. Copies and pickles start empty.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        #: Layers holding stacks of the batched decode path (``LoraLinear.mixed_forward``, ``BatchedStacks``).
        self.batched_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        #: Guards ``batched_layers`` (a thread adding to it while another loops over it raised
        #: "Set changed size during iteration") and the ``generate`` wrapper's count below.
        self.lock = threading.Lock()
        #: ``adapter_batch`` blocks open on the model, all threads together, while they share one
        #: ``generate`` wrapper; and what the model's instance had as ``generate`` before the first.
        self.generate_blocks = 0
        self.generate_before: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def add_batched(self, layer: nn.Module) -> None:
        """Record that ``layer`` keeps stacks of the batched decode path (``check_layouts`` visits it)."""
        with self.lock:
            self.batched_layers.add(layer)

    def check_layouts(self, plan: MixedBatchPlan) -> None:
        """Mark the layers whose kept batched stacks still hold (same adapters, weights, scales) for ``plan``.

        Runs once per forward in the root pre-hook, in one loop: checked there, the stacks cost their
        layer a single comparison, where the same checks inside each layer's forward, between the
        base model's matmuls, ran several times slower (their code and data evicted from the caches).
        """
        with self.lock:
            layers = list(self.batched_layers)
        for layer in layers:
            stacks = layer.__dict__.get("_batched")
            if stacks is not None:
                stacks.check(plan, layer)

    @property
    def stack(self) -> list[list[Any]]:
        """This thread's entries: ``["hook", plan or None, the forward's frame]`` (one forward of
        the model; ``"part"``: of a part ``generate`` calls on its own, such as an encoder) or
        ``["scope", None, names, plan cache, inside generate]`` (an ``adapter_batch`` block)."""
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @property
    def plan(self) -> MixedBatchPlan | None:
        """The plan LoRA layers apply now, or None (then they use the active adapters)."""
        stack = getattr(self._local, "stack", None)
        return stack[-1][1] if stack else None


def _check_names(model: nn.Module, adapter_names: Any, what: str = "adapter_names") -> tuple[str, ...]:
    """Validate a per-row name list against the adapters on ``model`` (``what``: how errors name it)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise ValueError(f"{what} must be a list with one adapter name per row, got {adapter_names!r}")
    names = tuple(adapter_names)
    bad_types = [n for n in names if not isinstance(n, str)]
    if bad_types:
        raise ValueError(f"{what} must hold strings, got {bad_types[:3]}")
    state = get_state(model)
    known = set(state.configs) if state is not None else set()
    unknown = sorted({n for n in names if n != BASE_NAME and n not in known})
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown} in {what}; this model has {sorted(known)} "
                         f"(and {BASE_NAME!r} for the base model)")
    return names


def make_plan(names: Sequence[str], device: torch.device | str | None = None) -> MixedBatchPlan:
    """Group rows by adapter name: one slice per contiguous group, else one index tensor per name."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    groups: list[tuple[str, slice | torch.Tensor]] = []
    for name, idx in rows.items():
        if name == BASE_NAME:
            continue  # base rows need nothing: result already is the base output
        if idx[-1] - idx[0] + 1 == len(idx):
            groups.append((name, slice(idx[0], idx[-1] + 1)))
        else:
            groups.append((name, torch.tensor(idx, dtype=torch.long, device=device)))
    return MixedBatchPlan(len(names), tuple(groups), tuple(names))


def _batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor whose first dimension is the batch: first positional tensor, else a known kwarg."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for key in ("input_ids", "inputs_embeds", "pixel_values", "x", "input", "decoder_input_ids"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Root forward pre-hook: pop ``adapter_names`` and publish the row plan for the LoRA layers.

    Whenever it does anything it first pushes one "hook" entry (inheriting the plan in force), which
    ``_post_hook`` pops: so pushes and pops pair up even when a check below raises, or when the root
    module is called inside its own forward.
    """
    ctx: MixedBatchContext | None = module.__dict__.get(_CONTEXT_KEY)
    if ctx is None:
        return None
    return _push_plan(ctx, module, args, kwargs)


_CALL_IMPL = nn.Module._call_impl.__code__


def _calling_forward() -> Any:
    """The frame of ``nn.Module._call_impl`` that runs the hook calling this (None if not found)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _CALL_IMPL:
        frame = frame.f_back
    return frame


def _drop_stale_entries(stack: list[list[Any]], forward: Any) -> None:
    """Drop the "hook" / "part" entries of forwards that ended without their forward hook.

    torch runs ``always_call`` forward hooks when the forward raises an ``Exception``, but not on a
    ``KeyboardInterrupt`` (Ctrl-C) or ``SystemExit``: such a forward leaves its entry behind, and the
    thread's later calls would inherit its row plan. An entry whose forward frame is not among the
    frames calling this one belongs to a forward that is over.
    """
    running = set()
    frame = forward
    while frame is not None:
        running.add(id(frame))  # (the entries hold their frames: alive, so ids are unique)
        frame = frame.f_back
    stack[:] = [e for e in stack if e[0] == "scope" or e[2] is None or id(e[2]) in running]


def _push_plan(ctx: MixedBatchContext, root: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any], owner: str = "hook") -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``_pre_hook``'s work for a call of ``root`` (or, ``owner="part"``, of a part of it called on
    its own, such as the encoder ``generate`` runs directly) with these arguments."""
    stack = ctx.stack
    if "adapter_names" not in kwargs and not stack:
        return None  # the common case: a plain forward
    # (no frames under torch.compile: dynamo does not trace sys._getframe; such entries stay till popped)
    forward = None if torch.compiler.is_compiling() else _calling_forward()
    if any(e[0] != "scope" for e in stack):
        _drop_stale_entries(stack, forward)
    names = kwargs.pop("adapter_names", None)
    top = stack[-1] if stack else None
    entry = [owner, top[1] if top is not None else None, forward]
    stack.append(entry)
    scope = top if top is not None and top[0] == "scope" else None
    if names is None and scope is None:
        return args, kwargs
    if get_state(root) is None or not get_state(root).configs:
        raise ValueError("adapter_names was given, but this model has no LoRA adapters")
    if root.training and torch.is_grad_enabled() and _checkpointing(root):
        raise ValueError("mixed-adapter batches cannot run with gradient checkpointing: its recomputation in "
                         "backward would not know each row's adapter; disable it "
                         "(model.gradient_checkpointing_disable()) or train one adapter per batch")
    batch = _batch_of(args, kwargs)
    if batch is None or batch.dim() == 0:
        raise ValueError("adapter_names was given, but the forward has no batched tensor input to match it with")
    size, device = batch.shape[0], batch.device
    if names is not None:
        names = _check_names(root, names)
        if len(names) != size:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {size} rows")
        plan = make_plan(names, device)
    else:  # inside adapter_batch(...): generate may expand each row k times (beams, num_return_sequences)
        scope_names, cache = scope[2], scope[3]
        if size != len(scope_names) and not scope[4]:
            raise ValueError(f"adapter_batch was given {len(scope_names)} names, but the model was called with "
                             f"{size} rows: give one name per row (rows expanded k times, as beam search does, "
                             f"are matched only inside model.generate)")
        plan = cache.get((size, str(device)))
        if plan is None:
            if size % len(scope_names):
                raise ValueError(f"adapter_batch was given {len(scope_names)} names, but the model was called "
                                 f"with {size} rows (not a multiple)")
            repeat = size // len(scope_names)
            plan = cache[(size, str(device))] = make_plan([n for n in scope_names for _ in range(repeat)], device)
    entry[1] = plan
    if ctx.batched_layers:
        ctx.check_layouts(plan)
    return args, kwargs


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on somewhere in ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Root forward hook (``always_call``): drop the entry ``_pre_hook`` pushed, also after an error."""
    _pop_plan(module.__dict__.get(_CONTEXT_KEY))


def _pop_plan(ctx: MixedBatchContext | None, owner: str = "hook") -> None:
    """Drop the entry the matching pre-hook pushed (only that kind: a post-hook that runs without its
    pre-hook — another thread's block added the hooks during this call — must not pop another's)."""
    if ctx is not None and ctx.stack and ctx.stack[-1][0] == owner:
        ctx.stack.pop()


def _part_pre_hook(ctx: MixedBatchContext, root: nn.Module, module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Pre-hook on a part ``generate`` calls on its own (an encoder), put there at injection: while
    the calling thread has a block open or a forward running, it publishes their plan for the part's
    call as the root's pre-hook does for the model's (and drops entries of forwards stopped by
    Ctrl-C: a plain ``generate`` after a stopped mixed forward ran the encoder with its rows).

    One permanent pair for every thread: blocks used to add a pair each for their duration, and a
    thread calling the encoder while another thread's block added one met a hook torch had stored
    but not yet marked as taking keyword arguments (TypeError), or a post-hook without its pre-hook."""
    if not getattr(ctx._local, "stack", None) and "adapter_names" not in kwargs:
        return None  # the common case: a plain call, no block open in this thread
    return _push_plan(ctx, root, args, kwargs, "part")


def _part_post_hook(ctx: MixedBatchContext, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """``_part_pre_hook``'s pair (``always_call``): drop the entry it pushed."""
    _pop_plan(ctx, "part")


def _parts_called_alone(model: nn.Module) -> list[nn.Module]:
    """Parts of ``model`` that ``generate`` calls directly, not through the model's forward: the
    encoder of an encoder-decoder model (T5, BART, Whisper)."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get_encoder):
        return []
    encoder = get_encoder()
    return [encoder] if isinstance(encoder, nn.Module) and encoder is not model else []


def attach_mixed_batch(model: nn.Module) -> MixedBatchContext:
    """Give ``model`` (once) the hooks that accept ``adapter_names``, and every LoRA layer the context.

    Called at the end of every injection (idempotent). The hooks are plain functions that look the
    context up on the module they run on, so ``copy.deepcopy(model)`` gets a working, separate copy.
    """
    ctx = model.__dict__.get(_CONTEXT_KEY)
    if ctx is None:
        ctx = MixedBatchContext()
        model.__dict__[_CONTEXT_KEY] = ctx
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, always_call=True)
        for part in _parts_called_alone(model):
            part.register_forward_pre_hook(functools.partial(_part_pre_hook, ctx, model), with_kwargs=True)
            part.register_forward_hook(functools.partial(_part_post_hook, ctx), always_call=True)
    for _, layer in iter_lora_layers(model):
        layer.batch_context = ctx
    for _, wrapper in iter_saved_modules(model):
        wrapper.batch_context = ctx
    return ctx


def detach_mixed_batch(model: nn.Module) -> None:
    """Undo ``attach_mixed_batch``: drop the context and the two root hooks (``unload`` and
    ``merge_and_unload`` give back a model with nothing of lorakit left on it)."""
    if model.__dict__.pop(_CONTEXT_KEY, None) is None:
        return
    ours = (_pre_hook, _post_hook, _part_pre_hook, _part_post_hook)
    for module in (model, *_parts_called_alone(model)):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, v in hooks.items() if (v.func if isinstance(v, functools.partial) else v) in ours]:
                del hooks[key]  # (and the flags registering them set, as a RemovableHandle's remove does)
                for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    extra.pop(key, None)


def _context(model: nn.Module) -> MixedBatchContext:
    require_state(model)
    ctx = model.__dict__.get(_CONTEXT_KEY)
    return ctx if ctx is not None else attach_mixed_batch(model)


def names_in_open_batches(model: nn.Module) -> set[str]:
    """Adapter names the ``adapter_batch`` blocks open on ``model`` use."""
    ctx = model.__dict__.get(_CONTEXT_KEY)
    return {n for entry in (ctx.stack if ctx is not None else []) if entry[0] == "scope" for n in entry[2]}


_NOTHING = object()  # (no instance attribute)


class _BlockOnly:
    """The ``generate`` check ``adapter_batch`` puts on the model while blocks are open. A deep copy
    of the model made inside a block must not take it along: it would run the original model's
    ``generate``. The copy gets ``on_copy(copy of the model)`` instead."""

    def __init__(self, model: nn.Module, fn: Any, on_copy: Any) -> None:
        self.model, self.fn, self.on_copy = model, fn, on_copy
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = memo.get(id(self.model))  # copy.deepcopy puts the model's copy there first
        return self.on_copy(copied) if copied is not None else self


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, every call of ``model`` runs row i with adapter ``adapter_names[i]``.

    For ``model.generate``, which rejects unknown kwargs: ``generate`` must get one row per name;
    inside it, when the model is called with k times as many rows (beam search,
    ``num_return_sequences`` repeat each row k times in a row), each name is repeated k times. A
    direct call of the model in the block must have exactly one row per name (a multiple would be
    read as expanded rows, giving rows the wrong adapters). An explicit ``adapter_names=`` in a call
    wins over the block's.

    The block holds for the calls made in the thread that opened it (threads can each hold their
    own blocks on one model). A thread started inside the block does not see its names — for
    transformers' streaming recipe, run ``lorakit.generate(model, ..., adapter_names=...)`` as the
    thread's target instead of ``model.generate``.

    Args:
        model: A model with adapters.
        adapter_names: One adapter name per row (``"__base__"``: the base model).

    Raises:
        ValueError: unknown names, an empty list, or later a batch whose size does not fit.
    """
    names = _check_names(model, adapter_names)
    if not names:
        raise ValueError("adapter_names is empty; give one name per row")
    ctx = _context(model)
    from lorakit.layers.linear import new_weights_epoch

    new_weights_epoch()  # the batched path's stacks are read afresh: weights may have changed since
    entry = ["scope", None, names, {}, False]  # the last: inside model.generate (expanded rows allowed)
    # (a part that generate calls on its own, an encoder, publishes the block's plan for its calls
    # through the hooks attach_mixed_batch put on it: _part_pre_hook)
    ctx.stack.append(entry)
    shared = False
    try:
        shared = _enter_generate(model, ctx)
        yield model
    finally:
        # by identity: list.remove compares with ==, and an inner block with the same names has an
        # equal entry (it removed the outer one, and the outer block's end then raised ValueError)
        ctx.stack[:] = [e for e in ctx.stack if e is not entry]
        if shared:
            _leave_generate(model, ctx)


def _innermost_scope(ctx: MixedBatchContext) -> list[Any] | None:
    """This thread's innermost ``adapter_batch`` entry, or None."""
    return next((e for e in reversed(ctx.stack) if e[0] == "scope"), None)


def _enter_generate(model: nn.Module, ctx: MixedBatchContext) -> bool:
    """Put (with the first block open on ``model``, in any thread) the ``generate`` that checks its
    rows against the calling thread's innermost block; count the block. False if the model has no
    ``generate``.

    One wrapper serves every thread's blocks: it is an attribute of the model, which all threads
    share, so a wrapper per block, put back at the block's end to what it found, left another
    thread's wrapper on the model for good when two blocks ended out of order.
    """
    with ctx.lock:
        if ctx.generate_blocks:
            ctx.generate_blocks += 1
            return True
        generate = getattr(model, "generate", None)
        if not callable(generate):
            return False
        own = model.__dict__.get("generate", _NOTHING)

        def copy_generate(copied: nn.Module) -> Any:
            """A copy made inside a block gets its own ``generate``, as the model had it before."""
            return own if own is not _NOTHING else type(copied).generate.__get__(copied)

        def checked_generate(*args: Any, **kwargs: Any) -> Any:
            scope = _innermost_scope(ctx)
            if scope is None:  # a thread with no block open: the names of other threads' blocks are not its
                return generate(*args, **kwargs)
            names = scope[2]
            batch = _batch_of(args, kwargs)
            rows = batch.shape[0] if isinstance(batch, torch.Tensor) and batch.dim() > 0 else None
            if rows is not None and rows != len(names) and "adapter_names" not in kwargs:
                raise ValueError(f"adapter_batch was given {len(names)} names, but generate was called with "
                                 f"{rows} rows: give one name per row")
            outer, scope[4] = scope[4], True
            try:
                return generate(*args, **kwargs)
            finally:
                scope[4] = outer

        functools.update_wrapper(checked_generate, generate)
        ctx.generate_before = own
        ctx.generate_blocks = 1
        model.__dict__["generate"] = _BlockOnly(model, checked_generate, copy_generate)
        return True


def _leave_generate(model: nn.Module, ctx: MixedBatchContext) -> None:
    """Count a block out; with the last, give the model back the ``generate`` it had before."""
    with ctx.lock:
        ctx.generate_blocks -= 1
        if ctx.generate_blocks:
            return
        own, ctx.generate_before = ctx.generate_before, None
        if own is _NOTHING:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = own


def _saved_module_mixed_forward(wrapper: ModulesToSave, plan: MixedBatchPlan, args: tuple[Any, ...],
                                kwargs: dict[str, Any]) -> torch.Tensor:
    """``ModulesToSave`` in a mixed batch: each row group through its adapter's copy (else the original)."""
    def take(value: Any, rows: slice | torch.Tensor) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == plan.batch_size:
            return value[rows] if isinstance(rows, slice) else value.index_select(0, rows.to(value.device))
        return value

    covered = torch.zeros(plan.batch_size, dtype=torch.bool)
    parts: list[tuple[slice | torch.Tensor, torch.Tensor]] = []
    for name, rows in plan.groups:
        if name in wrapper.modules_to_save:
            covered[rows if isinstance(rows, slice) else rows.cpu()] = True
            module = wrapper.modules_to_save[name]
            out = module(*(take(a, rows) for a in args), **{k: take(v, rows) for k, v in kwargs.items()})
            parts.append((rows, out))
    rest = (~covered).nonzero().flatten()
    if len(rest):
        rows = slice(int(rest[0]), int(rest[-1]) + 1) if int(rest[-1] - rest[0]) + 1 == len(rest) else rest
        out = wrapper.original_module(*(take(a, rows) for a in args), **{k: take(v, rows) for k, v in kwargs.items()})
        parts.append((rows, out))
    if not all(isinstance(out, torch.Tensor) for _, out in parts):
        raise ValueError(f"mixed-adapter batches support modules_to_save that return one tensor, got {type(parts[0][1]).__name__}")
    first = parts[0][1]
    result = first.new_empty((plan.batch_size, *first.shape[1:]))
    for rows, out in parts:
        if isinstance(rows, slice):
            result[rows] = out
        else:
            result.index_copy_(0, rows.to(result.device), out)
    return result


def generate(model: nn.Module, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """``model.generate(*args, **kwargs)`` with one adapter per row (``"__base__"``: the base model).

    Args:
        model: A transformers model with adapters.
        *args: Passed to ``model.generate`` (e.g. ``input_ids``).
        adapter_names: One name per input row, or None for the active adapters.
        **kwargs: Passed to ``model.generate``.

    Returns:
        What ``model.generate`` returns.
    """
    if adapter_names is None:
        return model.generate(*args, **kwargs)
    adapter_names = _check_names(model, adapter_names)  # (a plain string was counted as its letters)
    inputs = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if k in kwargs), None)
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1 and len(adapter_names) != inputs.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the input has {inputs.shape[0]} rows; "
                         f"give one name per row")
    with adapter_batch(model, adapter_names):
        return model.generate(*args, **kwargs)


def parse_adapter_args(values: Sequence[str] | None) -> list[tuple[str | None, str]]:
    """``--adapter`` values of the CLI: ``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` -> (None, DIR).

    Raises:
        ValueError: an empty or repeated name, or a name with a dot or ``"__base__"``.
    """
    out: list[tuple[str | None, str]] = []
    for value in values or []:
        name, sep, directory = value.partition("=")
        if not sep or "/" in name or "\\" in name:
            out.append((None, value))  # a plain directory (it may contain "=" after a slash)
            continue
        if not name or "." in name or name == BASE_NAME or not directory:
            raise ValueError(f"--adapter {value!r}: expected NAME=DIR with a NAME without dots (not {BASE_NAME!r})")
        out.append((name, directory))
    names = [n for n, _ in out if n is not None]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--adapter names must be unique, got {repeated} more than once")
    if len(out) > 1 and any(n is None for n, _ in out):
        raise ValueError(f"with several --adapter, name each one (NAME=DIR), got {list(values or [])}")
    return out


def load_named_adapters(model: nn.Module, specs: Sequence[tuple[str, str | Path]]) -> nn.Module:
    """Load each ``(name, directory)`` onto ``model`` as its own adapter (for inference)."""
    from lorakit.io import load_adapter

    for name, directory in specs:
        load_adapter(model, directory, adapter_name=name)
    return model


def check_uses(model: nn.Module, uses: Sequence[str], n_prompts: int) -> list[str]:
    """``--use`` values of the CLI, checked: one known adapter (or ``"__base__"``) per prompt.

    Raises:
        ValueError: the counts differ or a name is unknown (the message lists the loaded ones).
    """
    if len(uses) != n_prompts:
        raise ValueError(f"got {len(uses)} --use for {n_prompts} prompt(s): give one --use per prompt "
                         "(quote each prompt)")
    return list(_check_names(model, uses, "--use"))


# ---------------------------------------------------------------------------- combine


@dataclass
class CombineReport:
    """What ``combine_adapters`` made.

    Attributes:
        name: The new adapter's name.
        method: "cat" or "svd".
        ranks: module path -> rank of the new adapter there.
        errors: module path -> ‖ΔW − ΔW_new‖_F / ‖ΔW‖_F (0 for "cat", exact by construction).
        overall_error: sqrt(Σ‖ΔW − ΔW_new‖²) / sqrt(Σ‖ΔW‖²) over all modules.
    """

    name: str
    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0


def _svd_truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of B @ A (B: (out, R), A: (R, in)) without forming B @ A.

    With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), B @ A = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the small
    core gives the exact singular values and vectors of the full product (Eckart–Young).

    Returns:
        ``(A_k (k, in), B_k (out, k), squared error, squared norm)`` in float64.
    """
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    B_k = (qb @ u[:, :k]) * root
    A_k = root[:, None] * (vh[:k] @ qa.T)
    return A_k, B_k, float(s[k:].square().sum()), float(s.square().sum())


def _layer_terms(layer: Any, weights: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stacked (A (R, ...), B (out, R, ...)) with B_i scaled by w_i·scaling_i, or None if untargeted."""
    names = [n for n, w in weights.items() if w != 0 and n in layer.lora_A]
    if not names:
        return None
    # in float32 at least: the weighted B's of bf16 adapters would otherwise be rounded to bf16
    dtype = torch.promote_types(layer.lora_A[names[0]].dtype, torch.float32)
    # A grouped Conv2d's B reads rank channels group by group (layers/conv2d.py): the stacked A
    # keeps each group's rows together, [A₁ of group 0; A₂ of group 0; A₁ of group 1; …], to meet
    # B's rows [B₁ | B₂] of each group. (One group: [A₁; A₂; …], B [B₁ | B₂ | …].)
    groups = layer.rank_groups
    A = torch.cat([layer.lora_A[n].detach().to(dtype).unflatten(0, (groups, -1)) for n in names], dim=1).flatten(0, 1)
    B = torch.cat([layer.lora_B[n].detach().to(dtype) * (weights[n] * layer.scaling[n]) for n in names], dim=1)
    return A, B


def combine_adapters(model: nn.Module, weights: Mapping[str, float], name: str, method: str = "cat",
                     rank: int | None = None) -> CombineReport:
    """Add adapter ``name`` whose update is Σᵢ wᵢ·ΔWᵢ (``cat``, exact) or its best rank-k fit (``svd``).

    ΔWᵢ = scalingᵢ · Bᵢ Aᵢ on every module adapter i targets; a module targeted by only some of the
    adapters gets only their terms. ``cat`` stacks [A₁; A₂; …] and [w₁s₁B₁, w₂s₂B₂, …] (rank Σ rᵢ
    there); ``svd`` keeps the top ``rank`` singular directions of that exact sum (Eckart–Young) and
    reports the relative Frobenius error. The scaling is folded into B and the new config says
    ``lora_alpha = r`` per module (``rank_pattern`` / ``alpha_pattern`` where ranks differ), so it
    saves and loads in PEFT format. The new adapter is neither activated nor trainable.

    Args:
        model: A model carrying the adapters to combine.
        weights: adapter name -> weight wᵢ (any real number; 0 drops the adapter).
        name: Name of the new adapter (must not exist).
        method: "cat" (exact, rank Σ rᵢ) or "svd" (rank ``rank``, approximate).
        rank: For "svd": the target rank (default: the largest rank among the inputs). Must be None
            for "cat".

    Returns:
        A ``CombineReport`` with per-module ranks and relative errors.

    Raises:
        ValueError: unknown method / adapters, bad weights or rank, a taken name, or adapters that
            are not plain sums of B @ A (DoRA and other forward-changing variants, modules_to_save,
            trained biases); ``svd`` on a grouped Conv2d (its rank channels are grouped; ``cat`` keeps them).
    """
    if method not in ("cat", "svd"):
        raise ValueError(f"method must be 'cat' (exact weighted sum) or 'svd' (truncated), got {method!r}")
    state = require_state(model)
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty mapping adapter name -> weight, got {weights!r}")
    unknown = [n for n in weights if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(state.configs)}")
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight of adapter {n!r} must be a finite number, got {w!r}")
    check_adapter_name(name)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists on this model; pick another name")
    if method == "cat" and rank is not None:
        raise ValueError(f"method='cat' keeps the exact rank Σ rᵢ; rank must be None, got {rank!r} (use method='svd')")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    weights = {n: float(w) for n, w in weights.items()}
    used = [n for n, w in weights.items() if w != 0]  # a weight of 0 drops its adapter, checks included
    for n in used:
        config = state.configs[n]
        if config.modules_to_save:
            raise ValueError(f"adapter {n!r} has modules_to_save {config.modules_to_save}: full modules have no low-rank sum")
        if config.bias != "none":
            raise ValueError(f"adapter {n!r} trains biases (bias={config.bias!r}): they are not part of B @ A")
    if rank is None:
        rank = max((layer.r[n] for _, layer in iter_lora_layers(model) for n in used if n in layer.r), default=1)

    report = CombineReport(name, method)
    new_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    err_sq = norm_sq = 0.0
    for path, layer in iter_lora_layers(model):
        for n in used:
            if n in layer.variants:
                raise ValueError(f"adapter {n!r} on {path} uses the {type(layer.variants[n]).__name__} variant, "
                                 "whose update is not B @ A; it cannot be summed exactly")
        terms = _layer_terms(layer, weights)
        if terms is None:
            continue
        A, B = terms
        total = A.shape[0]
        if method == "svd" and layer.rank_groups > 1:
            raise ValueError(f"{path} is a Conv2d with groups={layer.rank_groups}: its adapters' B reads the rank "
                             "channels group by group, which a truncated SVD of the sum does not keep; use method='cat'")
        if tuple(layer.a_shape(total)) != tuple(A.shape) or tuple(layer.b_shape(total)) != tuple(B.shape):
            raise ValueError(f"{type(layer).__name__} at {path}: rank is not dim 0 of A / dim 1 of B; cannot stack")
        if method == "cat":
            new_tensors[path] = (A.clone(), B.clone())
            report.ranks[path], report.errors[path] = total, 0.0
            continue
        A2 = A.reshape(total, -1).double()
        B2 = B.reshape(B.shape[0], total).double()
        A_k, B_k, err, norm = _svd_truncate(A2, B2, rank)
        k = A_k.shape[0]
        new_tensors[path] = (A_k.reshape(layer.a_shape(k)).to(A.dtype), B_k.reshape(layer.b_shape(k)).to(B.dtype))
        report.ranks[path] = k
        report.errors[path] = math.sqrt(err / norm) if norm > 0 else 0.0
        err_sq, norm_sq = err_sq + err, norm_sq + norm
    if not new_tensors:
        raise ValueError(f"adapters {list(weights)} with weights {weights} target no module (all weights zero?)")
    for path, pair in new_tensors.items():  # (weights near the dtype's limit overflow wᵢ·sᵢ·Bᵢ: an adapter of inf)
        if not all(bool(torch.isfinite(t).all()) for t in pair):
            raise ValueError(f"the combined adapter's factors on {path} hold NaN or inf (weights {weights} overflow "
                             f"{pair[1].dtype} there); use smaller weights")
    report.overall_error = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0

    config = _combined_config(model, used, report.ranks)
    inject_adapter(model, config, name, init_lora_weights=False)
    try:
        with torch.no_grad():
            for path, layer in iter_lora_layers(model):
                if path in new_tensors:
                    A, B = new_tensors[path]
                    layer.lora_A[name].copy_(A)
                    layer.lora_B[name].copy_(B)
    except BaseException:
        from lorakit.inject import _remove_adapter_everywhere

        _remove_adapter_everywhere(model, name)
        raise
    mark_trainable(model, only=name)  # its parameters start frozen, like any adapter not in set_trainable
    return report


def _combined_config(model: nn.Module, sources: list[str], ranks: dict[str, int]) -> LoraConfig:
    """PEFT-format config of a combined adapter: exact module paths, scaling 1 (lora_alpha = r).

    The paths are a list (PEFT matches an entry to a name or a dotted suffix of it) unless one of
    them is also the end of another module's path (``fc`` and ``block.fc``): then a regex that
    matches exactly the paths (PEFT and lorakit full-match a string), and ``^``-anchored pattern keys.
    """
    state = require_state(model)
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    paths = sorted(ranks)
    exact = ends_another(paths, [n for n, _ in model.named_modules() if n])
    targets: str | list[str] = "|".join(re.escape(p) for p in paths) if exact else paths
    # Escaped full paths: PEFT and lorakit read pattern keys as regexes matched at a name's end
    # ("(.*\.)?(key)$"); a leading ^ makes the key match only the path itself.
    rank_pattern = {("^" if exact else "") + re.escape(p): k for p, k in ranks.items() if k != r}
    first = state.configs[sources[0]]
    return LoraConfig(r=r, lora_alpha=r, target_modules=targets, rank_pattern=rank_pattern,
                      alpha_pattern={key: k for key, k in rank_pattern.items()}, init_lora_weights=False,
                      task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path,
                      inference_mode=True)


# ---------------------------------------------------------------------------- hot swap


def hotswap_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Replace adapter ``adapter_name``'s weights and alpha with those saved in ``directory``.

    No re-injection and no new tensors: the saved adapter must target the same modules with the
    same ranks and variant; A, B (and variant tensors, modules_to_save, trained biases) are copied
    into the existing parameters and the per-module scaling is updated from the new config's
    ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora``. Everything is checked before anything is
    written, so a mismatch leaves the model as it was.

    Args:
        model: A model that carries ``adapter_name``.
        directory: A PEFT-format adapter directory.
        adapter_name: The adapter to overwrite.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: the directory or its files are missing.
        ValueError: unknown or merged adapter, different targets / ranks / variant / keys / shapes.
    """
    from lorakit.io import checked_replacements, copy_checked, read_adapter_files

    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(state.configs)}")
    layers = {path: layer for path, layer in iter_lora_layers(model) if adapter_name in layer.lora_A}
    merged = [p for p, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged (e.g. in {merged[0]}); unmerge it before a hot swap")
    config, tensors = read_adapter_files(directory)
    old = state.configs[adapter_name]
    new_variant, old_variant = variant_for(config), variant_for(old)
    if type(new_variant) is not type(old_variant):
        def kind(variant: Any) -> str:
            return "plain LoRA" if variant is None else type(variant).__name__

        raise ValueError(f"{directory}: variant {kind(new_variant)} differs from the loaded adapter's "
                         f"{kind(old_variant)}; load it as a new adapter instead")
    targets = set(find_target_modules(model, config))
    if targets != set(layers):
        diff = sorted(targets ^ set(layers))
        raise ValueError(f"{directory}: targets differ from adapter {adapter_name!r}'s (e.g. {diff[:3]}); "
                         "a hot swap needs the same target modules")
    for path, layer in layers.items():
        if config.rank_for(path) != layer.r[adapter_name]:
            raise ValueError(f"{directory}: rank of {path} is {config.rank_for(path)}, the loaded adapter has "
                             f"{layer.r[adapter_name]}; a hot swap needs the same ranks")
    pairs = checked_replacements(model, adapter_name, config, tensors, directory)
    # every layer's new alpha and scaling worked out before anything is written (a failure there left
    # the new tensors with the old scalings)
    scales = {path: (config.alpha_for(path), config.scaling_for(path)) for path in layers}
    copy_checked(pairs)
    for path, layer in layers.items():
        layer.lora_alpha[adapter_name], layer.scaling[adapter_name] = scales[path]
        layer.set_dropout(adapter_name, config.lora_dropout)  # so the layers do what the stored config says
    config = copy.deepcopy(config)
    config.inference_mode = old.inference_mode
    state.configs[adapter_name] = config
    return model


__all__ = ["BASE_NAME", "CombineReport", "MixedBatchContext", "MixedBatchPlan", "adapter_batch",
           "attach_mixed_batch", "combine_adapters", "generate", "hotswap_adapter", "make_plan"]
