"""Inference helpers shared by train / generate / chat / eval / merge.

* ``load_for_inference`` turns ``--model`` / ``--adapter`` into a ready model: the base model, with
  a trained adapter (a run directory or any PEFT adapter directory) loaded on top, or a full
  fine-tune's saved model.
* ``greedy_answers`` generates short answers for a batch of prompts (left padded, greedy).
* ``evaluate`` computes the held-out metrics the training table reports: the loss on answer
  tokens and the exact-match accuracy of generated answers.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F

from lorakit.config import read_json_object
from lorakit.train.data import (IGNORE_INDEX, Example, Tokenized, check_text, encode_prompt, pad_id_of,
                                iter_eval_batches, normalize_answer, tokenize_example)

RUN_INFO = "lorakit_run.json"


# --------------------------------------------------------------------------- precision
def cpu_supports_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX); else bf16 would be emulated.

    Asks torch's CPU probes (any operating system), then ``/proc/cpuinfo`` (Linux, a torch without
    the probes)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe, lambda: False)():
                return True
        except Exception:  # noqa: BLE001 (a private probe: any failure means "not known to")
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """Map ``auto`` to ``bf16`` or ``fp32`` for this machine; check the value.

    Raises:
        ValueError: for anything but auto / fp32 / bf16.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return precision


def autocast(precision: str) -> ContextManager[Any]:
    """bf16 autocast (over fp32 weights) for ``"bf16"``; nothing for ``"fp32"``.

    Used for full fine-tuning in bf16. LoRA in bf16 instead stores the frozen base weights in bf16
    (see ``lorakit.train.loop``), which needs no autocast.
    """
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def busy_cores(window: float = 0.3) -> float | None:
    """How many cores other work keeps busy right now, from two ``/proc/stat`` samples (Linux;
    elsewhere psutil's CPU use over the same window).

    Unlike the load average (a one-minute moving average, still high for a minute after a pip
    install or a finished job), this sees the machine as it is when training starts. Returns None
    where neither can be read.
    """
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = sample()
    except (OSError, ValueError, IndexError):
        try:
            import psutil  # (accelerate's dependency)

            return psutil.cpu_percent(interval=window) / 100 * (os.cpu_count() or 1)
        except ImportError:
            return None
    try:
        time.sleep(window)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def auto_threads(requested: int = 0) -> int:
    """Set and return torch's CPU thread count: ``requested``, or (0) one that fits the machine.

    Auto: torch's default (one per core), minus the cores other processes keep busy right now
    (``busy_cores``): on a busy machine OpenMP threads spend their time spin-waiting for each
    other, and one thread was measured 4-6x faster than two on the shared 2-core demo machine.
    """
    if requested:
        torch.set_num_threads(requested)
        return requested
    threads = torch.get_num_threads()
    busy = busy_cores()
    if busy is None:
        return threads
    free = max(1, round(threads - busy))
    if free < threads:
        torch.set_num_threads(free)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- loss
