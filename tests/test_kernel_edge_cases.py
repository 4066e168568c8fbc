"""Edge cases of the training kernels (lorakit/ops, lorakit/layers/fused.py) that mutation testing
found untested: a frozen lora_A (LoRA-FA style) beside trainable ones, an fp16 base with fp32
adapters in the grouped q/k/v node, a gate without gradient, dropout under no_grad in training
mode, in-place writes into leaves and foreign views, buffers the loss allocates for nothing, and
attention masks / head sizes that must leave lorakit's attention path. Each test fails on its
mutant (mutation round 8) and passes on the code."""
from __future__ import annotations

import pytest
import torch
from conftest import lora_llama, loss_and_grads

from lorakit.ops.grouped import SharedInputLinears, shared_input_linears
from lorakit.ops import fuse_qkv_projections

d = torch.float64


def test_grouped_dA_when_an_earlier_member_A_is_frozen():  # mutation round 8: G10
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=d, requires_grad=True)
    W1, W3 = torch.randn(4, 5, dtype=d), torch.randn(6, 5, dtype=d)
    A1 = torch.randn(2, 5, dtype=d)                      # frozen (LoRA-FA style)
    B1 = torch.randn(4, 2, dtype=d, requires_grad=True)
    A3 = torch.randn(3, 5, dtype=d, requires_grad=True)
    B3 = torch.randn(6, 3, dtype=d, requires_grad=True)
    fn = lambda x_, B1_, A3_, B3_: SharedInputLinears.apply(x_, (0.5, 2.0), None, W1, None, A1, B1_, W3, None, A3_, B3_)
    assert torch.autograd.gradcheck(fn, (x, B1, A3, B3))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fp16_base_fp32_adapters_grouped_qkv_matches_separate(dropout):  # mutation round 8: G11, G15
    model = lora_llama(["q_proj", "k_proj", "v_proj"], dropout=dropout, dtype=torch.float16)
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(model, ids, seed=0)
    assert fuse_qkv_projections(model) == 2
    loss, grads = loss_and_grads(model, ids, seed=0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert float((g - r).norm()) <= 0.01 * float(r.norm()) + 1e-6


def test_swiglu_up_gradient_when_gate_needs_none():  # mutation round 8: S06
    from lorakit.ops.swiglu import _SwiGLUDown
    torch.manual_seed(0)
    g = torch.randn(2, 3, 6, dtype=d)                    # e.g. a frozen gate_proj on a no-grad input
    u = torch.randn(2, 3, 6, dtype=d, requires_grad=True)
    W = torch.randn(5, 6, dtype=d)
    A = torch.randn(2, 6, dtype=d, requires_grad=True)
    B = torch.randn(5, 2, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u_, A_, B_: _SwiGLUDown.apply(g, u_, W, None, A_, B_, 0.7, None), (u, A, B))


def test_members_with_adapters_of_different_dtypes_give_the_separate_outputs():  # mutation round 8: G16
    model = lora_llama(["q_proj", "v_proj"], dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    attn.v_proj.lora_A["default"].data = attn.v_proj.lora_A["default"].data.bfloat16()
    attn.v_proj.lora_B["default"].data = attn.v_proj.lora_B["default"].data.bfloat16()
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    got = shared_input_linears(x, mods) or [m(x) for m in mods]
    for o, m in zip(got, mods):
        assert torch.equal(o, m(x))


def test_a_consumer_with_a_frozen_A_does_not_keep_the_shared_rebuild_alive():  # mutation round 8: F10
    from lorakit.layers.fused import RMSNORM_RECIPE, fused_lora_add
    from lorakit.ops.rmsnorm import RMSNormFn
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=d, requires_grad=True)
    w = torch.randn(8, dtype=d)
    Ws = [torch.randn(6, 8, dtype=d) for _ in range(3)]
    As = [torch.randn(3, 8, dtype=d, requires_grad=i > 0) for i in range(3)]   # q's A frozen
    Bs = [torch.randn(6, 3, dtype=d, requires_grad=True) for _ in range(3)]
    y = RMSNormFn.apply(h, w, 1e-5)
    shared = getattr(y, RMSNORM_RECIPE)[3]
    outs = [fused_lora_add(y @ W.T, y, A, B, 0.7, 0.0, training=True) for W, A, B in zip(Ws, As, Bs)]
    torch.autograd.grad(sum(o.pow(2).sum() for o in outs), (h, *As[1:], *Bs))
    assert shared.value is None      # the rebuilt (tokens x hidden) output is not kept after the last consumer


def test_only_lora_B_trainable_gets_its_gradient():  # mutation round 8: F11
    from lorakit.layers.fused import fused_lora_add
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=d)
    W = torch.randn(6, 8, dtype=d)
    A = torch.randn(3, 8, dtype=d)                      # frozen A (LoRA-FA)
    B = torch.randn(6, 3, dtype=d, requires_grad=True)
    out = fused_lora_add(x @ W.T, x, A, B, 0.7, 0.0, training=True)
    (got,) = torch.autograd.grad(out.pow(2).sum(), B, allow_unused=True)
    (want,) = torch.autograd.grad((x @ W.T + 0.7 * (x @ A.T) @ B.T).pow(2).sum(), B)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dropout_in_training_mode_also_without_gradients():  # mutation round 8: F14
    from lorakit.layers.fused import fused_lora_add
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=d)
    W, A, B = torch.randn(6, 8, dtype=d), torch.randn(3, 8, dtype=d), torch.randn(6, 3, dtype=d)
    torch.manual_seed(1)
    with torch.no_grad():
        got = fused_lora_add(x @ W.T, x, A, B, 0.7, 0.5, training=True)
    torch.manual_seed(1)
    want = fused_lora_add(x @ W.T, x.requires_grad_(), A, B, 0.7, 0.5, training=True).detach()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, x.detach() @ W.T + 0.7 * (x.detach() @ A.T) @ B.T)  # dropout did act


