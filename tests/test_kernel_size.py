"""lorakit's training kernels engage from ``KERNELS_MIN_NUMEL`` input elements up; below it the plain
autograd ops run, with the same gradients. (conftest.py sets the threshold to 0 for every other test.)"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEFAULT_KERNELS_MIN_NUMEL, graph_node_names, lora_llama

import lorakit as lk
from lorakit.layers import fused
from lorakit.train.generate import loss_sum
from lorakit.train.loop import use_lora_training_kernels

KERNEL_NODES = {"FusedLoraLinearBackward", "SharedInputLinearsBackward", "_SwiGLUDownBackward", "RMSNormFnBackward"}


def _node_names(t: torch.Tensor) -> set[str]:
    return graph_node_names(t.grad_fn)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss, n = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    (loss / n).backward()
    return _node_names(loss), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def test_the_default_threshold():
    assert fused.KERNELS_MIN_NUMEL == 0  # conftest's setting for the other tests...
    assert DEFAULT_KERNELS_MIN_NUMEL == 1 << 14  # ...and the library's own


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_small_step_takes_the_plain_ops_with_the_kernels_gradients(monkeypatch, dtype, dropout):
    """A tiny Llama's step on 2 x 12 tokens (hidden 32, intermediate 64: layer inputs of 768 and 1536
    elements): none of the kernels' nodes above them, all four kinds at 0; the gradients equal to
    rounding (the same dropout masks: same seed, drawn in the same order)."""
    base = lora_llama(dtype=dtype, dropout=dropout)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    runs = {}
    for threshold in (0, 2 * 12 * 64 + 1):
        monkeypatch.setattr(fused, "KERNELS_MIN_NUMEL", threshold)
        model = copy.deepcopy(base)
        use_lora_training_kernels(model)
        torch.manual_seed(7)
        runs[threshold] = _step(model, ids)
    with_kernels, plain = runs[0], runs[2 * 12 * 64 + 1]
    expected = KERNEL_NODES if dtype == torch.float32 else KERNEL_NODES - {"RMSNormFnBackward"}  # (fp64: HF's norm)
    assert with_kernels[0] & KERNEL_NODES == expected
    assert plain[0] & KERNEL_NODES == set()
    assert with_kernels[1].keys() == plain[1].keys() and len(plain[1]) == 28
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for k, g in plain[1].items():
        torch.testing.assert_close(g, with_kernels[1][k], msg=k, **tol)


def test_the_rule_counts_the_layer_inputs_elements(monkeypatch):
    """A LoRA Linear's fused node at exactly KERNELS_MIN_NUMEL input elements, the plain ops one below."""
    torch.manual_seed(0)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(5, 16, requires_grad=True)
    monkeypatch.setattr(fused, "KERNELS_MIN_NUMEL", 5 * 16)
    assert "FusedLoraLinearBackward" in _node_names(model(x))
    monkeypatch.setattr(fused, "KERNELS_MIN_NUMEL", 5 * 16 + 1)
    names = _node_names(model(x))
    assert "FusedLoraLinearBackward" not in names and "MmBackward0" in names


def test_a_small_input_on_a_bf16_base_keeps_the_fused_nodes_bf16_products(monkeypatch):
    """On a bf16 base the fused node runs the rank-r products in bf16; the plain ops would run them in
    the adapter's fp32, other arithmetic: a small input keeps the node (no size-dependent numerics)."""
    monkeypatch.setattr(fused, "KERNELS_MIN_NUMEL", 1 << 14)
    torch.manual_seed(0)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(16, 8)).bfloat16(),
                              lk.LoraConfig(r=2, target_modules=["0"]))
    assert "FusedLoraLinearBackward" in _node_names(model(torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)))