def _head_parts(model: Any) -> tuple[Any, Any] | None:
    """(backbone, output head) when logits are just ``head(backbone(x))``; None otherwise.

    Models that post-process their logits (Gemma-2's softcapping, Cohere's ``logit_scale``,
    Granite's division by ``logits_scaling``, ...) need their own forward: besides the config
    fields known to do so, a two-token forward checks it once per model (``_plain_logits``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None  # logits are post-processed; use the model's own forward
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is model:
        return None
    get_head = getattr(backbone, "get_output_embeddings", None)
    if callable(get_head) and get_head() is not None:
        return None  # a wrapper (e.g. a PeftModel) whose "backbone" is the whole LM, head included
    plain = _PLAIN_LOGITS.get(model)
    if plain is None:
        plain = _PLAIN_LOGITS[model] = _plain_logits(model, backbone, head)
    return (backbone, head) if plain else None


#: model -> whether its logits are ``head(backbone(x))`` as they are (``_plain_logits``).
_PLAIN_LOGITS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _plain_logits(model: Any, backbone: Any, head: Any) -> bool:
    """Whether ``model``'s logits for a two-token input are exactly its head applied to its backbone's
    output (in eval mode, without gradients; every module's mode is given back). A model that scales,
    caps or otherwise changes them, or whose forward fails on the probe, is not plain."""
    modes = [(m, m.training) for m in model.modules()]
    weight = getattr(head, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else None
    ids = torch.tensor([[0, 1]], device=device)
    try:
        model.eval()
        # (autocast off: a caller's bf16 autocast would round both sides, and the answer is cached)
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            want = model(input_ids=ids, use_cache=False).logits
            got = head(backbone(input_ids=ids, use_cache=False)[0])
        return want.shape == got.shape and torch.equal(want.float(), got.float())
    except Exception:  # (a forward that needs more than input ids: the model's own path is taken)
        return False
    finally:
        for module, mode in modes:
            module.training = mode


def loss_sum(model: Any, batch: dict[str, torch.Tensor], label_positions_only: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions, and how many there are.

    With ``label_positions_only`` the backbone's hidden states are gathered at the positions that
    predict a label and only those go through the output head, so the (tokens x vocab) logits of
    the prompt are never built: for a 49k vocabulary and answers of two tokens that is most of the
    head's time and memory. The result equals the plain path (``model(...).logits``), checked in
    tests/test_train.py.

    Args:
        model: a causal LM.
        batch: ``input_ids``, ``attention_mask``, ``labels`` (batch, seq).
        label_positions_only: run the head only at the positions that predict a label (False: the
            model's full logits, the plain path).

    Returns:
        ``(loss_sum, n_labels)``; ``loss_sum`` is an fp32 scalar tensor (fp64 on a float64 model:
        rounding it to fp32 put a relative error of ~1e-8 into every float64 gradient).
    """
    labels = batch["labels"][:, 1:]
    select = labels != IGNORE_INDEX
    rows, head = _label_rows(model, batch, select, label_positions_only)
    if type(head) is torch.nn.Linear:
        # Chunked head + loss: the (n_labels, vocab) logits never exist (lorakit/ops).
        from lorakit.ops import linear_cross_entropy

        return _wide(linear_cross_entropy(rows, head.weight, labels[select], bias=head.bias)), rows.shape[0]
    logits = rows if head is None else head(rows)  # (n_labels, vocab)
    return F.cross_entropy(_wide(logits), labels[select], reduction="sum"), rows.shape[0]


def _label_rows(model: Any, batch: dict[str, torch.Tensor], select: torch.Tensor, split_head: bool = True
                ) -> tuple[torch.Tensor, Any]:
    """What predicts each label (``select``: the shifted label positions, (batch, seq - 1)), one row
    per label: ``(hidden states, head)`` where the model's logits are ``head(backbone(x))`` and
    ``split_head`` is on, so the caller runs the head on those rows only; else ``(logits, None)``
    from the model's own forward."""
    parts = _head_parts(model) if split_head else None
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits[:, :-1][select], None
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
    return hidden[:, :-1][select], head


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when wider (float64)."""
    return t if t.dtype == torch.float64 else t.float()


class NothingToScore(ValueError):
    """``evaluate`` got no example with answer tokens (within ``max_length``)."""


def eval_loss(model: Any, data: list[Tokenized], batch_size: int, pad_id: int, precision: str) -> float:
    """Mean cross-entropy per answer token over ``data`` (model switched to eval mode and back)."""
    total, count = eval_loss_sum(model, data, batch_size, pad_id, precision)
    return total / max(count, 1)


def eval_loss_sum(model: Any, data: list[Tokenized], batch_size: int, pad_id: int, precision: str
                  ) -> tuple[float, int]:
    """``(summed cross-entropy, answer tokens)`` over ``data``: what ``eval_loss`` divides (without
    autograd: it runs between training steps, where autograd is on)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for _, batch in iter_eval_batches(data, batch_size, pad_id):
            with torch.no_grad(), autocast(precision):
                loss, n = loss_sum(model, batch)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    return total, count


# --------------------------------------------------------------------------- generation
def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end an answer: the tokenizer's eos, the model's ``generation_config.eos_token_id``
    (one or a list), and the end-of-turn token that the chat template puts after an assistant
    message (what the training labels end with; e.g. Gemma's ``<end_of_turn>``, which is not its
    eos)."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id)
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    try:
        probe = Example(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
        labels = [t for t in tokenize_example(tokenizer, probe, 64).labels if t != IGNORE_INDEX]
    except Exception:  # a template that cannot render the probe: the eos ids above stand
        labels = []
    if labels and labels[-1] in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        add(labels[-1])
    return ids


def max_positions(model: Any) -> int | None:
    """The longest sequence a table of learned positions allows: ``n_positions`` (GPT-2, GPT-J), or
    ``max_position_embeddings`` of GPT-Neo and OPT; None where nothing indexes past it (RoPE, ALiBi)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in ("gpt_neo", "opt") or hasattr(config, "n_positions"):
        value = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None
    return None


def fit_to_positions(model: Any, max_length: int, warn: Callable[[str], None] = print) -> int:
    """``max_length``, or the model's table of learned positions where that is shorter (a longer
    sequence would index past it), with a warning."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        warn(f"warning: --max-length {max_length} is more than the model's {limit} positions: sequences are "
             f"cut at {limit} tokens")
        return limit
    return max_length


