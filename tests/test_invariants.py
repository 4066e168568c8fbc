"""The invariants every layer type x variant must keep (see DESIGN.md, 'Rules that keep it honest')."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from conftest import LAYER_CASES, VARIANT_CASES, Wrap, supported

GRID = [(layer, variant) for layer in sorted(LAYER_CASES) for variant in sorted(VARIANT_CASES) if supported(layer, variant)]


def build(layer_name: str, variant: str, init=True, r: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    make_layer, make_input = LAYER_CASES[layer_name]
    model = Wrap(make_layer()).eval()
    x = make_input()
    with torch.no_grad():
        base_out = model(x).clone()
    base = copy.deepcopy(model)
    kw = dict(VARIANT_CASES[variant])
    method = kw.pop("init_lora_weights", None)
    cfg = lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"], init_lora_weights=method or init, **kw)
    lk.get_lora_model(model, cfg)
    if method is not None and init is False:
        # An init method (PiSSA, OLoRA) keeps the output by design; move A and B so that the adapter
        # acts (an Embedding gets the standard init there, whose A is zero).
        with torch.no_grad():
            model.layer.lora_A["default"].add_(torch.randn_like(model.layer.lora_A["default"]) * 0.3)
            model.layer.lora_B["default"].add_(torch.randn_like(model.layer.lora_B["default"]) * 0.3)
    return model, base, x, base_out


def init_method(variant: str) -> bool:
    """True for variants that are init methods changing the base weight (PiSSA, OLoRA)."""
    return "init_lora_weights" in VARIANT_CASES[variant]


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_fresh_adapter_keeps_output(layer_name, variant):
    model, _, x, base_out = build(layer_name, variant)
    assert isinstance(model.layer, lk.LoraLayer)
    # PiSSA/OLoRA: W_res + s·B₀A₀ = W up to float rounding; everything else: bit for bit.
    tol = 1e-5 if init_method(variant) else 0
    torch.testing.assert_close(model(x), base_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_nonzero_adapter_changes_output(layer_name, variant):
    model, _, x, base_out = build(layer_name, variant, init=False)
    assert (model(x) - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_merge_equals_forward_and_unmerge_restores(layer_name, variant):
    model, base, x, _ = build(layer_name, variant, init=False)
    w0 = model.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        lk.merge(model)
        assert model.layer.merged_adapters == ["default"]
        assert not torch.equal(model.layer.base_layer.weight, w0)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        lk.unmerge(model)
    assert (model.layer.base_layer.weight - w0).abs().max() <= 1e-6
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_merge_and_unload_gives_plain_model(layer_name, variant):
    model, base, x, _ = build(layer_name, variant, init=False)
    with torch.no_grad():
        expected = model(x)
        plain = lk.merge_and_unload(model)
        assert type(plain.layer) is type(base.layer)
        assert not any(isinstance(m, lk.LoraLayer) for m in plain.modules())
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_disable_and_unload_give_base(layer_name, variant):
    model, base, x, base_out = build(layer_name, variant, init=False)
    if init_method(variant):  # the base layer holds the residual W − s·B₀A₀ (as in PEFT)
        with torch.no_grad():
            base_out = lk.unload(copy.deepcopy(model))(x)
    with torch.no_grad():
        with lk.disable_adapters(model):
            torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
        assert (model(x) - base_out).abs().max() > 1e-3  # enabled again afterwards
        lk.merge(model)
        with lk.disable_adapters(model):  # merged adapters are taken out for the duration
            torch.testing.assert_close(model(x), base_out, rtol=1e-5, atol=1e-5)
        assert model.layer.merged_adapters == ["default"]
        plain = lk.unload(model)
        torch.testing.assert_close(plain(x), base_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_save_load_same_output(layer_name, variant, tmp_path):
    model, base, x, _ = build(layer_name, variant, init=False)
    with torch.no_grad():
        expected = model(x)
    # PiSSA/OLoRA: export a plain LoRA against the original base (rank 2r), exact up to rounding.
    lk.save_adapter(model, tmp_path, convert_to_lora=init_method(variant))
    loaded = lk.load_adapter(base, tmp_path)
    tol = 1e-5 if init_method(variant) else 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_to_dtype_reaches_every_adapter_tensor(layer_name, variant):
    model, *_ = build(layer_name, variant, init=False)
    model.to(torch.bfloat16)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            assert tensor.dtype == torch.bfloat16, name


@pytest.mark.parametrize("layer_name,variant", GRID)
def test_only_adapter_trains(layer_name, variant):
    model, _, x, _ = build(layer_name, variant, init=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable), trainable
    out = model(x)
    out.float().square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert model.layer.base_layer.weight.grad is None


@pytest.mark.parametrize("layer_name", sorted(LAYER_CASES))
def test_forward_never_builds_delta_weight(layer_name, monkeypatch):
    model, _, x, _ = build(layer_name, "lora", init=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("forward materialised B @ A")

    monkeypatch.setattr(type(model.layer), "delta_from", forbidden)
    model(x).float().sum().backward()


@pytest.mark.parametrize("layer_name", sorted(LAYER_CASES))
def test_half_precision_base_keeps_fp32_adapter(layer_name):
    model, _, x, _ = build(layer_name, "lora", init=False)
    fp32_out = model(x)
    lk.unload(model)
    model.to(torch.bfloat16)
    x16 = x.to(torch.bfloat16) if x.is_floating_point() else x
    lk.get_lora_model(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["layer"]))
    assert model.layer.lora_A["default"].dtype == torch.float32
    out = model(x16)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [model.layer.lora_A["default"].grad, model.layer.lora_B["default"].grad]
    # both reach the fp32 adapter (with one factor zero at init, its partner's gradient is zero)
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(bool(g.any()) for g in grads)
    assert fp32_out.shape == out.shape


@pytest.mark.parametrize("layer_name", sorted(LAYER_CASES))
def test_rslora_scaling(layer_name):
    plain, *_ = build(layer_name, "lora", r=16)
    rs, *_ = build(layer_name, "rslora", r=16)
    assert plain.layer.scaling["default"] == pytest.approx(32 / 16)
    assert rs.layer.scaling["default"] == pytest.approx(32 / 4)
