"""The lesson's API (lorakit.lesson): the same model as the library's, and round trips that keep it."""
from __future__ import annotations

import copy

import torch
from conftest import tiny_llama
from torch import nn

import lorakit as lk
from lorakit.inject import iter_lora_layers
from lorakit.lesson import load_lora_weights


def _trained(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_apply_is_get_lora_model_and_merge_keeps_the_output():
    torch.manual_seed(0)
    base = tiny_llama().double()
    ids = torch.randint(3, 100, (2, 7))
    torch.manual_seed(1)
    ours = lk.apply_lora_to_model(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=8.0)
    torch.manual_seed(1)
    lib = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"]))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), lib.state_dict().values()))
    _trained(ours)
    with torch.no_grad():
        want = ours(ids).logits
        merged = lk.merge_lora_weights(ours)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-10, atol=1e-10)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_load_into_a_model_applied_with_another_alpha_computes_the_saved_model(tmp_path):
    # the weights were copied and the model's own alpha kept: 32 instead of the saved 8, 0.26 off
    torch.manual_seed(0)
    base = tiny_llama().double()
    ids = torch.randint(3, 100, (2, 7))
    saved = _trained(lk.apply_lora_to_model(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=8.0))
    lk.save_lora_weights(saved, tmp_path / "a")
    with torch.no_grad():
        want = saved(ids).logits
    applied = lk.apply_lora_to_model(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=32.0)
    lk.load_lora_weights(applied, tmp_path / "a")
    fresh = lk.load_lora_weights(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fresh(ids).logits, want, rtol=1e-12, atol=1e-12)
    assert applied.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


# E1: the lesson's defaults: q_proj and v_proj, rank 8, alpha 16 (scaling 2), no dropout
def test_apply_defaults_are_q_and_v_at_rank_8_with_alpha_16():
    model = lk.apply_lora_to_model(tiny_llama())
    layers = dict(iter_lora_layers(model))
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["q_proj", "v_proj"]
    for layer in layers.values():
        assert layer.r["default"] == 8 and layer.lora_alpha["default"] == 16.0 and layer.scaling["default"] == 2.0
        assert layer.dropout_p("default") == 0.0


def test_load_lora_weights_injects_default_next_to_another_named_adapter(tmp_path):
    """A model carrying adapters, none of them "default": load_lora_weights injects the saved adapter as
    "default" (there is nothing to hot-swap), leaving the other adapter as it was."""
    torch.manual_seed(0)
    src = nn.Sequential()
    src.add_module("q_proj", nn.Linear(4, 4))
    lk.get_lora_model(src, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(src, tmp_path / "ad")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False), adapter_name="other")
    other_A = model.q_proj.lora_A["other"].detach().clone()
    load_lora_weights(model, tmp_path / "ad")
    assert set(lk.inject.get_state(model).configs) == {"other", "default"}
    assert torch.equal(model.q_proj.lora_A["default"], src.q_proj.lora_A["default"])
    assert torch.equal(model.q_proj.lora_A["other"], other_A)
