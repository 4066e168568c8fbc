"""DoRA: PEFT 0.21 interoperability both ways, gradients equal to PEFT's, detached norm, B·A built once."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from conftest import LAYER_CASES, TinyConvNet, Wrap, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _llama_x():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


CASES = {
    "llama_qv_mlp": (tiny_llama, _llama_x, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama_embedding": (tiny_llama, _llama_x, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2_conv1d": (tiny_gpt2, lambda: torch.randint(0, 97, (2, 9)), dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "conv2d": (TinyConvNet, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
               dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])),
}


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _perturb_magnitudes(model):
    """A fresh magnitude equals the norm (m/n = 1); move it so the test sees the rescaling."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_lorakit_loads(case, tmp_path):
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, use_dora=True, **kw)).eval()
    _perturb_magnitudes(pm)
    pm.save_pretrained(tmp_path)
    x = make_x()
    with torch.no_grad():
        expected = _out(pm, x)
    loaded = lk.load_adapter(copy.deepcopy(base), tmp_path)
    assert any("lora_magnitude_vector" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), expected, rtol=1e-5, atol=1e-5)
        # Merging gives the same model too.
        torch.testing.assert_close(_out(lk.merge_and_unload(loaded), x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_saves_peft_loads(case, tmp_path):
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    m = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(init_lora_weights=False, use_dora=True, **kw))
    _perturb_magnitudes(m)
    lk.save_adapter(m, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    x = make_x()
    with torch.no_grad():
        expected = _out(m, x)
        assert (expected - _out(base, x)).abs().max() > 1e-4
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(pm, x), expected, rtol=1e-5, atol=1e-5)


def test_disk_keys_and_shapes(tmp_path):
    m = lk.get_lora_model(TinyConvNet(), lk.LoraConfig(r=2, target_modules=["conv1", "head"], use_dora=True))
    lk.save_adapter(m, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.conv1.lora_magnitude_vector"] == (1, 8, 1, 1)
    assert shapes["base_model.model.head.lora_magnitude_vector"] == (5,)


@pytest.mark.parametrize("case", ["llama_qv_mlp", "gpt2_conv1d", "conv2d", "llama_embedding"])
def test_gradients_match_peft(case):
    """Same weights, same loss => same gradients on A, B and m (so the norm is detached as in §4.3)."""
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    base = make().eval()  # model dropout off (GPT-2 has some); autograd still runs
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, use_dora=True, **kw))
    _perturb_magnitudes(pm)
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(init_lora_weights=False, use_dora=True, **kw))
    theirs = {k.replace(".default", "").replace(".weight", "").replace("lora_embedding_", "lora_"): p
              for k, p in pm.named_parameters() if p.requires_grad}
    mine = {k.replace(".default", "").replace(".weight", ""): p for k, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == {k.replace("base_model.model.", "") for k in theirs}
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(theirs["base_model.model." + k].reshape(p.shape))
    x = make_x()
    _out(pm, x).square().mean().backward()
    _out(ours, x).square().mean().backward()
    for k, p in mine.items():
        torch.testing.assert_close(p.grad, theirs["base_model.model." + k].grad.reshape(p.shape), rtol=1e-4, atol=1e-6)


def test_norm_is_detached_and_delta_built_once(monkeypatch):
    make_layer, make_input = LAYER_CASES["linear"]
    torch.manual_seed(0)
    model = lk.get_lora_model(Wrap(make_layer()), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["layer"], use_dora=True, init_lora_weights=False))
    layer = model.layer
    calls = []
    original = type(layer).delta_from

    def counting(self, A, B):
        calls.append(torch.is_grad_enabled())
        return original(self, A, B)

    monkeypatch.setattr(type(layer), "delta_from", counting)
    out = model(make_input())
    assert calls == [False]  # once per forward, outside autograd
    out.sum().backward()
    # With the norm a constant, the B gradient only flows through the branch: dL/dB = (m/n)·s·Σ (A x)ᵀ.
    assert layer.lora_B["default"].grad is not None and layer.lora_magnitude_vector["default"].grad is not None