def test_a_leaf_result_that_requires_grad_is_not_written_in_place():  # mutation round 8: F18
    from lorakit.layers.fused import fused_lora_add
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=d)
    result = torch.randn(4, 6, dtype=d, requires_grad=True)
    A, B = torch.randn(3, 8, dtype=d), torch.randn(6, 3, dtype=d, requires_grad=True)
    out = fused_lora_add(result, x, A, B, 0.7, 0.0, training=True)
    torch.testing.assert_close(out, result + 0.7 * (x @ A.T) @ B.T)


def test_a_view_of_a_tensor_with_another_last_dimension_is_not_taken_as_the_whole_output():  # mutation round 8: F19
    from lorakit.layers.fused import fused_lora_add
    torch.manual_seed(0)
    x = torch.randn(2, 8, dtype=d)
    leaf = torch.randn(12, dtype=d, requires_grad=True)
    result = (leaf * 1.0).view(2, 6)              # a base output made flat, then viewed as (tokens, out)
    A, B = torch.randn(3, 8, dtype=d), torch.randn(6, 3, dtype=d, requires_grad=True)
    out = fused_lora_add(result, x, A, B, 0.7, 0.0, training=True)
    torch.testing.assert_close(out, leaf.view(2, 6) + 0.7 * (x @ A.T) @ B.T)


def test_no_grad_h_buffer_under_no_grad(monkeypatch):  # mutation round 8: L01
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy
    h = torch.randn(6, 8, requires_grad=True)
    w, y = torch.randn(50, 8), torch.randint(0, 50, (6,))
    made, real = [], torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: made.append(tuple(t.shape)) or real(t, *a, **k))
    with torch.no_grad():
        linear_cross_entropy(h, w, y)
    assert (6, 8) not in made


