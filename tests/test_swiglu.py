"""The fused SwiGLU MLP tail gives the unfused path's outputs and gradients and saves fewer bytes."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_same_in_float64, lora_llama, loss_and_grads, tiny_gpt2

import lorakit as lk
import lorakit.inject
from lorakit.ops import fuse_swiglu_mlps, unfuse_swiglu_mlps


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"], ["gate_proj"]])
def test_fused_equals_unfused_in_float64(dropout, targets):
    model = lora_llama(targets, dropout)
    ids = torch.randint(3, 101, (3, 9))
    reference = loss_and_grads(model, ids, seed=5)
    assert fuse_swiglu_mlps(model) == 2
    assert_same_in_float64(loss_and_grads(model, ids, seed=5), reference)


def test_fused_gradcheck():
    from lorakit.ops.swiglu import _SwiGLUDown
    from lorakit.layers.fused import KeepMask

    torch.manual_seed(0)
    g = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    drop = KeepMask((6, 6), 0.25, torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda g_, u_, A_, B_: _SwiGLUDown.apply(g_, u_, W, b, A_, B_, 0.7, drop), (g, u, A, B))
    assert torch.autograd.gradcheck(lambda g_, u_: _SwiGLUDown.apply(g_, u_, W, None, None, None, 1.0, None), (g, u))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gate_and_up_gradients_are_bit_identical_to_autograd(dtype):
    # dL/dg by the kernel autograd uses for F.silu, dL/du from the forward's silu(g): the same values
    # as the unfused expression, bit for bit, in half precision too (frozen down projection)
    from lorakit.ops.swiglu import _SwiGLUDown

    torch.manual_seed(3)
    g = (2 * torch.randn(4, 7, 48)).to(dtype).requires_grad_()
    u = torch.randn(4, 7, 48).to(dtype).requires_grad_()
    W = torch.randn(24, 48).to(dtype)
    grad = torch.randn(4, 7, 24).to(dtype)
    fused = _SwiGLUDown.apply(g, u, W, None, None, None, 1.0, None)
    plain = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, W)
    assert torch.equal(fused, plain)
    got, want = torch.autograd.grad(fused, (g, u), grad), torch.autograd.grad(plain, (g, u), grad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_fused_saves_fewer_bytes_for_backward():
    def saved_bytes(model, ids):
        total = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss
        return sum(total)

    model = lora_llama(dropout=0.1, dtype=torch.float32)
    ids = torch.randint(3, 101, (4, 32))
    plain = saved_bytes(model, ids)
    fuse_swiglu_mlps(model)
    fused = saved_bytes(model, ids)
    inter, layers = 64, 2
    # silu(g) and the product (4 x 32 x 64 floats each) are no longer kept, in both layers
    assert plain - fused >= 2 * layers * 4 * 32 * inter * 4


def test_fallbacks_keep_exact_outputs():
    model = lora_llama()
    ids = torch.randint(3, 101, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    fuse_swiglu_mlps(model)
    with torch.no_grad():                                  # no grad: the module's own forward
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    with lk.disable_adapters(model):                       # disabled: base only, still fused
        base = model(ids).logits
    unfuse_swiglu_mlps(model)
    with lk.disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base.detach(), rtol=1e-12, atol=1e-12)


def test_two_active_adapters_and_merged_fall_back():
    model = lora_llama()
    lorakit.inject.inject_adapter(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False), "b")
    lk.set_adapter(model, ["default", "b"])
    ids = torch.randint(3, 101, (2, 7))
    ref_loss, ref_grads = loss_and_grads(model, ids, seed=1)
    fuse_swiglu_mlps(model)
    loss, grads = loss_and_grads(model, ids, seed=1)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    lk.merge(model)
    with torch.enable_grad():
        out = model(ids, labels=ids).loss
    assert torch.isfinite(out)


def test_only_swiglu_mlps_are_fused_and_copies_work():
    assert fuse_swiglu_mlps(tiny_gpt2()) == 0              # GPT-2's MLP is not SwiGLU
    model = lora_llama()
    assert fuse_swiglu_mlps(model) == 2
    assert fuse_swiglu_mlps(model) == 2                    # idempotent
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].mlp.forward.module is twin.model.layers[0].mlp
    restored = pickle.loads(pickle.dumps(model))
    ids = torch.randint(3, 101, (2, 5))
    ref_loss, _ = loss_and_grads(model, ids, seed=0)
    for other in (twin, restored):
        loss, _ = loss_and_grads(other, ids, seed=0)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert unfuse_swiglu_mlps(model) == 2 and "forward" not in model.model.layers[0].mlp.__dict__


def test_grad_enabled_but_nothing_trainable_runs_each_projection_once():
    model = lora_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    fuse_swiglu_mlps(model)
    calls = []
    mlp = model.model.layers[0].mlp
    handle = mlp.gate_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 101, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    calls.clear()
    out = model(ids).logits                                # grad mode on, but nothing requires grad
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_fuse_rejects_what_is_not_a_module():
    for fn in (fuse_swiglu_mlps, unfuse_swiglu_mlps):
        with pytest.raises(TypeError, match="expected a torch.nn.Module, got str"):
            fn("model")


# O4: on a bf16 base with fp32 adapters the fused MLP's LoRA branch runs in bf16, as the unfused
# training path does (branch_dtype): the same logits bit for bit, and no fp32 copy of silu(g)·u
def test_fused_mlp_on_a_bf16_base_computes_the_branch_as_the_unfused_path():
    model = lora_llama(["down_proj"], dtype=torch.bfloat16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ids = torch.randint(3, 101, (3, 9))
    ref = model(ids).logits  # grad enabled: the training path
    assert fuse_swiglu_mlps(model) == 2
    got = model(ids).logits
    assert torch.equal(got, ref)


def test_under_autocast_the_fused_mlp_runs_the_module_s_own_forward():
    """Under bf16 autocast the fused tail is not equivalent (autocast picks the dtypes): the module's
    own forward runs, so loss and gradients are bitwise the unfused ones (the bug this catches: the autocast
    check dropped from _FusedMLPForward)."""
    model = lora_llama("all-linear", dtype=torch.float32)
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = loss_and_grads(model, ids, seed=0)
    assert fuse_swiglu_mlps(model) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, ids, seed=0)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_fused_mlp_on_a_float16_base_computes_the_branch_as_the_unfused_path():
    """fp32 adapters on an fp16 base: the branch runs in the adapters' fp32 (branch_dtype), as the
    unfused LoRA layer runs it, so the logits are bitwise the same and dL/dB agrees to fp32 rounding
    (the bug this catches: the product handed to the branch in fp16, its matmuls then in fp16)."""
    model = lora_llama(["down_proj"], dtype=torch.float16)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(model, ids, seed=0)
    assert fuse_swiglu_mlps(model) == 2
    loss, grads = loss_and_grads(model, ids, seed=0)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
