"""Mutation round 16, second part: tests for the survivors among the mutants of this session's code
(the oneDNN products, the LoRA base's routing, the model-level merge's one walk over the layers, the
benchmark's full step)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from conftest import tiny_llama


class _Same(nn.Module):
    def forward(self, w):
        return w


def _tied_lora_llama():
    m = tiny_llama(tie=True)
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert m.lm_head.base_layer.weight is m.model.embed_tokens.weight
    return m


def _assert_still_tied(m):
    assert m.lm_head.base_layer.weight is m.model.embed_tokens.weight
    assert m.config.tie_word_embeddings
    from lorakit.inject import require_state
    assert not require_state(m).ties


def test_a_merge_refused_for_a_computed_weight_leaves_a_tied_weight_tied():
    """(A2) merge refuses a parametrized base weight before it unties anything: "the model is unchanged"
    holds for the tied lm_head too (no untie warning, the same Parameter, the config flag kept)."""
    from torch.nn.utils import parametrize

    m = _tied_lora_llama()
    parametrize.register_parametrization(m.model.layers[0].self_attn.q_proj.base_layer, "weight", _Same())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an untie would warn "tied"
        with pytest.raises(ValueError, match="model is unchanged"):
            lk.merge(m)
    _assert_still_tied(m)


def test_a_safe_merge_refused_for_non_finite_weights_leaves_a_tied_weight_tied():
    """(A3) merge(safe=True) finds the non-finite merged weight before it unties anything."""
    m = _tied_lora_llama()
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.lora_B["default"].fill_(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="non-finite.*model is unchanged"):
            lk.merge(m, safe=True)
    _assert_still_tied(m)


def test_a_stray_argument_to_a_lora_linear_is_refused_as_the_linear_refuses_it():
    """(L5) The oneDNN base path is taken only for a call with x alone: an extra positional or keyword
    argument reaches nn.Linear.forward, which refuses it (TypeError), with gradients wanted too; it was
    silently dropped where the base went through frozen_linear."""
    lin = nn.Sequential(nn.Linear(8, 6))
    lk.get_lora_model(lin, lk.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = lin[0]
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # (the plain call works)
    with pytest.raises(TypeError):
        layer(x, 1.0)
    with pytest.raises(TypeError):
        layer(x, scale=2.0)


def test_a_trainable_bias_of_a_float32_lora_linear_gets_its_gradient():
    """(L7) bias="all" on a float32 CPU Linear: the base is not routed to frozen_linear (which takes
    frozen tensors only) while its bias trains; the bias gets autograd's gradient, and x its own."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 6))
    lk.get_lora_model(lin, lk.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, bias="all"))
    layer = lin[0]
    b = layer.base_layer.bias
    assert b.requires_grad and not layer.base_layer.weight.requires_grad
    x = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 6)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(b.grad, g.sum(0))
    assert x.grad is not None


def test_bf16_head_loss_gives_the_gradients_of_hidden_and_weight():
    """(O9, O10) bfloat16 hidden and weight, both trainable: the fp32 softmax rows are cast to the
    weight's dtype for dL/dh, and the hidden chunk to fp32 for dL/dW (mixed-dtype products raised)."""
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(12, 16).bfloat16().requires_grad_()
    W = (torch.randn(20, 16) * 0.3).bfloat16().requires_grad_()
    y = torch.randint(0, 20, (12,))
    linear_cross_entropy(h, W, y, chunk_size=5).backward()
    h32 = h.detach().float().requires_grad_()
    W32 = W.detach().float().requires_grad_()
    F.cross_entropy(h32 @ W32.T, y, reduction="sum").backward()
    assert h.grad.dtype == torch.bfloat16 and W.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(W.grad.float(), W32.grad, rtol=2e-2, atol=2e-2)


def test_under_autocast_an_fp32_hidden_with_a_bf16_head_sums_its_softmax_in_fp32():
    """(O8) oneDNN's path is taken only where both hidden and weight are fp32: a bf16 head under
    autocast keeps the fp32 logits buffer (autocast's bf16 product, then the softmax in fp32), with
    gradients on as under no_grad; the bf16 logits of F.linear's autocast product made it a bf16 softmax."""
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(24, 32, requires_grad=True)
    W = (torch.randn(40, 32) * 0.5).bfloat16()
    y = torch.randint(0, 40, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, W, y)
        logits = (h.detach() @ W.T).float()  # autocast's product, in bf16, then widened
    ref = F.cross_entropy(logits, y, reduction="sum")
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(linear_cross_entropy(h, W, y), got.detach(), rtol=0, atol=0)


def test_the_full_steps_products_all_go_to_onednn_in_float32(monkeypatch):
    """(T3, T4) same_products_for_full in fp32: the forward's x Wᵀ + b, and the backward's dL/dx and
    dL/dW of every patched Linear, are oneDNN's products (as the LoRA step's), not MKL's."""
    import sys
    from pathlib import Path

    import lorakit
    from lorakit.layers import gemm

    if gemm._ONEDNN is None or not torch.backends.mkldnn.enabled:
        pytest.skip("torch built without oneDNN")
    sys.path.insert(0, str(Path(lorakit.__file__).resolve().parents[1] / "benchmarks"))
    from train_step import same_products_for_full

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6, bias=False))
    assert same_products_for_full(model) == 2
    calls = []
    real = gemm._ONEDNN
    monkeypatch.setattr(gemm, "_ONEDNN", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(2, 5, 12, requires_grad=True)
    out = model(x)
    assert len(calls) == 2
    out.backward(torch.randn_like(out))
    assert len(calls) == 2 + 2 + 2  # dL/dx and dL/dW of each


def test_a_zero_dim_input_to_gemm_linear_gets_f_linears_error():
    """(G20) gemm.linear takes oneDNN for inputs of at least one dimension only: a 0-d input gets
    F.linear's own RuntimeError, not an IndexError from reading its last dimension."""
    from lorakit.layers import gemm

    W = torch.randn(5, 1)
    with pytest.raises(RuntimeError) as want:
        F.linear(torch.tensor(2.0), W)
    with pytest.raises(RuntimeError) as got:
        gemm.linear(torch.tensor(2.0), W)
    assert type(got.value) is type(want.value)