def test_logits_buffer_is_no_larger_than_the_tokens(monkeypatch):  # mutation round 8: L02
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy
    # (float64: the path with one logits buffer; oneDNN's fp32 one makes each chunk's logits, see
    # test_gemm.py)
    h, w, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64), torch.randint(0, 50, (3,))
    made, real = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (lambda t: made.append(t.numel()) or t)(real(*a, **k)))
    linear_cross_entropy(h, w, y, chunk_size=1000)
    assert max(made) <= 3 * 50


def test_default_chunk_is_at_least_one_row_for_a_huge_vocabulary(monkeypatch):  # mutation round 8: L07
    import torch.nn.functional as F
    import importlib

    # (the package's attribute of that name is the function: take the module itself)
    lce = importlib.import_module("lorakit.ops.linear_cross_entropy")
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 16)        # stands for a vocabulary over 2**24
    h, w, y = torch.randn(4, 8, dtype=d), torch.randn(50, 8, dtype=d), torch.randint(0, 50, (4,))
    torch.testing.assert_close(lce.linear_cross_entropy(h, w, y), F.cross_entropy(h @ w.T, y, reduction="sum"))


def test_default_chunk_on_the_cpu_keeps_one_chunks_logits_within_cpu_chunk_bytes(monkeypatch):
    """On the CPU the default chunk is also bounded in bytes of logits (float32, or float64 for float64
    inputs), so that glibc reuses a freed chunk's memory; the element bound still applies where smaller."""
    import importlib

    import torch.nn.functional as F

    lce = importlib.import_module("lorakit.ops.linear_cross_entropy")
    chunks, apply = [], lce._LinearCrossEntropy.apply
    monkeypatch.setattr(lce._LinearCrossEntropy, "apply", lambda *a: chunks.append(a[4]) or apply(*a))
    monkeypatch.setattr(lce, "CPU_CHUNK_BYTES", 4 * 50 * 3)  # three rows of 50 float32 logits
    for dtype, rows in ((torch.float32, 3), (torch.bfloat16, 3), (torch.float64, 1)):
        h, w, y = torch.randn(7, 8, dtype=dtype), torch.randn(50, 8, dtype=dtype), torch.randint(0, 50, (7,))
        got = lce.linear_cross_entropy(h, w, y)
        assert chunks[-1] == rows, dtype
        want = F.cross_entropy(h.float() @ w.float().T if dtype == torch.bfloat16 else h @ w.T, y, reduction="sum")
        torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 100)  # two rows: the smaller bound
    lce.linear_cross_entropy(torch.randn(7, 8), torch.randn(50, 8), torch.randint(0, 50, (7,)))
    assert chunks[-1] == 2


@pytest.mark.parametrize("rows", [0, 3])
def test_an_empty_vocabulary_is_refused_by_name(rows):
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy

    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(torch.randn(rows, 8), torch.randn(0, 8), torch.zeros(rows, dtype=torch.long))


def test_no_bias_gradient_buffer_under_no_grad(monkeypatch):  # mutation round 8: L08
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy
    h, w, y = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
    b = torch.randn(50, requires_grad=True)
    made, real = [], torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: (lambda t: made.append(tuple(t.shape)) or t)(real(*a, **k)))
    with torch.no_grad():
        linear_cross_entropy(h, w, y, bias=b)
    assert (50,) not in made


def test_a_mask_that_sees_the_next_key_is_not_causal():  # mutation round 8: A05
    from lorakit.ops.attention import _is_causal_mask
    mask = torch.ones(6, 6, dtype=torch.bool).tril(1)[None, None]   # each query also sees the next key
    assert not _is_causal_mask(mask)
    assert _is_causal_mask(torch.ones(6, 6, dtype=torch.bool).tril()[None, None].clone())


def test_value_head_dim_other_than_key_head_dim_goes_to_sdpa():  # mutation round 8: A11
    from lorakit.ops.attention import attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.bfloat16, requires_grad=True)
    module = torch.nn.Module(); module.is_causal = True
    got, _ = attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(got, want)
