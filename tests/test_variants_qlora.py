"""QLoRA: NF4 storage with double quantization, LoRA / DoRA on an NF4 base, merge into a dense copy."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.nf4_linear import LinearNF4, LoraLinearNF4
from lorakit.quant import NF4_LEVELS, dequantize_nf4, quantize_nf4
from conftest import tiny_llama


def _x():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def test_roundtrip_error_and_size():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    state = quantize_nf4(w)
    d = dequantize_nf4(state, w.shape)
    # Each weight is within half the widest NF4 gap of its block's absmax (plus the 8-bit scale error).
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))
    assert ((d - w).reshape(-1, 64).abs() <= absmax * (gap / 2 + 0.01)).all()
    assert (d - w).abs().mean() / w.abs().mean() < 0.12
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    assert 8 * nbytes / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # QLoRA §3: 4.127 bits
    # odd shapes are padded, and the exact zero level keeps zeros exact
    odd = torch.randn(7, 9)
    odd[0, :5] = 0
    back = dequantize_nf4(quantize_nf4(odd), odd.shape)
    assert back.shape == odd.shape and (back[0, :5] == 0).all()
    with pytest.raises(ValueError, match="finite"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))


def _quantized(seed=0):
    return lk.quantize_model_nf4(tiny_llama(seed))


def test_quantize_model():
    original = tiny_llama()
    q = lk.quantize_model_nf4(copy.deepcopy(original))
    nf4 = [n for n, m in q.named_modules() if isinstance(m, LinearNF4)]
    assert len(nf4) == 14 and not any("lm_head" in n for n in nf4)
    assert not any(isinstance(m, LinearNF4) for m in [q.lm_head])
    with torch.no_grad():
        a, b = original(_x()).logits, q(_x()).logits
    assert 0 < (a - b).abs().mean() < 0.15 * a.abs().mean()  # close, not equal (4-bit weights)
    # copies are exact (no re-quantisation); .to(bf16) leaves the NF4 state alone and still runs
    c = copy.deepcopy(q)
    with torch.no_grad():
        torch.testing.assert_close(c(_x()).logits, b, rtol=0, atol=0)
    codes = c.model.layers[0].self_attn.q_proj.codes.clone()
    c.to(torch.bfloat16)
    assert torch.equal(c.model.layers[0].self_attn.q_proj.codes, codes)
    with torch.no_grad():
        assert c(_x()).logits.dtype == torch.bfloat16
    mem = lk.nf4_memory(q)
    assert mem["params"] == sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, LinearNF4))


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_nf4(use_dora, tmp_path):
    q = _quantized()
    with torch.no_grad():
        base_out = q(_x()).logits
    reference = copy.deepcopy(q)
    m = lk.get_lora_model(q, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora))
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinearNF4) and isinstance(layer.base_layer, LinearNF4)
    with torch.no_grad():
        torch.testing.assert_close(m(_x()).logits, base_out, rtol=0, atol=0)  # fresh adapter: no change
    # train: only adapter tensors get gradients, the NF4 state is untouched
    codes = layer.base_layer.codes.clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        m(_x()).logits.logsumexp(-1).mean().backward()
        opt.step()
    assert all(".lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    assert torch.equal(layer.base_layer.codes, codes)
    with torch.no_grad():
        trained = m(_x()).logits
        assert (trained - base_out).abs().max() > 1e-3
        # merge goes into a dense copy; unmerge brings the very same NF4 layer back
        nf4_layer = layer.base_layer
        lk.merge(m)
        assert type(layer.base_layer) is nn.Linear
        torch.testing.assert_close(m(_x()).logits, trained, rtol=1e-4, atol=1e-4)
        lk.unmerge(m)
        assert layer.base_layer is nf4_layer and not hasattr(layer, "quantized_base")
        torch.testing.assert_close(m(_x()).logits, trained, rtol=1e-5, atol=1e-5)
    # save -> load into another quantised copy gives the same output
    lk.save_adapter(m, tmp_path)
    loaded = lk.load_adapter(reference, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()).logits, trained, rtol=1e-5, atol=1e-5)
        # merge_and_unload: dense nn.Linear with the merged weight
        plain = lk.merge_and_unload(m)
        assert not any(isinstance(x, (LinearNF4, lk.LoraLayer)) for x in plain.modules())
        torch.testing.assert_close(plain(_x()).logits, trained, rtol=1e-4, atol=1e-4)


def test_bad_input():
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lk.quantize_model_nf4(m)
    with pytest.raises(ValueError, match="full-precision base"):
        lk.get_lora_model(_quantized(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"finite weight; this one holds 2 NaN/inf value\(s\)"):
        quantize_nf4(w)
    with pytest.raises(ValueError, match="float64 weight, got dtype torch.int64"):
        quantize_nf4(torch.zeros(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="got dtype torch.float8_e4m3fn"):  # was torch's "isfinite" error
        quantize_nf4(torch.zeros(4, 64).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="too large for fp32 block scales"):  # came back as NaN
        quantize_nf4(torch.full((4, 64), 1e38))
    with pytest.raises(ValueError, match=r"a weight with elements, got shape \(0, 64\)"):
        quantize_nf4(torch.zeros(0, 64))


def test_nf4_backward_matches_dense_and_keeps_no_weight():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    q = LinearNF4.from_linear(dense)
    ref = q.to_linear()
    x = torch.randn(5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    def saved_shapes(module, inp):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            result = module(inp)
        return result, shapes

    out, shapes = saved_shapes(q, x)
    weight_sized = lambda shapes: [s for s in shapes if sorted(s) == [48, 64]]  # W or Wᵀ  # noqa: E731
    assert not weight_sized(shapes)  # autograd keeps no dense copy of the NF4 weight ...
    assert weight_sized(saved_shapes(ref, x.detach().clone().requires_grad_(True))[1])  # ... a dense Linear does
    out.square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(out, ref(x2))
    torch.testing.assert_close(x.grad, x2.grad)


def test_nf4_block_scale_never_flips_or_clips_a_small_block():
    """A block far smaller than the rest of its double-quantisation group: its int8 scale code is
    rounded the way that reconstructs it better, so it never gets a scale <= 0 (which flipped every
    sign in it) and never does worse than the nearest code."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    w[0] *= 0.01
    w[1] *= 20
    d = dequantize_nf4(quantize_nf4(w), w.shape)
    assert (d * w >= 0).all()  # no weight changes sign
    assert (d[0] - w[0]).norm() <= w[0].norm() * 1.0001  # at worst the block rounds to zero
    w[0] = torch.randn(256) * 0.05 * 0.1
    d = dequantize_nf4(quantize_nf4(w), w.shape)
    assert (d[0] - w[0]).norm() / w[0].norm() < 0.2
    # on ordinary weights it is at least as good as NF4 with exact (fp32) block scales, within 1%
    g = torch.randn(512, 512) * 0.02
    blocks = g.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    exact = levels[torch.bucketize(blocks / absmax, (levels[1:] + levels[:-1]) / 2)] * absmax
    ours = dequantize_nf4(quantize_nf4(g), g.shape).reshape(-1, 64)
    assert (ours - blocks).norm() <= 1.01 * (exact - blocks).norm()


