"""Tests from mutation round 13 (/tmp/mutants13: 108 mutants over ops/swiglu, ops/rmsnorm,
ops/attention, analysis/lowrank, analysis/adapter_tools and train/distributed; 77 caught, 6
equivalent, 24 gaps): one test per gap tested, each checked to fail on its mutant; no bug found.
t21 and t10 were tested a session later; t36 (extract's rank_pattern without the unchanged
candidates) is equivalent: an unchanged module is left out of target_modules, so the key's anchoring
changes nothing that loads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.train.distributed import Dist, _buckets


# ---- distributed (one process) -------------------------------------------------------------

def test_shares_of_three_processes_partition_the_batch():  # d1
    items = list(range(10))
    shares = [Dist(world=3, rank=r).share(items) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(x for s in shares for x in s) == items


def test_buckets_split_where_the_gradient_dtype_changes():  # d7
    params = [torch.zeros(2, dtype=dt, requires_grad=True) for dt in (torch.float32, torch.float32, torch.bfloat16, torch.float32)]
    for p in params:
        p.grad = torch.zeros_like(p)
    buckets = _buckets(params)
    assert [[p.dtype for p in b] for b in buckets] == [[torch.float32] * 2, [torch.bfloat16], [torch.float32]]


def test_a_single_process_dist_is_a_no_op():  # d11, d12, d13
    d = Dist()
    p = torch.ones(3, requires_grad=True)
    p.grad = torch.full((3,), 2.0)
    assert d.sum_gradients([p], [1.5, 4.0]) == [1.5, 4.0]
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert d.sum([3.0]) == [3.0]
    assert d.gather_objects({"a": 1}) == [{"a": 1}]
    assert d.broadcast_object("x") == "x"
    d.barrier()  # no process group: must not touch torch.distributed
    d.broadcast_parameters([p])


# ---- analysis/lowrank -------------------------------------------------------------------------

def test_parameter_table_refuses_rank_zero_and_bool_ranks():  # l2, l5
    from lorakit.analysis.lowrank import parameter_table

    with pytest.raises(ValueError):
        parameter_table(8, 6, [0])
    with pytest.raises(ValueError):
        parameter_table(8, 6, [True])


def test_synthetic_low_rank_takes_the_full_rank():  # l6
    from lorakit.analysis.lowrank import synthetic_low_rank

    W = synthetic_low_rank(4, 6, 4)
    assert W.shape == (4, 6) and np.linalg.matrix_rank(W.numpy()) == 4


def test_reconstruction_energy_is_the_squared_singular_value_share():  # l11
    from lorakit.analysis.lowrank import reconstruction_errors

    W = torch.from_numpy(np.random.default_rng(0).standard_normal((7, 5)))
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    rows = reconstruction_errors(W, [1, 2, 5])
    for row in rows:
        k = row["rank"]
        assert row["energy"] == pytest.approx((s[:k] ** 2).sum() / (s ** 2).sum(), rel=1e-12)


def test_select_weights_takes_layers_in_numeric_order(tmp_path):  # l19
    from safetensors.torch import save_file

    from lorakit.analysis.lowrank import select_weights_counted

    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.q_proj.weight": torch.randn(4, 4, generator=g) for i in (10, 2, 1)},
              str(tmp_path / "model.safetensors"))
    weights, matched = select_weights_counted(str(tmp_path), r"q_proj", limit=2)
    assert matched == 3
    assert list(weights) == ["model.layers.1.q_proj", "model.layers.2.q_proj"]


# ---- ops/attention ----------------------------------------------------------------------------

def test_short_attention_refuses_a_mask_that_is_not_4d():  # a14
    from lorakit.ops.attention import short_attention

    q, k = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="4-D"):
        short_attention(q, k, k, torch.ones(1, 3, 3, dtype=torch.bool))


class _AttnModule:
    num_key_value_groups, is_causal, training = 3, True, True


def _count_short_attention(monkeypatch):
    from lorakit.ops.attention import ShortAttention

    calls, real = [], ShortAttention.apply
    monkeypatch.setattr(ShortAttention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_dispatch_boundaries_and_no_grad(monkeypatch):  # a20, a28
    from lorakit.ops import attention as att

    calls = _count_short_attention(monkeypatch)
    g = torch.Generator().manual_seed(0)

    def qk(n):
        q = torch.randn(1, 6, n, 8, generator=g).to(torch.bfloat16).requires_grad_()
        k = torch.randn(1, 2, n, 8, generator=g).to(torch.bfloat16).requires_grad_()
        return q, k

    with torch.no_grad():  # no gradients wanted: SDPA, although the inputs require grad
        q, k = qk(8)
        att.attention_forward(_AttnModule(), q, k, k, None)
    assert calls == []
    n = att.SHORT_ATTENTION_MAX_KEYS  # at most this many keys with a (non-causal) mask
    q, k = qk(n)
    att.attention_forward(_AttnModule(), q, k, k, torch.ones(1, 1, n, n, dtype=torch.bool))
    n = att.CAUSAL_ATTENTION_MAX_KEYS  # at most this many keys, causal
    q, k = qk(n)
    att.attention_forward(_AttnModule(), q, k, k, None)
    assert len(calls) == 2


def test_causal_with_fewer_queries_than_keys_and_no_mask_is_sdpas(monkeypatch):  # a21
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.ops import attention as att

    calls = _count_short_attention(monkeypatch)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 3, 8, generator=g).to(torch.bfloat16).requires_grad_()
    k = torch.randn(1, 2, 5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    v = torch.randn(1, 2, 5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    got = att.attention_forward(_AttnModule(), q, k, v, None)[0]
    want = sdpa_attention_forward(_AttnModule(), q, k, v, None)[0]
    assert calls == []
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


# ---- ops/swiglu -------------------------------------------------------------------------------

@pytest.mark.parametrize("frozen", ["lora_B", "lora_A"])
def test_fused_swiglu_with_one_factor_of_down_proj_frozen(frozen):  # s5
    from conftest import assert_same_in_float64, lora_llama, loss_and_grads

    from lorakit.ops import fuse_swiglu_mlps

    model = lora_llama(["down_proj"])
    for n, p in model.named_parameters():
        if frozen in n:
            p.requires_grad_(False)
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids)
    assert fuse_swiglu_mlps(model) == 2
    assert_same_in_float64(loss_and_grads(model, ids), reference)


def test_a_swiglu_shaped_mlp_with_another_activation_is_not_fused():  # s13
    from conftest import assert_same_in_float64, lora_llama, loss_and_grads

    from lorakit.ops import fuse_swiglu_mlps

    model = lora_llama(["down_proj"])
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids)
    assert fuse_swiglu_mlps(model) == 0
    assert_same_in_float64(loss_and_grads(model, ids), reference)


# ---- ops/rmsnorm ------------------------------------------------------------------------------

class _OnePlusWeightNorm(torch.nn.Module):
    """Gemma's formula, (1 + w) · x̂, with Llama's attribute names: not the Llama norm."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((n,), 0.25))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (1.0 + self.weight) * hidden_states.to(input_dtype)


