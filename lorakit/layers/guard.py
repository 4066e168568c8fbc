"""Change checks without copies: fingerprints of a tensor's bits, and of its casts.

A merge remembers what it wrote into a base weight, and a tie what its weight held, so that a later
unmerge or re-tie can tell lorakit's own writes (and harmless casts of them, ``model.half()``) from
an edit made since. A fingerprint is a few integers where a copy would be the whole weight.
"""
from __future__ import annotations

import functools

import torch

#: Knuth's multiplicative hashing constant (about 2^32 / golden ratio): spreads positions over the
#: integers so that two equal bit patterns trading places change the weighted sum.
_KNUTH = 2654435761


#: Entries summed per pass: two int64 temporaries of this many entries, not of the whole tensor.
_CHUNK = 1 << 20


def bits_fingerprint(tensor: torch.Tensor) -> int:
    """An integer that changes with any change to ``tensor``'s bits or their order (a position-
    weighted sum of the bit patterns, in wrapping int64 arithmetic): equal tensors, on any device,
    give equal fingerprints."""
    flat = _as_integers(tensor)
    if flat.device.type == "cpu" and flat.numel() <= _CHUNK:  # (a merge's A or B: without bits_fingerprints'
        return _dot_sum(flat, 0)                              # grouping, half the time of the products and sum)
    return bits_fingerprints([tensor])[0]


def _dot_sum(chunk: torch.Tensor, start: int) -> int:
    """Σ bitsᵢ · weight(start + i) over one chunk of one tensor's integers (``_as_integers``), as one
    int64 dot product on the CPU: the same wrapping sum as the stacked products and sum, without
    their temporaries (a stack of one and the products)."""
    return int(torch.dot(chunk.to(torch.int64), _position_weights(start, chunk.numel(), chunk.device)))


def _as_integers(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` flat, a float's bit patterns as the integers of its width (a view, no copy)."""
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    return flat


def bits_fingerprints(tensors: list[torch.Tensor]) -> list[int]:
    """``bits_fingerprint`` of each of ``tensors`` (all with the same number of elements, on one
    device): those whose bits are integers of one type (a tensor's casts to bfloat16 and float16,
    say) stacked and summed in one pass, not one pass each."""
    prints = [0] * len(tensors)
    with torch.no_grad():
        flats = [_as_integers(t) for t in tensors]
        groups: dict[torch.dtype, list[int]] = {}
        for i, flat in enumerate(flats):
            groups.setdefault(flat.dtype, []).append(i)
        n = flats[0].numel() if flats else 0
        step = _CHUNK
        for members in groups.values():
            totals = [0] * len(members)
            for start in range(0, n, step):
                if len(members) == 1 and flats[members[0]].device.type == "cpu":
                    totals[0] += _dot_sum(flats[members[0]][start:start + step], start)
                    continue
                # a copy (to int64): the products must not write the tensors
                bits = torch.stack([flats[i][start:start + step] for i in members]).to(torch.int64)
                sums = bits.mul_(_position_weights(start, bits.shape[1], bits.device)).sum(dim=1).tolist()
                totals = [t + s for t, s in zip(totals, sums)]
            for i, total in zip(members, totals):
                prints[i] = (total + (1 << 63)) % (1 << 64) - (1 << 63)  # wrapping int64, as one sum gave
    return prints


def _make_position_weights(start: int, n: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(start, start + n, dtype=torch.int64, device=device) * _KNUTH).bitwise_or_(1)


_kept_position_weights = functools.lru_cache(maxsize=16)(_make_position_weights)


def _position_weights(start: int, n: int, device: torch.device) -> torch.Tensor:
    """(start + i)·K | 1 for i < n, in wrapping int64: kept for up to 16 sizes of up to 2^16 entries
    (adapter-sized tensors; a merge and an unmerge fingerprint the same A and B ten times), else
    made anew."""
    return (_kept_position_weights if n <= 1 << 16 else _make_position_weights)(start, n, device)


#: Narrower float dtypes a cast may round a tensor through and back (``model.float().double()``).
_ROUND_TRIPS = (torch.float32, torch.bfloat16, torch.float16)


def cast_print(tensor: torch.Tensor) -> tuple:
    """``(dtype, fingerprint, {chain of narrower dtypes: fingerprint of the tensor cast along it})``
    for ``same_up_to_cast``: what a change check keeps of a tensor instead of a copy (chains of one
    and two casts: ``model.half()``, ``model.half().bfloat16()``)."""
    chains: dict[tuple[torch.dtype, ...], torch.Tensor] = {}
    if tensor.is_floating_point():
        size = tensor.element_size()
        ok = [d for d in _ROUND_TRIPS if d != tensor.dtype and d.itemsize <= size]
        for first in ok:
            once = chains[(first,)] = tensor.to(first)
            for second in ok:
                if second != first and second.itemsize <= first.itemsize:
                    chains[(first, second)] = once.to(second)
    prints = bits_fingerprints([tensor, *chains.values()])  # (the 16-bit casts in one pass)
    return tensor.dtype, prints[0], dict(zip(chains, prints[1:]))


def bits_print(tensor: torch.Tensor) -> tuple:
    """What ``cast_print`` keeps, less the narrower chains (``None`` in their place: one pass over the
    tensor instead of five for a float32 one): enough for ``same_up_to_cast`` to recognise the
    tensor unchanged, or widened; ``with_chains`` adds the chains while the tensor is still the same
    (before a cast, ``LoraLayer._apply``). A tensor narrowed before that counts as changed."""
    return tensor.dtype, bits_fingerprint(tensor), None


def with_chains(then: tuple, tensor: torch.Tensor) -> tuple:
    """``then`` (a ``bits_print`` or ``cast_print``) with its narrower chains, taken from ``tensor``
    if it is still exactly what ``then`` saw; else ``then`` as it is (a changed tensor stays changed)."""
    dtype, print_, narrower = then
    if narrower is not None or tensor.dtype != dtype:
        return then
    full = cast_print(tensor)  # (its own fingerprint is among them: the tensor is read for it once)
    return full if full[1] == print_ else then


def same_up_to_cast(then: tuple, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is what ``cast_print`` saw, or that cast: to a wider dtype and maybe back
    (the same values), or through one or two narrower dtypes (its values then exactly those of the
    original rounded along them; not for a ``bits_print`` whose chains were never taken), in
    whatever dtype it is now. Anything else is a change (an edit, a load; an edit with a cast too)."""
    dtype, print_, narrower = then
    if tensor.dtype == dtype:
        if bits_fingerprint(tensor) == print_:
            return True
    elif tensor.is_floating_point():
        back = tensor.to(dtype)
        if bits_fingerprint(back) == print_ and torch.equal(back.to(tensor.dtype), tensor):
            return True  # widened (or narrowed losslessly), same values
    for chain, chain_print in (narrower or {}).items():
        rounded = tensor.to(chain[-1])
        if torch.equal(rounded.to(tensor.dtype), tensor) and bits_fingerprint(rounded) == chain_print:
            return True
    return False