def test_fresh_dora_equals_plain_lora_output():
    make_layer, make_input = LAYER_CASES["conv2d"]
    torch.manual_seed(0)
    base = Wrap(make_layer())
    x = make_input()
    outs = []
    for use_dora in (False, True):
        torch.manual_seed(1)
        m = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False, use_dora=use_dora))
        outs.append(m(x))
    # At init m = ‖W + sBA‖_c, so DoRA's output is exactly LoRA's.
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_unbatched_input_keeps_its_shape(bias):
    """nn.Conv2d takes a (C, H, W) input; DoRA's (1, out, 1, 1) magnitude broadcast it to (1, out, H, W)
    (and backward with a gradient of the right shape failed)."""
    torch.manual_seed(0)
    model = lk.get_lora_model(Wrap(torch.nn.Conv2d(3, 4, 3, padding=1, bias=bias).double()),
                              lk.LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], use_dora=True, init_lora_weights=False))
    _perturb_magnitudes(model)
    m = model.layer.lora_magnitude_vector["default"]
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    out = model(x)
    assert out.shape == (4, 5, 6)
    torch.testing.assert_close(out, model(x[None])[0], rtol=0, atol=1e-12)
    g = torch.randn(4, 5, 6, dtype=torch.float64)
    got, = torch.autograd.grad(out, [m], g)
    ref, = torch.autograd.grad(model(x[None])[0], [m], g)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
@pytest.mark.parametrize("case", ["llama_qv_mlp", "gpt2_conv1d", "conv2d"])
def test_merge_with_another_adapter_on_the_layer_keeps_the_output(case, order):
    """A DoRA adapter's merge takes its column norm of the weight the forward sees, not of a weight
    that already holds the adapters merged before it in the same merge (as PEFT does)."""
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    lk.get_lora_model(model, lk.LoraConfig(init_lora_weights=False, **kw), adapter_name="a")
    lk.get_lora_model(model, lk.LoraConfig(init_lora_weights=False, use_dora=True, **kw), adapter_name="b")
    with torch.no_grad():  # a magnitude away from the norm, so that DoRA's scale matters
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.3)
    lk.set_adapter(model, order)
    x = make_x()
    unmerged = _out(model, x)
    lk.merge(model)
    torch.testing.assert_close(_out(model, x), unmerged, rtol=1e-5, atol=1e-5)
    lk.unmerge(model)
    torch.testing.assert_close(_out(model, x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(lk.merge_and_unload(model), x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [("dora", "plain"), ("plain", "dora")])
@pytest.mark.parametrize("remove", ["dora", "plain"])
def test_taking_one_merged_adapter_out_next_to_a_merged_dora_restores_the_rest(order, remove):
    """DoRA's merge rescales the whole weight, so merges stop commuting: removing one adapter from
    the middle must undo the later merges first (PEFT unmerges newest first)."""
    import lorakit as lk
    from conftest import tiny_llama

    torch.manual_seed(0)
    m = tiny_llama()
    W0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lk.get_lora_model(m, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, use_dora=True), "dora")
    lk.get_lora_model(m, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "plain")
    q = m.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_magnitude_vector["dora"].mul_(1.5)
    x = torch.randint(0, 101, (2, 6))
    keep = [n for n in order if n != remove]
    lk.set_adapter(m, keep)
    with torch.no_grad():
        expected = m(x).logits  # only the kept adapter, unmerged
    lk.set_adapter(m, list(order))
    lk.merge(m)  # both, in the active order
    assert q.merged_adapters == list(order)
    lk.delete_adapter(m, remove)
    assert q.merged_adapters == keep
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, expected, rtol=1e-5, atol=1e-5)
    lk.unmerge(m)
    torch.testing.assert_close(q.base_layer.weight, W0, rtol=0, atol=1e-6)


