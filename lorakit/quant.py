"""4-bit NormalFloat (NF4) storage of frozen base weights, for QLoRA (Dettmers et al. 2023).

    W ≈ c_b · q[idx],   idx ∈ {0..15} per weight,   c_b = absmax of block b (64 weights)

``q`` are the 16 NF4 levels (QLoRA §3, "4-bit NormalFloat": quantiles of N(0, 1) rescaled to
[-1, 1] with an exact zero; the values are those of Appendix E / bitsandbytes). Each block of 64
consecutive weights shares one absmax ``c_b``. *Double quantization* (§3) stores the block absmaxes
themselves in 8 bits: subtract their mean, then quantise each group of 256 with its own fp32 absmax:
4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight instead of 4 + 32/64 = 4.5.

Why our own ~100 lines rather than torchao's ``NF4Tensor`` (torchao 0.18, installs with
``--no-deps`` and runs on CPU with torch 2.13): its tensor subclass (1) needs the number of blocks
to be a multiple of the 256-block scale group, which SmolLM2's 576-wide projections are not
(5184 blocks for q_proj), (2) re-quantises on ``clone``/``deepcopy`` (and fails there even with a
custom group size, since the copy uses the defaults), and (3) would be cast by ``model.to(bf16)``.
Here the state is four plain buffers (codes ``uint8``, scales ``int8``, group factors and mean
bit-cast to ``int32`` so ``.to(dtype)`` never touches them), any shape is padded, and copies are
exact. ``benchmarks/qlora_quality.py`` checks that both give the same reconstruction error.
"""
from __future__ import annotations

import re

import torch
from torch import nn

#: The 16 NF4 levels (QLoRA Appendix E; bitsandbytes ``get_4bit_type("nf4")``).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_TINY = 1e-12


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


#: weights dequantised per chunk (fp32 work of ~6 bytes each: 6 MiB)
_DEQUANT_CHUNK = 1 << 20


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2): byte ``hi << 4 | lo`` -> (level[hi], level[lo]), so one lookup decodes two weights."""
    levels = _levels(device)
    return torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = 64, scale_block_size: int = 256) -> dict[str, torch.Tensor]:
    """Quantise ``weight`` to NF4 with double-quantised block scales.

    Args:
        weight: Any floating tensor; it is flattened (row-major) into blocks of ``block_size``.
        block_size: Weights per absmax block (64 in QLoRA), even.
        scale_block_size: Block scales per second-level group (256 in QLoRA).

    Returns:
        Buffers: ``codes`` uint8 (two 4-bit level indices per byte), ``scales`` int8 (one per block),
        ``group_factors`` fp32 bit-cast to int32 (one per group), ``scale_mean`` fp32 bit-cast to int32.

    Raises:
        ValueError: bad block sizes, or a non-floating / non-finite weight.
    """
    for what, value in (("block_size", block_size), ("scale_block_size", scale_block_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"NF4 {what} must be an integer, got {value!r}")
    if block_size < 2 or block_size % 2 or scale_block_size < 1:
        raise ValueError(f"NF4 needs an even block_size >= 2 and scale_block_size >= 1, got {block_size}, {scale_block_size}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"NF4 quantisation needs a float32 / float16 / bfloat16 / float64 weight, got dtype {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"NF4 quantisation needs a weight with elements, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"NF4 quantisation needs a finite weight; this one holds {bad} NaN/inf value(s)")
    flat = weight.detach().reshape(-1).to(torch.float32)
    n_blocks = -(-flat.numel() // block_size)
    flat = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    blocks = flat.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # c_b, first-level constants
    # Double quantization (§3): int8 of (c_b − mean) with an fp32 absmax per group of scale_block_size.
    mean = absmax.mean()
    if not torch.isfinite(mean):  # (the fp32 sum of block maxima near 1e38 overflows)
        raise ValueError(f"NF4 quantisation: weights of magnitude {float(absmax.max()):.3g} are too large for "
                         "fp32 block scales")
    n_groups = -(-n_blocks // scale_block_size)
    centred = torch.nn.functional.pad(absmax - mean, (0, n_groups * scale_block_size - n_blocks)).view(n_groups, -1)
    group_factors = centred.abs().amax(dim=1).clamp_min(_TINY) / 127.0
    # Each block's int8 scale code is the nearest one below or above (c_b − mean)/f, whichever
    # reconstructs the block better (the codes are normalised by the *dequantised* scale, as used at
    # load time). The nearest code alone could put a block far smaller than the rest of its group
    # below its absmax — clipping its largest weights — or at a scale ≤ 0, flipping every sign in
    # it; the code above always covers the absmax, so the better of the two never does worse.
    levels = _levels(flat.device)
    bounds = (levels[1:] + levels[:-1]) / 2
    ratio = centred / group_factors[:, None]

    def encode(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 scale codes, level indices, squared error per block) with these scale codes."""
        q = code.clamp(-127, 127).to(torch.int8).reshape(-1)[:n_blocks]
        scale = _dequantize_scales(q, group_factors, mean, scale_block_size)  # as dequantize_nf4 will use it
        idx = torch.bucketize((blocks / scale.clamp_min(_TINY)[:, None]).clamp(-1, 1), bounds)  # nearest level
        return q, idx, (levels[idx] * scale[:, None] - blocks).square().sum(dim=1)

    (q_down, idx_down, err_down), (q_up, idx_up, err_up) = encode(torch.floor(ratio)), encode(torch.ceil(ratio))
    up = err_up < err_down
    scales_q = torch.where(up, q_up, q_down)
    idx = torch.where(up[:, None], idx_up, idx_down).reshape(-1).to(torch.uint8)
    codes = (idx[0::2] << 4) | idx[1::2]
    return {
        "codes": codes,
        "scales": scales_q,
        "group_factors": group_factors.view(torch.int32),
        "scale_mean": mean.reshape(1).view(torch.int32),
    }


