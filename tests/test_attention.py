"""lorakit.ops.attention: the matmul attention equals SDPA (values and gradients) and is dispatched
only where it was measured to pay (bf16/fp16 with gradients, short sequences)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

import lorakit as lk
from lorakit.ops import attention as att
from lorakit.ops.attention import ShortAttention, restore_attention, short_attention, use_lorakit_attention


def _repeat(t, n):
    return t.repeat_interleave(n, dim=1)


def _qkv(B=3, H=6, KV=2, S=7, T=7, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, KV, T, D, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, KV, T, D, dtype=dtype, generator=g).requires_grad_()
    return q, k, v


def _padding_mask(B=3, S=7, lengths=(7, 5, 2)):
    keys = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]                # (B, T)
    return torch.ones(S, S, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]


@pytest.mark.parametrize("case", ["causal", "bool", "additive", "per_head", "none", "mha"])
def test_equals_sdpa_in_float64(case):
    H, KV = (6, 6) if case == "mha" else (6, 2)
    q, k, v = _qkv(H=H, KV=KV)
    mask, causal = None, False
    if case in ("causal", "mha"):
        causal = True
    elif case == "bool":
        mask = _padding_mask()
    elif case == "additive":
        mask = torch.where(_padding_mask(), 0.0, -1e9).to(torch.float64)
    elif case == "per_head":
        mask = _padding_mask().expand(3, H, 7, 7).clone()
        mask[:, 1, :, 0] = False  # one head may not see the first key
        mask[:, :, :, 0] |= ~mask.any(-1)  # keep at least one key per row
    grad = torch.randn(3, H, 7, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, _repeat(k, H // KV), _repeat(v, H // KV), attn_mask=mask, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = short_attention(q, k, v, mask, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    q, k, v = _qkv(B=2, H=4, KV=2, S=4, T=4, D=3)
    assert torch.autograd.gradcheck(lambda a, b, c: short_attention(a, b, c, causal=True, scale=0.7), (q, k, v))
    mask = _padding_mask(B=2, S=4, lengths=(4, 2))
    assert torch.autograd.gradcheck(lambda a, b, c: short_attention(a, b, c, mask), (q, k, v))


def test_fully_masked_row_gives_zeros_not_nan():
    q, k, v = _qkv()
    mask = _padding_mask()
    mask[1, :, 3, :] = False
    out = short_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and out[1, :, 3].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_bf16_is_at_least_as_accurate_as_sdpa(monkeypatch):
    q, k, v = _qkv(B=2, H=6, KV=2, S=40, T=40, D=16, seed=3)
    grad = torch.randn(2, 6, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = F.scaled_dot_product_attention(q, _repeat(k, 3), _repeat(v, 3), is_causal=True)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad)

    def error(fn):
        qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        out = fn(qb, kb, vb)
        grads = torch.autograd.grad(out, (qb, kb, vb), grad.bfloat16())
        return [float((a.detach().double() - b.detach()).norm() / b.detach().norm())
                for a, b in zip((out, *grads), (exact, *exact_grads))]

    sdpa = error(lambda a, b, c: F.scaled_dot_product_attention(a, _repeat(b, 3), _repeat(c, 3), is_causal=True))
    for block in (64, 16):  # one block of queries, and three (dL/dk, dL/dv summed over blocks)
        monkeypatch.setattr(att, "QUERY_BLOCK", block)
        ours = error(lambda a, b, c: short_attention(a, b, c, causal=True))
        assert ours[0] < 0.01
        for o, s in zip(ours, sdpa):
            assert o <= s * 1.1, (block, ours, sdpa)


def test_bad_shapes_are_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple"):
        short_attention(q[:, :5], k, v)
    with pytest.raises(ValueError, match="expected q"):
        short_attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match="as many queries as keys"):
        short_attention(q, k[:, :, :3], v[:, :, :3], causal=True)


def test_dispatch_only_for_half_precision_with_gradients(monkeypatch):
    calls = []
    real = ShortAttention.apply
    monkeypatch.setattr(ShortAttention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))

    class Module:
        num_key_value_groups, is_causal, training = 3, True, True

    def run(dtype, grad=True, length=16):
        q = torch.randn(2, 6, length, 8, dtype=dtype, requires_grad=grad)
        k = torch.randn(2, 2, length, 8, dtype=dtype, requires_grad=grad)
        out, _ = att.attention_forward(Module(), q, k, k.detach().clone(), None, scaling=0.3)
        assert out.shape == (2, length, 6, 8)
        return out

    run(torch.float32)
    run(torch.bfloat16, grad=False)
    q = torch.randn(2, 6, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    att.attention_forward(Module(), q, q[:, :2], q[:, :2], None, head_mask=torch.ones(6))
    att.attention_forward(Module(), q, q[:, :2], q[:, :2], None, dropout=0.1)
    run(torch.bfloat16, length=att.CAUSAL_ATTENTION_MAX_KEYS + 1)
    # past SHORT_ATTENTION_MAX_KEYS only causal attention takes the matmul path: not with a mask
    # that lets a query see later keys (a bidirectional padding mask)
    n = att.SHORT_ATTENTION_MAX_KEYS + 1
    q = torch.randn(2, 6, n, 8, dtype=torch.bfloat16, requires_grad=True)
    bidirectional = torch.ones(2, 1, n, n, dtype=torch.bool)
    bidirectional[1, :, :, -3:] = False
    att.attention_forward(Module(), q, q[:, :2], q[:, :2], bidirectional)
    assert calls == []
    assert torch.isfinite(run(torch.bfloat16)).all()
    assert torch.isfinite(run(torch.bfloat16, length=n)).all()  # causal, no mask
    causal_padded = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    causal_padded[1, :, :, -3:] = False
    att.attention_forward(Module(), q, q[:, :2], q[:, :2], causal_padded)
    assert calls == [torch.bfloat16] * 3


@pytest.mark.parametrize("case", ["causal", "fewer_queries", "causal_padding", "one_block"])
def test_query_blocks_equal_sdpa_in_float64(monkeypatch, case):
    # blocks of 3 queries: 7 queries make blocks of 3, 3 and 1; each sees keys up to its last query
    monkeypatch.setattr(att, "QUERY_BLOCK", 7 if case == "one_block" else 3)
    S, T = (5, 7) if case == "fewer_queries" else (7, 7)
    q, k, v = _qkv(S=S, T=T, seed=4)
    visible = torch.ones(S, T, dtype=torch.bool).tril(T - S)[None, None]
    mask = _padding_mask() if case == "causal_padding" else None
    assert len(att._query_blocks(S, T, True)) == (1 if case == "one_block" else 3 if S == 7 else 2)
    grad = torch.randn(3, 6, S, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, _repeat(k, 3), _repeat(v, 3), attn_mask=visible if mask is None else mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = ShortAttention.apply(q, k, v, mask, 8 ** -0.5, True)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_query_blocks_gradcheck(monkeypatch):
    monkeypatch.setattr(att, "QUERY_BLOCK", 2)
    q, k, v = _qkv(B=2, H=4, KV=2, S=5, T=5, D=3)
    assert torch.autograd.gradcheck(lambda a, b, c: short_attention(a, b, c, causal=True, scale=0.7), (q, k, v))


def test_model_switch_gives_sdpa_outputs_and_gradients_in_bf16(monkeypatch):
    calls = []
    real = ShortAttention.apply
    monkeypatch.setattr(ShortAttention, "apply", lambda *a: calls.append(a[3] is not None) or real(*a))
    model = tiny_llama().to(torch.bfloat16)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(3, 101, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: a boolean mask reaches the attention

    def loss_and_grads():
        loss = model(ids, attention_mask=mask, labels=ids).loss
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.detach().float(), [g.float() for g in torch.autograd.grad(loss, params)]

    ref_loss, ref_grads = loss_and_grads()
    assert use_lorakit_attention(model) and model.config._attn_implementation == "lorakit"
    loss, grads = loss_and_grads()
    assert calls == [True, True]  # both layers, with the padding mask
    torch.testing.assert_close(loss, ref_loss, rtol=0.02, atol=0.02)
    for got, want in zip(grads, ref_grads):
        assert float((got - want).norm()) <= 0.05 * float(want.norm()) + 1e-4
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_models_not_on_sdpa_are_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_lorakit_attention(model)
    assert model.config._attn_implementation == "eager"
    assert not use_lorakit_attention(torch.nn.Linear(2, 2))


def test_causal_short_attention_needs_as_many_queries_as_keys():
    """SDPA's is_causal aligns the mask top-left, a KV cache bottom-right: with S != T the meaning is
    ambiguous, so it is refused (the model dispatcher never sends such calls)."""
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="as many queries as keys"):
        short_attention(q, k, k.clone(), causal=True)
    torch.testing.assert_close(short_attention(q, k, k, causal=False), F.scaled_dot_product_attention(q, k, k))


def test_a_mask_edited_in_place_is_checked_again():
    # the causal check was remembered per mask object: the same mask filled with True (full
    # attention) was still taken as causal, 2.6 off SDPA
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:
        is_causal = False

    torch.manual_seed(0)
    T = 160  # (above SHORT_ATTENTION_MAX_KEYS: only a causal mask takes lorakit's path here)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].clone()
    for fill in (False, True):
        if fill:
            mask.fill_(True)
        got = att.attention_forward(Module(), q, k, v, mask)[0].float()
        want = sdpa_attention_forward(Module(), q, k, v, mask)[0].float()
        assert (got - want).abs().max() < 0.05, fill


def test_attention_forward_uses_the_scaling_it_is_given(monkeypatch):
    """transformers passes the model's own softmax scale (Gemma's query_pre_attn_scalar, a
    config's attention_multiplier); the matmul path must use it, not head_dim ** -0.5."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.ops.attention import ShortAttention, attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    calls = []
    real = ShortAttention.apply
    monkeypatch.setattr(ShortAttention, "apply", lambda *a: calls.append(a[4]) or real(*a))
    got, _ = attention_forward(module, q, k, v, None, scaling=0.9)
    monkeypatch.undo()
    assert calls == [0.9]  # the matmul path was taken
    want, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), None, scaling=0.9)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    ref_default, _ = sdpa_attention_forward(module, q.double(), k.double(), v.double(), None)
    assert (ref_default - want).abs().max() > 0.05  # the scale matters at this size
