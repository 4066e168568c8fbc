"""The chunked head + cross-entropy equals the plain path in value and gradients (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import linear_cross_entropy


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_matches_plain_cross_entropy(with_bias, weight_grad, chunk):
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(21, 8, dtype=torch.float64, requires_grad=weight_grad)
    b = torch.randn(21, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, 21, (13,))
    y[3] = -100
    ref = F.cross_entropy(F.linear(h, W, b), y, reduction="sum", ignore_index=-100)
    got = linear_cross_entropy(h, W, y, bias=b, chunk_size=chunk)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    inputs = [t for t in (h, W, b) if t is not None and t.requires_grad]
    ref_g = torch.autograd.grad(ref * 1.3, inputs)
    got_g = torch.autograd.grad(got * 1.3, inputs)
    for a, e in zip(got_g, ref_g):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_another_ignore_index_is_the_one_left_out():
    torch.manual_seed(0)
    h = torch.randn(9, 8, dtype=torch.float64)
    W = torch.randn(21, 8, dtype=torch.float64)
    y = torch.randint(0, 20, (9,))
    y[2] = y[5] = 20  # a real token id here, the ignored one
    ref = F.cross_entropy(F.linear(h, W), y, reduction="sum", ignore_index=20)
    torch.testing.assert_close(linear_cross_entropy(h, W, y, ignore_index=20).double(), ref)


def test_bf16_hidden_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(40, 16)
    W = torch.randn(50, 16) * 0.3
    y = torch.randint(0, 50, (40,))
    ref = F.cross_entropy(h @ W.T, y, reduction="sum")
    got = linear_cross_entropy(h.bfloat16(), W.bfloat16(), y)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) / ref.item() < 0.02


def test_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 7]))


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_bad_chunk_size_is_named(chunk):
    # -1 died inside torch ("negative dimension"), 0 silently took the default
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), chunk_size=chunk)


def test_mixed_dtypes_and_float_labels_are_named():
    h, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"hidden \(torch.bfloat16\) and weight \(torch.float32\)"):
        linear_cross_entropy(h.bfloat16(), W, y)
    with pytest.raises(TypeError, match="labels must be integer"):
        linear_cross_entropy(h, W, y.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's product takes both dtypes, as before
        got = linear_cross_entropy(h.bfloat16(), W, y)
    ref = F.cross_entropy(h.bfloat16().float() @ W.bfloat16().float().T, y, reduction="sum")
    assert abs(got.item() - ref.item()) < 1e-2 * max(1.0, abs(ref.item()))


def test_saves_no_logits_for_backward():
    saved = []
    h = torch.randn(64, 16, requires_grad=True)
    W = torch.randn(1000, 16)
    y = torch.randint(0, 1000, (64,))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(h, W, y)
    assert max(saved) <= 64 * 16  # only dL/dh, never (64 x 1000) logits


def test_no_gradient_work_under_no_grad_for_a_trainable_weight(monkeypatch):
    """Evaluation (no_grad) of a full fine-tune: needs_input_grad is True for the trainable head, but
    no backward can follow, so no vocab x hidden gradient buffer may be built."""
    h = torch.randn(6, 8)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (6,))
    made = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        out = real_zeros(*args, **kwargs)
        made.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    assert (50, 8) not in made
    monkeypatch.undo()
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.detach().T, y, reduction="sum"))
    linear_cross_entropy(h, w, y).backward()  # with grad: the gradient is still there
    torch.testing.assert_close(w.grad, torch.func.grad(lambda W: F.cross_entropy(h @ W.T, y, reduction="sum"))(w.detach()))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int16])
def test_integer_labels_of_any_width(dtype):
    # uint8 labels indexed as a mask and died inside torch
    torch.manual_seed(0)
    h, W = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4, 6])
    want = F.cross_entropy(h @ W.T, y, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(h, W, y.to(dtype)), want, rtol=0, atol=1e-12)


def test_a_label_equal_to_the_vocabulary_size_is_named():
    """Label ids live in [0, V): V itself is out of range, refused by name like V + 1 (the bug this catches:
    ``>`` for ``>=``, which let V through to an IndexError inside the chunk loop)."""
    h, W = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"label ids must be in \[0, 5\)"):
        linear_cross_entropy(h, W, torch.tensor([0, 1, 5]))


def test_boolean_labels_are_refused():
    """A bool tensor is a mask, not token ids (the bug this catches: bool labels read as ids 0 / 1)."""
    with pytest.raises(TypeError, match="labels must be integer"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([True, False, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_head_sums_its_gradient_in_one_buffer(dtype):
    """A trainable head's (V, d) weight gradient is built once and every chunk's product summed into
    it in place: a fresh (V, d) product per chunk (oneDNN's) cost a full fine-tune of the embedded
    model ~28,000 page faults a chunk. Counted by the profiler's allocation records; the gradient
    still equals float64's."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    V, d, N = 1000, 64, 40
    W = torch.randn(V, d, dtype=dtype, requires_grad=True)
    h = torch.randn(N, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (N,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = linear_cross_entropy(h, W, y, chunk_size=10)  # 4 chunks
    made = Counter(e.name for e in prof.events() if e.cpu_memory_usage == V * d * 4 and e.name.startswith("aten::empty"))
    assert sum(made.values()) == 1, made
    (gw,) = torch.autograd.grad(loss, W)
    ref = torch.func.grad(lambda w: F.cross_entropy(h.detach().double() @ w.T, y, reduction="sum"))(W.detach().double())
    # (bf16: the logits themselves are bf16 products, a few 1e-2 off)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.1, atol=0.1)
    torch.testing.assert_close(gw.double(), ref, **tol)