def test_a_norm_with_another_formula_is_not_fused():  # r15
    from lorakit.ops import fuse_rmsnorms

    norm = _OnePlusWeightNorm(8)
    h = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = h.detach().double()
    want = (1.25 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).float()
    assert fuse_rmsnorms(torch.nn.Sequential(norm)) == 0
    torch.testing.assert_close(norm(h), want)


def test_fused_norm_runs_the_module_forward_without_grad_and_under_autocast(monkeypatch):  # r13, r14
    from conftest import tiny_llama

    from lorakit.ops import fuse_rmsnorms
    from lorakit.ops.rmsnorm import RMSNormFn

    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(3, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    assert fuse_rmsnorms(model) == 5
    calls, real = [], RMSNormFn.apply
    monkeypatch.setattr(RMSNormFn, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert calls == []
    model(ids)
    assert len(calls) == 5  # and with gradients, outside autocast, the fused node


def test_rmsnorm_fn_float64_gradients_are_float64_exact():  # r16
    from lorakit.ops.rmsnorm import RMSNormFn

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(4, 6, dtype=torch.float64, generator=g)
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    want = torch.autograd.grad(ref, (h, w), grad)
    got = torch.autograd.grad(RMSNormFn.apply(h, w, 1e-5), (h, w), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- analysis/adapter_tools -------------------------------------------------------------------

def test_resize_with_energy_keeps_a_module_whose_update_is_zero(tmp_path):  # t54
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama
    from safetensors.torch import load_file, save_file

    from lorakit.analysis.adapter_tools import resize_adapter

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(str(f))
    zero = [k for k in sd if "layers.0." in k and "lora_B" in k]
    assert len(zero) == 1
    sd[zero[0]].zero_()
    save_file(sd, str(f))
    rep = resize_adapter(tmp_path / "a", 2, tmp_path / "b", energy=0.9)
    rows = {r["module"]: r for r in rep["modules"]}
    z = next(r for n, r in rows.items() if "layers.0." in n)
    assert z["r"] == 1 and z["delta_norm"] == 0.0
    out = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    b = next(t for k, t in out.items() if "layers.0." in k and "lora_B" in k)
    a = next(t for k, t in out.items() if "layers.0." in k and "lora_A" in k)
    assert a.shape[0] == 1 and not bool((b.double() @ a.double()).any())


def test_inspect_totals_count_the_tensors_that_are_not_lora_factors(tmp_path):  # t21
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    from lorakit.analysis.adapter_tools import inspect_adapter

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"]))
    pm.save_pretrained(tmp_path / "a")
    rep = inspect_adapter(tmp_path / "a")
    head = pm.base_model.model.lm_head.modules_to_save["default"].weight.numel()
    lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert rep["totals"]["other_tensors"] and rep["totals"]["params"] == lora + head


def test_a_grouped_conv_adapter_whose_outputs_do_not_split_into_the_groups_is_refused(tmp_path):  # t10
    import json

    from safetensors.torch import save_file

    from lorakit.analysis.adapter_tools import read_adapter

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["conv"]}))
    # r 4 and B holding 2 of them: 2 groups, but 5 output channels do not split into 2
    save_file({"base_model.model.conv.lora_A.weight": torch.randn(4, 3, 3, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(5, 2, 1, 1)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="'conv'.*must agree.*groups"):
        read_adapter(tmp_path / "a")
    save_file({"base_model.model.conv.lora_A.weight": torch.randn(4, 3, 3, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(6, 2, 1, 1)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    assert read_adapter(tmp_path / "a").modules["conv"].kind == "conv2d"