def _dequantize_scales(scales_q: torch.Tensor, group_factors: torch.Tensor, mean: torch.Tensor, scale_block_size: int) -> torch.Tensor:
    n = scales_q.numel()
    factors = group_factors.repeat_interleave(scale_block_size)[:n]
    return scales_q.to(torch.float32) * factors + mean


def dequantize_nf4(state: dict[str, torch.Tensor], shape: torch.Size | tuple[int, ...], block_size: int = 64,
                   scale_block_size: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the dense weight of shape ``shape`` from ``quantize_nf4``'s buffers, in ``dtype``."""
    codes = state["codes"]
    scale = _dequantize_scales(state["scales"], state["group_factors"].view(torch.float32),
                               state["scale_mean"].view(torch.float32), scale_block_size)
    table = _pair_table(codes.device)
    numel = 1
    for d in shape:
        numel *= int(d)
    blocks = scale.numel()
    out = torch.empty(blocks * block_size, dtype=dtype, device=codes.device)
    rows = out.view(blocks, block_size)
    # In chunks of blocks, so that the fp32 work (the looked-up levels times their block scale, and
    # the int32 indices the lookup needs) stays a few MB instead of ~6 bytes per weight on top of the
    # result: the result is the only weight-sized tensor. Bitwise the one-shot computation.
    step = max(1, _DEQUANT_CHUNK // block_size)
    half = block_size // 2
    for start in range(0, blocks, step):
        stop = min(blocks, start + step)
        levels = table.index_select(0, codes[start * half:stop * half].int()).view(stop - start, block_size)
        rows[start:stop] = levels.mul_(scale[start:stop, None])
    return out[:numel].view(tuple(shape))


def nf4_memory(model: nn.Module) -> dict[str, float]:
    """Resident bytes of the NF4-quantised weights in ``model`` (codes + all scale levels).

    Returns:
        ``{"params": quantised weights, "bytes": their storage, "bits_per_param": 8·bytes/params}``.
    """
    from lorakit.layers.nf4_linear import LinearNF4

    params = nbytes = 0
    for module in model.modules():
        if isinstance(module, LinearNF4):
            params += module.in_features * module.out_features
            nbytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return {"params": params, "bytes": nbytes, "bits_per_param": 8.0 * nbytes / params if params else 0.0}


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def quantize_model_nf4(model: nn.Module, skip: list[str] | None = None, block_size: int = 64,
                       scale_block_size: int = 256) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a frozen NF4 ``LinearNF4`` (QLoRA's base), in place.

    Call it before ``get_lora_model``; LoRA then injects on top of the quantised layers (the layer
    registry maps ``LinearNF4`` to ``LoraLinearNF4``). Biases stay in full precision.

    Args:
        model: Any model; its ``nn.Linear`` layers are quantised (other modules are left alone).
        skip: Module names (or dotted suffixes, or regexes) to keep in full precision; default
            ``["lm_head"]`` (the output head is small relative to its effect on the loss, and often
            tied to the embedding).
        block_size: Weights per absmax block (64).
        scale_block_size: Block scales per double-quantisation group (256).

    Returns:
        The same model.

    Raises:
        ValueError: the model already carries LoRA layers (quantise first, then inject).
    """
    from lorakit.layers import LoraLayer
    from lorakit.layers.nf4_linear import LinearNF4

    skip = ["lm_head"] if skip is None else [skip] if isinstance(skip, str) else list(skip)  # (a string was its letters)
    for p in skip:
        if not isinstance(p, str):
            raise ValueError(f"quantize_model_nf4: skip must hold module names or regexes, got {p!r}")
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"quantize_model_nf4: skip entry {p!r} is not a valid regular expression: {exc}") from None
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("quantize_model_nf4: the model already has LoRA layers; quantise the base model first, then inject")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    quantized = []
    for name, linear in targets:  # every layer first: a refusal leaves the model as it was
        try:
            layer = LinearNF4.from_linear(linear, block_size=block_size, scale_block_size=scale_block_size)
        except ValueError as exc:
            raise ValueError(f"quantize_model_nf4: {name}: {exc}; the model is unchanged") from None
        quantized.append((name, layer.train(linear.training)))
    for name, layer in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model
