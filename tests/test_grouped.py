"""lorakit.ops.grouped: q/k/v (and gate/up) as one node give the separate layers' outputs and
gradients, and the grouped path is taken only where it is equivalent."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_same_in_float64, lora_llama, loss_and_grads, tiny_gpt2

import lorakit as lk
from lorakit.ops import fuse_qkv_projections, fuse_rmsnorms, fuse_swiglu_mlps, unfuse_qkv_projections
from lorakit.ops import grouped
from lorakit.ops.grouped import SharedInputLinears, shared_input_linears


@pytest.fixture
def grouped_calls(monkeypatch):
    calls = []
    real = SharedInputLinears.apply
    monkeypatch.setattr(SharedInputLinears, "apply", lambda *a: calls.append(len(a[3:]) // 4) or real(*a))
    return calls


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", [3, 2, 3, 2]),             # per layer: q/k/v, then gate/up
    (["q_proj", "v_proj"], [3, 3]),           # k is a plain frozen Linear in the group
    (["k_proj", "up_proj"], [3, 2, 3, 2]),
    (["o_proj", "down_proj"], []),            # no adapted member: nothing grouped
])
@pytest.mark.parametrize("bias,dropout", [(False, 0.0), (True, 0.0), (False, 0.2)])
def test_grouped_equals_separate_in_float64(grouped_calls, targets, expected, bias, dropout):
    # with dropout each member draws its own mask, in the order the separate layers draw theirs
    model = lora_llama(targets, bias=bias, dropout=dropout)
    ids = torch.randint(3, 101, (3, 9))
    reference = loss_and_grads(model, ids, seed=0)
    assert fuse_qkv_projections(model) == 2 and fuse_swiglu_mlps(model) == 2 and fuse_rmsnorms(model) == 5
    grouped_calls.clear()
    result = loss_and_grads(model, ids, seed=0)
    assert grouped_calls == expected
    assert_same_in_float64(result, reference)


def test_gradcheck_with_mixed_members():
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(2, 3, 5, dtype=d, requires_grad=True)
    W1, W2, W3 = (torch.randn(n, 5, dtype=d) for n in (4, 3, 6))
    b2 = torch.randn(3, dtype=d)
    A1, A3 = (torch.randn(2, 5, dtype=d, requires_grad=True) for _ in range(2))
    B1 = torch.randn(4, 2, dtype=d, requires_grad=True)
    B3 = torch.randn(6, 2, dtype=d, requires_grad=True)

    def fn(x_, A1_, B1_, A3_, B3_):
        return SharedInputLinears.apply(x_, (0.5, None, 2.0), None, W1, None, A1_, B1_, W2, b2, None, None, W3, None, A3_, B3_)

    assert torch.autograd.gradcheck(fn, (x, A1, B1, A3, B3))

    def dropped(x_, A1_, B1_, A3_, B3_):  # member 1 with dropout, member 3 without; the same masks each call
        torch.manual_seed(7)
        outs = SharedInputLinears.apply(x_, (0.5, None, 2.0), (0.4, 0.0, 0.0), W1, None, A1_, B1_, W2, b2, None, None,
                                        W3, None, A3_, B3_)
        return outs[0], outs[2]

    assert torch.autograd.gradcheck(dropped, (x, A1, B1, A3, B3))
    torch.manual_seed(7)
    mask = lk.layers.fused.KeepMask((6, 5), 0.4, x.device).get().view(2, 3, 5)
    q_ref = x @ W1.T + 0.5 * (x * mask / (round(0.6 * 65536) / 65536)) @ A1.T @ B1.T
    torch.testing.assert_close(dropped(x, A1, B1, A3, B3)[0], q_ref, rtol=1e-12, atol=1e-12)
    # an adapted output that the loss does not use passes nothing back, the others are still right
    q, k, _ = fn(x, A1, B1, A3, B3)
    grads = torch.autograd.grad((q * q).sum() + k.sum(), (x, A1, B1))
    q_ref = x @ W1.T + 0.5 * x @ A1.T @ B1.T
    ref = torch.autograd.grad((q_ref * q_ref).sum() + (x @ W2.T + b2).sum(), (x, A1, B1))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_not_grouped_where_not_equivalent(grouped_calls):
    ids = torch.randint(3, 101, (2, 7))
    model = lora_llama()
    fuse_qkv_projections(model)
    with torch.no_grad():                                  # nothing to differentiate
        model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids.clone())
    lorakit_b = lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    import lorakit.inject

    lorakit.inject.inject_adapter(model, lorakit_b, "b")
    lk.set_adapter(model, ["default", "b"])                # two active adapters
    model(ids, labels=ids).loss.backward()
    assert grouped_calls == []
    lk.set_adapter(model, "default")
    model(ids, labels=ids).loss.backward()
    assert grouped_calls == [3, 3]


def test_served_output_only_for_its_own_input():
    model = lora_llama()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    served = grouped._Served(q, x, torch.zeros(2, 3, 32, dtype=torch.float64))
    other = x.clone()
    torch.testing.assert_close(served(other), q(other))    # another tensor: the layer's own forward
    assert served(x).abs().max() == 0                      # its input: the precomputed output, once
    torch.testing.assert_close(served(x), q(x))
    x2 = torch.randn(2, 3, 32, dtype=torch.float64)
    served = grouped._Served(q, x2, torch.zeros(2, 3, 32, dtype=torch.float64))
    x2.add_(1)                                             # changed in place since: recomputed
    torch.testing.assert_close(served(x2), q(x2))


def test_projections_get_their_forward_back_and_copies_work():
    assert fuse_qkv_projections(tiny_gpt2()) == 0          # GPT-2 has a fused c_attn, not q/k/v
    model = lora_llama()
    assert fuse_qkv_projections(model) == 2 == fuse_qkv_projections(model)
    ids = torch.randint(3, 101, (2, 5))
    attn = model.model.layers[0].self_attn

    def fail(*args):
        assert "forward" in attn.q_proj.__dict__           # q/k/v are served during the attention forward
        raise RuntimeError("boom")

    handle = attn.o_proj.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):        # an error inside the attention forward...
        model(ids, labels=ids)
    handle.remove()
    assert all("forward" not in p.__dict__ for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # ...restores them
    ref_loss, _ = loss_and_grads(model, ids, seed=0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        loss, _ = loss_and_grads(other, ids, seed=0)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert unfuse_qkv_projections(model) == 2 and "forward" not in attn.__dict__


def test_shared_input_linears_declines_unknown_layers():
    x = torch.randn(2, 4, requires_grad=True)
    assert shared_input_linears(x, [torch.nn.Linear(4, 3), torch.nn.Conv1d(4, 3, 1)]) is None
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        fuse_qkv_projections("model")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bf16_base_with_fp32_adapters_matches_the_separate_layers(grouped_calls, dropout):
    # the branch runs in bf16 on a bf16 base (as the separate nodes do); adapter gradients stay fp32
    model = lora_llama(dtype=torch.bfloat16, dropout=dropout)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(3, 101, (3, 9))
    ref_loss, ref_grads = loss_and_grads(model, ids, seed=0)
    fuse_qkv_projections(model)
    fuse_swiglu_mlps(model)
    grouped_calls.clear()
    loss, grads = loss_and_grads(model, ids, seed=0)
    assert grouped_calls == [3, 2, 3, 2]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert float((got - want).norm()) <= 0.03 * float(want.norm()) + 1e-6


def test_a_trainable_base_weight_keeps_its_gradient_when_fused():
    """A base projection that trains (its weight or bias unfrozen on purpose) is not grouped: the
    grouped node returns no gradient for W (the bug this catches: linear_plan without the requires_grad check)."""
    model = lora_llama(["q_proj", "v_proj", "gate_proj", "down_proj"])
    layer = model.model.layers[0]
    for proj in (layer.self_attn.k_proj, layer.mlp.up_proj, layer.mlp.down_proj.base_layer):
        proj.weight.requires_grad_(True)
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids, seed=0)
    assert fuse_qkv_projections(model) == 2 and fuse_swiglu_mlps(model) == 2
    assert_same_in_float64(loss_and_grads(model, ids, seed=0), reference)


def test_a_projection_with_its_own_instance_forward_is_left_to_it():
    """Someone else's instance ``forward`` on q_proj (a wrapper, a debugging patch) runs, and is still
    there afterwards (the bug this catches: grouping without the ``"forward" in p.__dict__`` check)."""
    model = lora_llama(["q_proj", "v_proj"])
    q = model.model.layers[0].self_attn.q_proj
    own = type(q).forward

    def doubled(x, *args, **kwargs):
        return 2 * own(q, x, *args, **kwargs)

    q.forward = doubled
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids, seed=0)
    assert fuse_qkv_projections(model) == 2
    assert_same_in_float64(loss_and_grads(model, ids, seed=0), reference)
    assert q.__dict__.get("forward") is doubled


def test_an_mlp_with_another_activation_is_not_fused():
    """The fused tail computes silu(g)·u: an MLP of the same shape with GELU is left to its own
    forward, and computes what it did (the bug this catches: _is_swiglu_mlp without the SiLU check)."""
    model = lora_llama("all-linear")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids, seed=0)
    assert fuse_swiglu_mlps(model) == 0
    assert_same_in_float64(loss_and_grads(model, ids, seed=0), reference)