def generation_limit(model: Any) -> int | None:
    """The longest sequence generation may reach: a table of learned positions cannot be indexed
    past; a rotary model's ``max_position_embeddings`` is the length it was trained for (and a bound
    on a runaway --max-new-tokens). None when the model states neither."""
    limit = max_positions(model) or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    precision: str = "fp32", stop_ids: list[int] | int | None = None,
                    row_tokens: list[int] | None = None) -> list[str]:
    """Greedy continuation of a batch of token-id prompts (left padded); returns the new text.
    ``stop_ids``: the tokens that end an answer, if the caller has them (default ``stop_token_ids``).
    ``row_tokens``: each row's own budget of new tokens (at most ``max_new_tokens``): its text is
    what generating it alone with that budget gives, whatever the other rows of the batch need."""
    pad = pad_id_of(tokenizer)
    width = max(len(p) for p in prompts)
    limit = generation_limit(model)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(f"a prompt of {width} tokens plus {max_new_tokens} new tokens exceeds the model's "
                         f"{limit} positions: shorten the prompt or lower --max-new-tokens")
    ids = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    stops = stop_token_ids(model, tokenizer) if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else stop_ids
    was_training = model.training
    model.eval()
    try:
        with autocast(precision):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=stops, temperature=None, top_p=None, top_k=None,
            )
    finally:
        model.train(was_training)
    ends = row_tokens if row_tokens is not None else [max_new_tokens] * len(prompts)
    texts = []
    for row, n in zip(out.tolist(), ends):
        new = row[width: width + n]
        # the text ends before its first stop token: one that is not a special token (an added
        # "<|im_end|>" of some tokenizers) would stay in it, and a graded answer then be wrong
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        texts.append(tokenizer.decode(new[:end], skip_special_tokens=True))
    return texts


@torch.no_grad()
def score_batch(model: Any, batch: dict[str, torch.Tensor], precision: str = "fp32",
                chunk: int = 512) -> tuple[torch.Tensor, list[list[int]]]:
    """Per-row summed answer-token loss, and the model's top token at every label position.

    The top tokens are what greedy decoding would emit if it had produced the reference so far
    (teacher forcing); ``evaluate`` uses them to skip generation where the outcome is already
    certain. The head runs only on label positions, ``chunk`` rows at a time.

    Returns:
        ``(loss_per_row (batch,), argmax tokens per row)``.
    """
    labels = batch["labels"][:, 1:]
    select = labels != IGNORE_INDEX
    with autocast(precision):
        inputs, head = _label_rows(model, batch, select)  # (hidden states or logits, one row per label)
        target = labels[select]
        ce, top = [], []
        for a in range(0, target.shape[0], chunk):
            lg = (inputs[a : a + chunk] if head is None else head(inputs[a : a + chunk])).float()
            ce.append(F.cross_entropy(lg, target[a : a + chunk], reduction="none"))
            top.append(lg.argmax(-1))
    rows = select.nonzero()[:, 0]
    losses = torch.zeros(labels.shape[0]).index_add_(0, rows, torch.cat(ce) if ce else torch.zeros(0))
    tops = torch.cat(top) if top else torch.zeros(0, dtype=torch.long)
    counts = select.sum(1).tolist()
    return losses, [t.tolist() for t in torch.split(tops, counts)]