def test_nf4_model_cast_to_bf16_merges_in_bf16():
    m = lk.quantize_model_nf4(tiny_llama()).to(torch.bfloat16)
    assert all(layer.compute_dtype is torch.bfloat16 for layer in m.modules() if isinstance(layer, LinearNF4))
    lk.get_lora_model(m, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    x = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        unmerged = m(x).logits.float()
        lk.merge(m)
        merged = m(x).logits.float()
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)
    plain = lk.merge_and_unload(m)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype is torch.bfloat16
    with torch.no_grad():
        plain(x)


def test_dequantising_a_large_weight_takes_little_more_than_the_result():
    """dequantize_nf4 works in chunks: beyond the bf16 result (2 bytes per weight) it takes a bounded
    few MB, where the one-shot computation took ~6 bytes more per weight (fp32 levels, their scaled
    copy, int32 indices): 8 in all on a 2048 x 5504 layer."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.analysis.measure import MEMORY_EVENT

    shape = (3000, 2048)
    state = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = dequantize_nf4(state, shape, dtype=torch.bfloat16)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT),
                    key=lambda e: e.start_ns())
    current = top = 0
    for e in events:
        current += e.nbytes()
        top = max(top, current)
    n = shape[0] * shape[1]
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert top - 2 * n < 16 * 2**20, (top, n)  # the chunks' work is bounded (one-shot: 6 bytes per weight)
    # the chunks give the one-shot result, bit for bit
    codes = state["codes"]
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    idx = torch.stack((codes.long() >> 4, codes.long() & 15), dim=1).reshape(-1, 64)
    from lorakit.quant import _dequantize_scales
    scale = _dequantize_scales(state["scales"], state["group_factors"].view(torch.float32),
                               state["scale_mean"].view(torch.float32), 256)
    assert torch.equal(out, (levels[idx] * scale[:, None]).reshape(-1)[:n].view(shape).to(torch.bfloat16))


def test_quantize_model_refuses_a_bad_layer_by_name_and_changes_nothing():
    # the layers before the bad one were already replaced, and the error did not name it
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"quantize_model_nf4: 1: .*NaN/inf.*the model is unchanged"):
        lk.quantize_model_nf4(model)
    assert [type(m) for m in model] == [nn.Linear] * 3


def test_module_type_cast_keeps_the_nf4_codes():
    # nn.Module.type casts every tensor: the uint8 codes became floats, outputs 8.8e11 off
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(64, 32).half())
    x = torch.randn(3, 64)
    want = x @ layer.dequantize_weight(torch.float32).T + layer.bias.float()
    layer.type(torch.float32)
    assert layer.codes.dtype == torch.uint8 and layer.scales.dtype == torch.int8
    assert layer.compute_dtype == torch.float32
    torch.testing.assert_close(layer(x), want)


def test_the_block_with_the_extreme_scale_keeps_its_absmax_exactly():
    # Q2: the double-quant group factor is max|c_b - mean| / 127, so the block furthest from the
    # mean gets the int8 code ±127 and its scale is reconstructed exactly: its largest weight maps to
    # the NF4 level ±1 and comes back (almost) bit for bit. With /128 that block's scale is clipped.
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.02          # 16 blocks, one scale group
    w[5] *= 50.0                             # one block far above the mean absmax
    d = dequantize_nf4(quantize_nf4(w), w.shape)
    i = int(w.abs().argmax())
    assert abs(float(d.flatten()[i] - w.flatten()[i])) <= 1e-5 * float(w.abs().max())


def test_skip_entry_matches_whole_names_or_dotted_suffixes_only():
    # Q6: "proj" names a module called "proj" (or ending in ".proj"), not every "*_proj"
    q = lk.quantize_model_nf4(tiny_llama(), skip=["proj"])
    assert isinstance(q.model.layers[0].self_attn.q_proj, LinearNF4)
    assert isinstance(q.model.layers[0].mlp.up_proj, LinearNF4)


def test_nf4_memory_reports_bits_per_weight():
    # Q7: about 4.127 bits per weight (4 + 8/64 + padding/group factors), not bytes
    mem = lk.nf4_memory(lk.quantize_model_nf4(tiny_llama()))
    assert 4.0 < mem["bits_per_param"] < 4.6
    assert mem["bits_per_param"] == 8.0 * mem["bytes"] / mem["params"]


def test_unmerging_one_of_two_merged_adapters_keeps_the_other_merged():
    # Q8: the NF4 base comes back only once *every* adapter is unmerged
    torch.manual_seed(0)
    m = lk.quantize_model_nf4(tiny_llama())
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name=name)
    lk.set_adapter(m, ["a", "b"])
    x = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = m(x).logits
        lk.merge(m)
        layer = m.model.layers[0].self_attn.q_proj
        assert type(layer.base_layer) is nn.Linear
        layer_list = [l for _, l in lk.iter_lora_layers(m)]
        for l in layer_list:
            l.unmerge(["b"])
        assert layer.merged_adapters == ["a"]
        assert type(layer.base_layer) is nn.Linear  # a is still merged into the dense copy
        torch.testing.assert_close(m(x).logits, both, rtol=1e-4, atol=1e-4)
        for l in layer_list:
            l.unmerge()
        assert isinstance(layer.base_layer, LinearNF4)
        torch.testing.assert_close(m(x).logits, both, rtol=1e-4, atol=1e-4)


def test_quantising_a_bf16_model_keeps_bf16_as_the_compute_dtype():
    # Q9: from_linear takes the weight's dtype as compute dtype; merges then stay bf16
    q = lk.quantize_model_nf4(tiny_llama().to(torch.bfloat16))
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    m = lk.get_lora_model(q, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    plain = lk.merge_and_unload(m)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def _nf4_lora(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(64, 32))
    lk.quantize_model_nf4(m)
    lk.get_lora_model(m, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights=False))
    return m.eval()


def test_a_refused_safe_merge_of_an_nf4_layer_keeps_the_quantised_base():
    """A safe merge that finds non-finite weights is refused and leaves the NF4 layer in place (not the
    dense copy made for the merge)."""
    m = _nf4_lora()
    nf4 = m.fc.base_layer
    with torch.no_grad():
        m.fc.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.fc.merge(safe=True)
    assert m.fc.base_layer is nf4 and not hasattr(m.fc, "quantized_base") and m.fc.merged_adapters == []


def test_merging_nothing_leaves_the_nf4_base_quantised():
    """A merge with nothing to merge (no such adapter, or none active) is a no-op: the base stays NF4."""
    m = _nf4_lora()
    nf4 = m.fc.base_layer
    m.fc.merge(["not_there"])
    assert m.fc.base_layer is nf4 and isinstance(m.fc.base_layer, LinearNF4)
    m.fc.active_adapters = []
    m.fc.merge()
    assert m.fc.base_layer is nf4 and not hasattr(m.fc, "quantized_base")


def test_quantising_a_quantised_model_again_leaves_its_nf4_layers_alone():
    """quantize_model_nf4 replaces plain nn.Linear layers only: an NF4 layer (an nn.Linear subclass) is
    not quantised a second time (which would round its weights twice)."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(64, 32))
    lk.quantize_model_nf4(m)
    layer = m.fc
    codes = layer.codes.clone()
    lk.quantize_model_nf4(m)
    assert m.fc is layer and torch.equal(m.fc.codes, codes)