def _plain_and_dora(order):
    torch.manual_seed(0)
    m = tiny_llama().eval()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lk.get_lora_model(m, lk.LoraConfig(**kw), adapter_name="a")
    lk.get_lora_model(m, lk.LoraConfig(use_dora=True, **kw), adapter_name="d")
    _perturb_magnitudes(m)
    lk.set_adapter(m, list(order))
    return m


def _unmerged_output(order, x):
    """What the model computes with ``order`` active and nothing merged (a fresh copy)."""
    with torch.no_grad():
        return _plain_and_dora(order)(x).logits


def test_merging_next_to_an_unmerged_active_dora_adapter_is_refused_and_changes_nothing():
    """DoRA rescales what the adapters before it add and reads the base weight for its column norm:
    merging some adapters but not in the forward's order would change the output (an audit found
    5.6e-2; PEFT does it silently)."""
    m, x = _plain_and_dora(["a", "d"]), _llama_x()
    with torch.no_grad():
        before = m(x).logits
    for names in (["a"], ["d"]):  # a before the DoRA adapter; the DoRA adapter alone, after a
        with pytest.raises(ValueError, match=r"DoRA adapter is involved, would change the output.*unchanged"):
            lk.merge(m, names)
    assert all(not layer.merged_adapters for _, layer in lk.inject.iter_lora_layers(m))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, before, rtol=0, atol=0)
    m, x = _plain_and_dora(["d", "a"]), _llama_x()  # DoRA applied first: merging it alone is exact
    with torch.no_grad():
        before = m(x).logits
        lk.merge(m, ["d"])
        torch.testing.assert_close(m(x).logits, before, rtol=1e-5, atol=1e-5)


def test_merge_folds_named_adapters_in_the_active_order():
    """merge(names) follows the order the forward applies the adapters, not the order of the names
    (with DoRA the two differ: 1.6e-2 before)."""
    m, x = _plain_and_dora(["a", "d"]), _llama_x()
    with torch.no_grad():
        unmerged = m(x).logits
        lk.merge(m, ["d", "a"])
        torch.testing.assert_close(m(x).logits, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first, then", [(["a", "d"], ["d", "a"]), (["a"], ["a", "d"]), (["d", "a"], ["a", "d"])])
def test_set_adapter_keeps_merged_weights_true_to_the_new_order(first, then):
    """After a merge, a new active order (or a DoRA adapter joining unmerged) must compute what the
    unmerged adapters in that order compute: the layer unmerges where the merged weights would not."""
    m, x = _plain_and_dora(first), _llama_x()
    lk.merge(m)
    lk.set_adapter(m, then)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, _unmerged_output(then, x), rtol=1e-5, atol=1e-5)


def _three_on_one_linear(first_dora):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16)).double()
    for n, dora in (("d1", first_dora), ("p", False), ("d2", True), ("q", False)):
        lk.get_lora_model(m, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=dora,
                                           init_lora_weights=False), n)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer = m[0]
        for n in ("d1", "p", "d2", "q"):
            layer.lora_A[n].copy_(torch.randn(layer.lora_A[n].shape, generator=g, dtype=torch.float64) * .5)
            layer.lora_B[n].copy_(torch.randn(layer.lora_B[n].shape, generator=g, dtype=torch.float64) * .5)
            if n in layer.variants:
                layer.lora_magnitude_vector[n].mul_(1 + .3 * torch.randn(16, generator=g, dtype=torch.float64))
    return m.eval()


