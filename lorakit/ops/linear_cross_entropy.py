"""Cross-entropy of a linear output head without ever holding the (tokens × vocab) logits.

For a causal LM with a 49k-token vocabulary the logits of a 4 × 256 batch are 1024 × 49152 floats:
200 MB, and autograd keeps them (plus the log-softmax) until backward. Since the head's weight is
usually frozen under LoRA, the only gradient the head needs to pass back is dL/dh = (softmax − onehot)·W,
a (tokens × hidden) matrix — 85 times smaller here. So this function walks the tokens in chunks,
computes each chunk's logits, loss and dL/dh right away, drops the logits, and saves only dL/dh for
backward: the same FLOPs as the plain path, and a peak of one chunk's logits.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lorakit.layers.fused import first_order_only
from lorakit.layers import gemm

#: Upper bound on the elements of one chunk's logits (fp32: 64 MB, the only chunk-sized buffer).
CHUNK_ELEMENTS = 1 << 24
#: On the CPU, also at most this many bytes of logits per chunk: below glibc's largest mmap threshold
#: (32 MiB), so that a freed chunk's memory is kept and reused by the next one. Each 64 MB chunk was
#: mapped fresh from the OS (oneDNN's product makes its own output per chunk; the no-oneDNN path's one
#: buffer per call): ~40,000 of a LoRA step's 55,000-65,000 page faults on the embedded model (4 × 256
#: tokens, fp32; 13,800-22,100 with 30 MiB chunks). On a 2-core Intel Xeon, whose faults are cheap, the
#: step's forward + backward time did not move beyond the noise (0.977, 1.015, 0.994 of it in three
#: interleaved A/B runs; bf16 1.003); the head alone took 528 against 535 ms, with no faults against
#: 49,107. Where a fault costs ~2.5 µs (the AMD EPYC of docs/training.md) that is ~0.1 s a step.
CPU_CHUNK_BYTES = 30 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int, grad_mode: bool) -> torch.Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # accumulate in fp32 (or fp64)
        # Under no_grad (evaluation) needs_input_grad still says True for a trainable weight; no
        # backward can follow there, so no gradient is computed (a full fine-tune's eval had built a
        # vocab x hidden gradient per call and thrown it away). grad_mode: the caller's grad mode
        # (inside forward it is always off).
        need_w = grad_mode and ctx.needs_input_grad[1]
        need_b = grad_mode and bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if grad_mode and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # One logits buffer for every chunk. A fresh one per chunk briefly held two (the next chunk's
        # product exists before the previous one is released), at the step's memory peak: the
        # benchmark's fp32 step peaked ~100 MB higher (benchmarks/train_step.py, 2 runs each).
        # With gradients, oneDNN's product (gemm.linear: fp32 on the CPU), which makes its own output:
        # then one chunk's logits at a time, each released before the next is computed. An evaluation
        # (no_grad) keeps torch's kernel, its loss the same bits as before.
        dnn = grad_mode and gemm.uses_onednn(hidden, weight) and gemm.worth_onednn(hidden[:chunk], weight)
        buf = None if dnn else torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            if buf is None:
                logits = probs = None  # (the previous chunk's, released before this one's exists)
                logits = gemm.linear(h, weight)
            else:
                logits = buf[:h.shape[0]]
                if h.dtype == acc and weight.dtype == acc:
                    torch.mm(h, weight.T, out=logits)
                else:
                    logits.copy_(h @ weight.T)
            if bias is not None:
                logits += bias.to(acc)
            rows = torch.arange(y.shape[0], device=y.device)
            picked = logits[rows, y]
            # Softmax in place over the logits buffer (no chunk-sized temporaries, unlike logsumexp):
            # loss = log Σ exp(z) − z_y, and d(loss)/d(logits) = softmax − onehot.
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=-1, keepdim=True)
            total += (peak.squeeze(-1) + norm.squeeze(-1).log() - picked).sum()
            probs.div_(norm)
            probs[rows, y] -= 1.0
            if grad_h is not None:
                grad_h[start:start + chunk] = gemm.times_weight(probs.to(weight.dtype), weight).to(hidden.dtype)
            if grad_w is not None:
                # probsᵀ h summed into the one (V, d) buffer in place (torch's addmm_). oneDNN's faster
                # product makes a fresh (V, d) tensor per chunk (113 MB for the embedded model, mapped
                # anew from the OS each time, ~28,000 page faults): its fp32 full fine-tuning head took
                # 0.68-0.81 s a step that way, 0.47-0.55 s this way (1024 tokens, 4 chunks).
                grad_w.addmm_(probs.T, h.to(acc))
            if grad_b is not None:
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @first_order_only('head + cross-entropy (linear_cross_entropy)', "compute the loss from the model's logits with F.cross_entropy")
    @once_differentiable  # higher-order gradients: a clear error, not silently wrong ones
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weightᵀ (+ bias)`` against ``labels``, chunk by chunk.

    Equal to ``F.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum",
    ignore_index=ignore_index)`` in value and gradients (tests compare them in float64), but the
    full logits never exist: peak extra memory is one chunk of logits.

    Args:
        hidden: ``(N, d)`` inputs of the output head (any float dtype, the weight's).
        weight: ``(V, d)`` head weight (``nn.Linear`` layout), of ``hidden``'s dtype (under autocast,
            the dtypes may differ: the product is autocast's).
        labels: ``(N,)`` integer target ids; ``ignore_index`` rows are skipped.
        bias: optional ``(V,)`` head bias.
        ignore_index: label value that contributes nothing.
        chunk_size: rows per chunk (a positive integer); default (None) keeps one chunk's logits
            under 2**24 elements (64 MB in fp32) and, on the CPU, 30 MiB (``CPU_CHUNK_BYTES``).

    Returns:
        A scalar in float32 (float64 for float64 inputs): the summed loss over non-ignored rows.

    Raises:
        ValueError: shapes or dtypes disagree, a label is out of the vocabulary, or ``chunk_size``
            is not a positive integer.
        TypeError: the labels are not integers.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit (N, d) x (V, d)")
    if weight.shape[0] == 0:  # (the default chunk divided by it: a ZeroDivisionError)
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} has no rows (an empty vocabulary): "
                         "there are no logits to take a loss over")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be ({hidden.shape[0]},)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: labels must be integer token ids, got {labels.dtype}")
    if labels.dtype != torch.long:
        labels = labels.long()  # (uint8 labels index as a mask; int32 ones take the same path as long)
    if not hidden.is_floating_point() or (hidden.dtype != weight.dtype
                                          and not torch.is_autocast_enabled(hidden.device.type)):
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the "
                         "same floating dtype (cast one, as the head's own matmul would need)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive integer or None, got {chunk_size!r}")
    keep = labels != ignore_index
    if not bool(keep.all()):
        hidden, labels = hidden[keep], labels[keep]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"linear_cross_entropy: label ids must be in [0, {weight.shape[0]}), got [{int(labels.min())}, {int(labels.max())}]")
    chunk = chunk_size
    if chunk is None:
        limit = CHUNK_ELEMENTS
        if hidden.device.type == "cpu":  # (the logits are float32, or float64 for float64 inputs)
            limit = min(limit, CPU_CHUNK_BYTES // torch.promote_types(hidden.dtype, torch.float32).itemsize)
        chunk = max(1, limit // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, int(chunk), torch.is_grad_enabled())
