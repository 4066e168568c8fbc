"""The fused LoRA branch gives the plain path's outputs and gradients (float64), with and without dropout."""
from __future__ import annotations

import pytest
import torch

from lorakit.layers.fused import FusedLoraLinear, dropout_mask, fused_lora_add


def reference(result, x, A, B, scale, mask, keep):
    xa = x if mask is None else x * mask / keep
    return result + scale * (xa @ A.T) @ B.T


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(3, 5, 10), (7, 10)])
def test_fused_matches_plain_in_float64(p, shape):
    torch.manual_seed(0)
    W = torch.randn(12, 10, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    B = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    mask = dropout_mask(x.shape, p, x.device) if p else None
    keep = 1 - p

    ref = reference(x @ W.T, x, A, B, 1.7, mask, keep)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, A, B), g)

    out = FusedLoraLinear.apply(x @ W.T, x, A, B, 1.7, mask, keep)
    grads = torch.autograd.grad(out, (x, A, B), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, A_, B_: FusedLoraLinear.apply(x_ @ W.T, x_, A_, B_, 1.7, mask, keep),
                                    (x, A, B))


def test_dropout_mask_statistics_and_eval_has_no_dropout():
    torch.manual_seed(0)
    mask = dropout_mask(torch.Size([200, 100]), 0.25, torch.device("cpu"))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.75) < 0.02
    x = torch.randn(4, 10)
    A, B = torch.randn(3, 10), torch.randn(6, 3)
    base = torch.randn(4, 6)
    out = fused_lora_add(base.clone(), x, A, B, 2.0, 0.5, training=False)
    torch.testing.assert_close(out, base + 2.0 * (x @ A.T) @ B.T)


def test_mixed_precision_base_with_fp32_adapter():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 10, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(12, 10, dtype=torch.bfloat16)
    A = torch.randn(4, 10, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    out = fused_lora_add(x @ W.T, x, A, B, 0.5, 0.0, training=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_A = torch.autograd.grad((x.float() @ W.float().T + 0.5 * (x.float() @ A.T) @ B.T).sum(), A)[0]
    torch.testing.assert_close(A.grad, ref_A, rtol=0.05, atol=0.05)


def test_saved_tensors_are_smaller_than_plain_path_with_dropout():
    """The fused node keeps no dropped-out float copy of the input: fewer bytes saved for backward."""
    from torch import nn

    import lorakit as lk

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["0", "1"], lora_dropout=0.1)).train()
    x = torch.randn(32, 64, requires_grad=True)
    fused = saved_bytes(lambda: model(x))
    layer_type = type(model[0])
    plain = layer_type.add_lora
    try:
        layer_type.add_lora = lk.LoraLayer.add_lora  # the generic out-of-place path
        unfused = saved_bytes(lambda: model(x))
    finally:
        layer_type.add_lora = plain
    assert fused < unfused


def test_backward_under_bf16_autocast():
    """Training under torch.autocast(bf16) works and matches the fp32 gradients closely."""
    from conftest import tiny_llama

    import lorakit as lk

    grads = {}
    for use_amp in (False, True):
        model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        x = torch.randint(0, 101, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
            loss = model(x, labels=x).loss
        loss.backward()
        A = model.model.layers[0].self_attn.q_proj.lora_A["default"]
        assert A.grad is not None and A.grad.dtype == torch.float32
        grads[use_amp] = A.grad.clone()
    cos = torch.nn.functional.cosine_similarity(grads[False].flatten(), grads[True].flatten(), dim=0)
    assert cos > 0.95