@pytest.mark.parametrize("first_dora", [True, False])
@pytest.mark.parametrize("how", ["set_adapter", "delete_adapter"])
def test_taking_out_an_adapter_merged_before_a_dora_one_merges_the_rest_back_from_their_start(first_dora, how):
    # [d1, p, d2] merged in one merge, then q in a second; taking p out undoes the merges from d1 on
    # and merges d1, d2 back: d2's column norm must come from the weight before that first merge, as
    # in the unmerged forward (it came from the weight holding d1: 0.08 to 0.54 relative off)
    x = torch.randn(4, 16, dtype=torch.float64)
    m = _three_on_one_linear(first_dora)
    W0 = m[0].base_layer.weight.detach().clone()
    lk.set_adapter(m, ["d1", "d2", "q"])
    with torch.no_grad():
        expected = m(x)  # unmerged
    lk.set_adapter(m, ["d1", "p", "d2", "q"])
    lk.merge(m, ["d1", "p", "d2"])
    lk.merge(m, ["q"])
    if how == "set_adapter":
        lk.set_adapter(m, ["d1", "d2", "q"])
    else:
        lk.delete_adapter(m, "p")
    assert m[0].merged_adapters == ["d1", "d2", "q"]
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-13, atol=1e-13)
    lk.unmerge(m)
    torch.testing.assert_close(m[0].base_layer.weight, W0, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-13, atol=1e-13)


def test_dora_on_a_bf16_base_saves_no_wider_copy_of_the_base_output():
    """fp32 magnitudes on a bf16 base: (m/n − 1)·Wx keeps Wx for dL/dm as the bf16 tensor it is, as
    PEFT does (a performance audit: an fp32 copy per layer, 1.14x PEFT's saved bytes), and computes
    the very same update."""
    torch.manual_seed(0)
    base = Wrap(torch.nn.Linear(64, 48)).to(torch.bfloat16)
    cfg = dict(r=4, lora_alpha=8, target_modules=["layer"], use_dora=True, init_lora_weights=False)
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**cfg)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).train()
    peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours))
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16)

    def saved(model):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
            return t

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        return out, {k: v for k, v in kept.items() if k not in params}

    got, ours_saved = saved(ours)
    want, theirs_saved = saved(theirs)
    def wide_outputs(kept):  # fp32 (tokens, out) tensors: the branch's product in both libraries
        return sum(1 for _, dtype, shape in kept.values() if dtype == torch.float32 and shape == (4, 32, 48))

    assert wide_outputs(ours_saved) <= wide_outputs(theirs_saved)
    assert sum(n for n, _, _ in ours_saved.values()) <= sum(n for n, _, _ in theirs_saved.values())
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_dora_output_on_a_bf16_base_stays_bf16():
    """The DoRA update is summed in fp32 and rounded once into the base output's dtype: a bf16
    layer must still return bf16 (the bug this catches: add_rounded_once without the cast back)."""
    torch.manual_seed(0)
    m = Wrap(nn.Linear(16, 12)).to(torch.bfloat16)
    lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["layer"], use_dora=True,
                                       init_lora_weights=False))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert m(x).dtype == torch.bfloat16


def test_dora_on_a_conv2d_of_two_groups_is_refused():
    """Any grouped Conv2d (groups > 1), not only groups=4, has no ΔW in the weight's layout."""
    m = Wrap(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"DoRA.*groups=2"):
        lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["layer"], use_dora=True))