def evaluate(model: Any, tokenizer: Any, examples: list[Example], max_length: int = 512,
             batch_size: int = 16, precision: str = "fp32", shortcut: bool = True) -> dict[str, Any]:
    """Held-out metrics: loss on answer tokens, and exact-match accuracy of generated answers.

    Accuracy is measured on the examples that end with an assistant message: the conversation
    before it is the prompt, the model answers greedily (a few tokens more than the reference),
    and both are compared after ``normalize_answer``.

    Greedy decoding is deterministic, so the loss pass (which already computes the model's top token
    at every answer position) settles most examples without generating (``shortcut``):

    - every answer token, the end-of-turn token included, is the top token: greedy decoding would
      write exactly the reference and stop -> correct;
    - the first top token, normalised, is not a prefix of the normalised reference: whatever
      follows, the normalised answer starts differently -> wrong.

    Only the remaining examples are generated. Up to floating-point near-ties this gives the same
    accuracy as generating every answer (``shortcut=False``; a test compares the two).

    Returns:
        ``{"loss", "accuracy" (None without answer examples), "n", "n_dropped" (examples with no
        answer token within ``max_length``, in neither metric), "n_labels" (the answer tokens the
        loss is the mean over), "n_accuracy", "n_generated", "predictions"}``; a prediction is
        ``{"reference", "generated", "correct", "example"}``, the last its place in ``examples``.
    """
    pad = pad_id_of(tokenizer)
    tokenized = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    # (an example whose answer max_length cut away has nothing to score; nor has a text cut to one token)
    scored = [i for i, t in enumerate(tokenized) if t.n_predicted]
    if not scored:
        raise NothingToScore(f"eval data: no example has answer tokens within max_length={max_length}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    tops: dict[int, list[int]] = {}
    try:
        for idx, batch in iter_eval_batches(tokenized, batch_size, pad, scored):
            row_loss, row_top = score_batch(model, batch, precision)
            total += float(row_loss.sum())
            count += sum(tokenized[i].n_predicted for i in idx)  # (a text example's first token is not predicted)
            tops.update(zip(idx, row_top))
    finally:
        model.train(was_training)

    predictions: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    special = set(tokenizer.all_special_ids)
    stop_ids = stop_token_ids(model, tokenizer)
    stops = set(stop_ids)
    for i, ex in enumerate(examples):
        if ex.answer is None or not tokenized[i].n_predicted:
            continue  # (an answer cut away by max_length counts in neither metric, as in training)
        if tokenized[i].cut:
            continue  # the last answer is cut short: its loss tokens count, but there is no whole answer to match
        ref = normalize_answer(ex.answer)
        single_turn = sum(m["role"] == "assistant" for m in ex.messages or []) == 1
        labels = [x for x in tokenized[i].labels if x != IGNORE_INDEX]
        if shortcut and single_turn and i in tops:
            if tops[i] == labels and labels[-1] in stops:
                predictions[i] = {"reference": ex.answer, "generated": ex.answer, "correct": True}
                continue
            first = tops[i][0]
            text = tokenizer.decode([first], skip_special_tokens=True)
            if first not in special and "\ufffd" not in text and not ref.startswith(normalize_answer(text)):
                predictions[i] = {"reference": ex.answer, "generated": text + "...", "correct": False}
                continue
        pending.append(i)
    limit = generation_limit(model)
    for b in range(0, len(pending), batch_size):
        chunk = pending[b : b + batch_size]
        prompts = [encode_prompt(tokenizer, examples[i].prompt_messages) for i in chunk]  # type: ignore[arg-type]
        needs = [min(len(tokenizer(examples[i].answer, add_special_tokens=False)["input_ids"]) + 2, 256) for i in chunk]
        if limit is None or max(map(len, prompts)) + max(needs) <= limit:
            # (each row cut to its own budget: a short answer batched with a long one was graded on
            # the extra tokens, so accuracy moved with --batch-size: 0.5 at 1, 0.0 at 2)
            outs: list[str | None] = list(greedy_generate(model, tokenizer, prompts, max(needs), precision, stop_ids,
                                                          row_tokens=needs))
        else:
            # together the rows would run past the model's positions: each on its own, with the new
            # tokens that fit after its prompt (its whole answer fits: prompt + answer <= max_length)
            outs = [greedy_generate(model, tokenizer, [p], min(n, limit - len(p)), precision, stop_ids)[0]
                    if limit - len(p) >= 1 else None for p, n in zip(prompts, needs)]
        for i, out in zip(chunk, outs):
            if out is None:
                continue  # no room to generate after the prompt: not scored for accuracy
            ok = normalize_answer(out) == normalize_answer(examples[i].answer)  # type: ignore[arg-type]
            predictions[i] = {"reference": examples[i].answer, "generated": out, "correct": ok}
    n_qa = len(predictions)
    correct = sum(p["correct"] for p in predictions.values())
    return {
        "loss": total / max(count, 1),
        "accuracy": correct / n_qa if n_qa else None,
        "n": len(scored),
        "n_dropped": len(examples) - len(scored),
        "n_labels": count,
        "n_accuracy": n_qa,
        "n_generated": len(pending),
        "predictions": [predictions[i] | {"example": i} for i in sorted(predictions)],
    }


# --------------------------------------------------------------------------- loading
def read_run_info(directory: str | Path) -> dict[str, Any]:
    """The ``lorakit_run.json`` of a run directory, or {} if absent.

    Raises:
        ValueError: naming the file, if it is not a JSON object.
    """
    path = Path(directory) / RUN_INFO
    if path.is_file():
        return read_json_object(path)
    return {}


def is_full_finetune_run(directory: str | Path) -> bool:
    """True for the run directory of a ``--method full`` run: a whole model in model/, no adapter."""
    path = Path(directory)
    return (path / "model" / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def quantize_qlora_base(model: Any) -> Any:
    """The frozen base ``lorakit train --method qlora`` trains on, in place: every ``nn.Linear`` but
    ``lm_head`` in NF4. Training and inference both call this, so an adapter is always loaded onto
    the base it was trained against; on a model already quantised it changes nothing."""
    from lorakit import quantize_model_nf4

    return quantize_model_nf4(model, skip=["lm_head"])


def load_for_inference(model: str | None = None, adapter: str | None = None,
                       dtype: torch.dtype | str | None = torch.float32, merge: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Load the model the inference commands run: base, base + adapter, or a full fine-tune.

    Args:
        model: ``--model`` (None = the base recorded with the adapter, else the embedded default).
        adapter: a run directory from ``lorakit train`` or a PEFT adapter directory.
        dtype: weight dtype, or a ``--precision`` value (``bf16`` -> bfloat16 base weights); None:
            the precision a ``lorakit train`` run recorded (so its eval table is reproduced), else auto.
        merge: fold the adapter into the base weights in memory (``merge_and_unload``): the model
            then runs at the base model's speed; on a bf16 base the merged weights are rounded to
            bf16, so its outputs can differ slightly from the unmerged adapter's.

    A QLoRA run's adapter is loaded onto the base quantised to NF4 as in training (so it computes
    what was trained); with ``merge`` it is folded into the dense base instead (the usual QLoRA
    export: close to, not equal to, the NF4 model's outputs).

    Returns:
        ``(model, tokenizer, info)``; ``info`` describes what was loaded, and its ``"amp"`` is the
        precision to run it in (``"bf16"``: autocast, for a full fine-tune trained that way).

    Raises:
        FileNotFoundError: if the adapter directory holds neither an adapter nor a model.
        ValueError: ``merge`` without an adapter, or with a full fine-tune (nothing to merge).
    """
    from lorakit import load_adapter, merge_and_unload
    from lorakit.models import load_model_and_tokenizer

    if merge and adapter is None:
        raise ValueError("--merge folds an adapter into the base weights: give it --adapter DIR")
    run = read_run_info(Path(adapter)) if adapter is not None and Path(adapter).is_dir() else {}
    info: dict[str, Any] = {"model": model, "adapter": adapter, "merged": merge, "amp": "fp32"}
    if dtype is None:
        recorded = run.get("precision")
        dtype = recorded if recorded in ("fp32", "bf16") else "auto"
        if run.get("method") == "full" and dtype == "bf16":
            # a full fine-tune trained (and evaluated itself) with fp32 weights under bf16 autocast
            dtype, info["amp"] = "fp32", "bf16"
    if isinstance(dtype, str):
        dtype = torch.bfloat16 if resolve_precision(dtype) == "bf16" else torch.float32
    if adapter is None:
        m, tok = load_model_and_tokenizer(model, dtype=dtype)
        return m, tok, info
    path = Path(adapter)
    if not adapter.strip():
        raise ValueError("--adapter needs a directory, got an empty path")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--adapter {adapter!r} is a file; give the directory that holds adapter_config.json "
                         "(a lorakit run or PEFT adapter directory)")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {adapter!r} not found")
    if is_full_finetune_run(path):
        if merge:
            raise ValueError(f"--merge: {adapter!r} is a full fine-tune (its model/ holds every weight), "
                             "there is no adapter to merge")
        if model is not None:
            raise ValueError(f"--adapter {adapter!r} is a full fine-tune (its model/ holds the whole model), so it "
                             f"takes no --model: give --adapter {adapter} alone")
        m, tok = load_model_and_tokenizer(str(path / "model"), dtype=dtype)  # a full fine-tune run
        info["model"], info["adapter"] = str(path / "model"), None
        return m, tok, info
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter!r} holds no adapter_config.json (and no model/): not a lorakit run or PEFT adapter "
            "directory (a run that was interrupted keeps its state in checkpoint/: resume it first)"
        )
    if model is None:
        from lorakit.models import DEFAULT_MODEL_NAME

        model = run.get("model")
        if run.get("model_in_process") and not model:
            raise ValueError(f"{adapter!r} was trained on a model given to train() in-process, with no name or "
                             "path to record: give its base with --model")
        if model and not os.path.exists(model):  # (a run made before runs recorded absolute paths)
            raise FileNotFoundError(f"the base model {model!r} recorded in {str(path / RUN_INFO)!r} is not found "
                                    "from this directory: give the base with --model")
        if model is None and "model" not in run:
            recorded = read_json_object(path / "adapter_config.json").get("base_model_name_or_path")
            if isinstance(recorded, str) and recorded and os.path.exists(recorded):
                model = recorded
            elif isinstance(recorded, str) and recorded and Path(recorded).name.lower() != DEFAULT_MODEL_NAME.lower():
                raise FileNotFoundError(
                    f"{str(path / 'adapter_config.json')!r} names the base model {recorded!r}, which is not a local "
                    "path here (nothing is downloaded from a model hub): give the base with --model DIR")
    info["model"] = model
    m, tok = load_model_and_tokenizer(model, dtype=dtype)
    if run.get("method") == "qlora" and not merge:
        quantize_qlora_base(m)
        info["quantized"] = "nf4"
    load_adapter(m, path, is_trainable=False)
    if merge:
        m = merge_and_unload(m)
    m.eval()
    return m, tok, info


def chat_loop(model: Any, tokenizer: Any, max_new_tokens: int, precision: str, system: str | None = None,
              read: Callable[[str], str] | None = None, write: Callable[[str], None] = print) -> int:
    """Interactive chat with the chat template; EOF (Ctrl-D), ``/exit`` or Ctrl-C at the prompt ends
    it cleanly, and Ctrl-C during a reply stops that reply and keeps the conversation.

    Commands: ``/reset`` clears the history, ``/exit`` quits; any other line starting with ``/`` is
    refused as an unknown command (``//`` sends a message that begins with ``/``).

    Returns:
        0 (the exit code).
    """
    if read is None and sys.stdin is None:  # (`lorakit chat <&-`: raised AttributeError on None.isatty)
        raise ValueError("chat reads its messages from standard input, which is closed; give them on stdin, "
                         "or use `lorakit generate PROMPT`")
    piped = read is None and not sys.stdin.isatty()  # a terminal echoes what is typed; a pipe does not
    if read is None:
        # a byte that is not UTF-8 becomes a lone surrogate, which check_text refuses for that message;
        # in a strict locale it raised UnicodeDecodeError and ended the session with the lines around it
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (a stdin that is no text file)
            sys.stdin.reconfigure(errors="surrogateescape")
    read = read or input  # looked up at call time, so tests can replace builtins.input
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
    stop_ids = stop_token_ids(model, tokenizer)
    write("chat with the model: /reset clears the history, /exit or Ctrl-D quits")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return 0
        text = line.strip()
        if piped:
            # so a transcript reads "you> question" then "model> answer" (bytes that are not UTF-8 as U+FFFD)
            write(line.rstrip("\n").encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system is not None else []
            continue
        if text.startswith("//"):
            text = text[1:]  # "//x" sends "/x"
        elif text.startswith("/"):  # a mistyped command must not go to the model as a message
            write(f"unknown command {text.split()[0]}: /reset clears the history, /exit quits "
                  "(start a message with // to send one beginning with /)")
            continue
        try:
            check_text(text, "the message")
        except ValueError as exc:  # (a message, not the session, is what was wrong)
            write(f"error: {exc}")
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = greedy_generate(model, tokenizer, [encode_prompt(tokenizer, history)], max_new_tokens, precision,
                                    stop_ids)[0]
        except KeyboardInterrupt:
            history.pop()
            write("\n(interrupted)")
            continue
        except ValueError as exc:  # the conversation outgrew the model's positions: keep the session
            history.pop()
            write(f"error: {exc}; /reset starts a new conversation")
            continue
        reply = reply.strip()
        history.append({"role": "assistant", "content": reply})
        write(f"model> {reply}")


def format_metric(value: float | None, percent: bool = False) -> str:
    """A table cell: ``-`` for missing values, a percentage or 4 decimals otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"