def test_dora_dropout_in_training_drops_the_branch_and_the_rescaled_base_term():
    """Training with lora_dropout: y = W x + b + (m/n − 1)·W·drop(x) + (m/n)·s·B A drop(x) (as PEFT),
    checked against a float64 reference built with the same dropout draw."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    m = Wrap(lin)
    lk.get_lora_model(m, lk.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["layer"],
                                       use_dora=True, init_lora_weights=False))
    layer = m.layer
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)  # m/n = 1.5, away from 1
    m.train()
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.manual_seed(7)
    got = m(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draw nn.Dropout makes
    W, b = lin.weight.detach(), lin.bias.detach()
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    s = layer.scaling["default"]
    mag = layer.lora_magnitude_vector["default"].detach()
    scale = mag / torch.linalg.vector_norm(W + s * B @ A, dim=1)
    want = x @ W.T + b + (scale - 1) * (xd @ W.T) + scale * s * (xd @ A.T @ B.T)
    assert not torch.equal(xd, x)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


def _dora_embedding_and_linear():
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(model):
            for store in (layer.lora_A, layer.lora_B):
                store["default"].copy_(torch.randn(store["default"].shape, generator=g) * 0.1)
    return model.eval()


def _counting_norms(monkeypatch) -> list:
    """A list that grows by one at every ΔW a LoRA layer forms (DoRA's norm forms one per forward)."""
    from lorakit.layers.base import LoraLayer

    calls = []
    real = LoraLayer.delta_weight
    monkeypatch.setattr(LoraLayer, "delta_weight", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return calls


def test_dora_caching_reuses_the_norm_while_nothing_changes_and_gives_the_same_outputs(monkeypatch):
    model = _dora_embedding_and_linear()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    calls = _counting_norms(monkeypatch)
    with lk.dora_caching(), torch.no_grad():
        first = model(ids).logits
        formed = len(calls)
        second = model(ids).logits
    assert formed == 3 and len(calls) == formed  # (embed_tokens and two q_proj: formed once, then reused)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    with torch.no_grad():
        model(ids)
    assert len(calls) == 2 * formed  # (outside the block: formed at every forward, as before)


@pytest.mark.parametrize("change", ["B in place", "B replaced", "base weight in place", "scaling", "training mode",
                                    "model cast", "B's .data reassigned", "autocast"])
def test_dora_caching_sees_every_change_but_a_data_edit(change):
    # a cast, a .data reassignment and autocast keep the tensors and their versions: a review
    # (/tmp/review21) found their stale norms reused (2.9e-3 off after .to(bfloat16))
    model = _dora_embedding_and_linear()
    ids = torch.randint(3, 100, (2, 6))
    q = model.model.layers[0].self_attn.q_proj
    with lk.dora_caching(), torch.no_grad():
        if change == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(ids)
        else:
            model(ids)
        if change == "model cast":
            model.double()
        elif change == "B's .data reassigned":
            q.lora_B["default"].data = q.lora_B["default"].data * 2
        elif change == "B in place":
            q.lora_B["default"].mul_(2)
        elif change == "B replaced":
            q.lora_B["default"] = torch.nn.Parameter(q.lora_B["default"] * 2)
        elif change == "base weight in place":
            q.base_layer.weight.mul_(1.5)
        elif change == "scaling":
            q.scaling["default"] *= 2
        elif change == "training mode":  # (no cache there: even an edit through .data, which no version counter sees)
            model.train()
            model(ids)
            q.lora_B["default"].data.mul_(2)
        got = model(ids).logits
    with torch.no_grad():
        assert torch.equal(got, model(ids).logits)  # (as computed without the cache)


def test_dora_caching_never_hands_a_norm_made_in_inference_mode_to_a_forward_with_gradients():
    # (it raised "Inference tensors cannot be saved for backward": a review, /tmp/review21)
    model = _dora_embedding_and_linear()
    ids = torch.randint(3, 100, (2, 6))
    with lk.dora_caching():
        with torch.inference_mode():
            model(ids)
        loss = model(ids, labels=ids).loss
        loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].grad is not None and q.lora_B["default"].grad.abs().sum() > 0
    # outside the block a layer's first forward drops what it kept
    with torch.no_grad():
        model(ids)
    assert all(v._norm_cache is None for _, layer in lk.iter_lora_layers(model) for v in layer.variants.values())


def test_a_model_with_a_dora_norm_kept_copies_and_pickles():
    import pickle

    model = _dora_embedding_and_linear()
    ids = torch.randint(3, 100, (2, 6))
    with lk.dora_caching(), torch.no_grad():
        expected = model(ids).logits
        twin = copy.deepcopy(model)
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(twin(ids).logits, expected) and torch.equal(again(ids).logits, expected)
