"""Unmerging subtracts the update computed from the adapter as it is now. If its tensors or scaling
changed after the merge, that is another update than the merge added: every unmerging operation
refuses then, with the model unchanged, instead of leaving wrong base weights (PEFT 0.21.2 does the
subtraction silently)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import tiny_llama
from lorakit.inject import iter_lora_layers
from lorakit.layers.guard import bits_fingerprint, bits_fingerprints, cast_print, same_up_to_cast

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _model(dora: bool = False, names=("a",)):
    torch.manual_seed(0)
    m = tiny_llama().eval()
    for name in names:
        cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                            use_dora=dora and name == names[-1])
        lk.get_lora_model(m, cfg, adapter_name=name)
    lk.set_adapter(m, list(names))
    return m


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _x():
    return torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def _edit_b(m, name="a"):
    layer = m.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B[name].mul_(2.0)
    return layer


def _fingerprint_by_hand(t: torch.Tensor) -> int:
    """The fingerprint's definition in Python integers: Σ bitsᵢ · ((i · 2654435761) | 1), wrapped to int64."""
    flat = t.reshape(-1)
    if flat.is_floating_point():
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    mask = (1 << 64) - 1
    total = sum(int(v) * (((i * 2654435761) & mask) | 1) for i, v in enumerate(flat.tolist())) & mask
    return total - (1 << 64) if total >= 1 << 63 else total


def test_fingerprints_of_several_tensors_at_once_are_each_ones_own():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, generator=g) * 1e3
    group = [t, t.to(torch.bfloat16), t.half(), t.to(torch.bfloat16).half(), t.double(),
             torch.randint(-9, 9, (37,), generator=g), t.half().to(torch.bfloat16)]
    expected = [_fingerprint_by_hand(x) for x in group]
    assert bits_fingerprints(group) == expected == [bits_fingerprint(x) for x in group]
    assert bits_fingerprints([]) == []
    # over the 2^20-entry chunks: as one sum (chunked, wrapped) gives, the 16-bit pair in one stack
    big = torch.randn(2 ** 20 + 3, generator=g)
    pair = [big.to(torch.bfloat16), big.half()]
    got = bits_fingerprints(pair)
    for x, f in zip(pair, got):
        bits = x.view(torch.int16).to(torch.int64)
        weights = (torch.arange(bits.numel(), dtype=torch.int64) * 2654435761).bitwise_or_(1)
        assert f == int((bits * weights).sum())  # (int64 sums wrap as the definition's modulo does)


def test_one_tensors_fingerprint_wraps_to_int64_within_a_chunk_as_the_definition_does():
    """bits_fingerprint of one CPU tensor of up to a chunk is an int64 dot product: its overflow wraps
    as the definition's modulo; integer, boolean and non-contiguous tensors, empty ones too."""
    big = torch.tensor([2 ** 63 - 1, -2 ** 63, 2 ** 62 + 5, -7], dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    cases = [big, big.flip(0), torch.tensor([True, False, True]), torch.randint(0, 255, (9,), generator=g).to(torch.uint8),
             torch.randn(6, 4, generator=g).t(), torch.randn(5, generator=g).double() * 1e300, torch.zeros(0)]
    for t in cases:
        assert bits_fingerprint(t) == _fingerprint_by_hand(t) == bits_fingerprints([t, t.clone()])[0], t


def test_fingerprint_over_chunks_wraps_to_int64():
    """The chunks' sums, added in Python, wrap as one int64 sum does (an overflow across chunks)."""
    t = torch.zeros(2 ** 20 + 1, dtype=torch.int64)
    t[0], t[-1] = 2 ** 63 - 1, 1  # weights 1 and (2^20 · 2654435761) | 1
    total = (2 ** 63 - 1) + ((2 ** 20 * 2654435761) | 1)
    assert bits_fingerprint(t) == (total + 2 ** 63) % 2 ** 64 - 2 ** 63


def test_fingerprint_sees_any_bit_and_order_change_and_equal_copies_agree():
    t = torch.randn(5, 7)
    f = bits_fingerprint(t)
    assert bits_fingerprint(t.clone()) == f == bits_fingerprint(copy.deepcopy(t))
    flipped = t.clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # one bit of one element
    assert bits_fingerprint(flipped) != f
    assert bits_fingerprint(t.flip(0)) != f  # same values, other order
    assert bits_fingerprint(t.t()) != f
    assert bits_fingerprint(t.to(torch.bfloat16)) != bits_fingerprint(t.to(torch.bfloat16).neg())


@pytest.mark.parametrize("op", ["unmerge", "unload", "disable", "set_adapter", "delete_adapter"])
def test_every_unmerging_operation_refuses_an_adapter_changed_while_merged(op):
    m = _model(names=("a", "b"))
    lk.merge(m, ["a"])
    _edit_b(m)
    before = _weights(m)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['a'\] changed .*after being merged.*the model is unchanged"):
        if op == "unmerge":
            lk.unmerge(m)
        elif op == "unload":
            lk.unload(m)
        elif op == "disable":
            with lk.disable_adapters(m):
                pass
        elif op == "set_adapter":
            lk.set_adapter(m, "b")
        else:
            lk.delete_adapter(m, "a")
    _assert_same(m, before)  # no layer was unmerged, the merged state is as it was
    assert lk.active_adapters(m) == ["a", "b"]
    assert all(layer.merged_adapters == ["a"] for _, layer in iter_lora_layers(m) if "a" in layer.lora_A)


def test_put_back_the_unmerge_restores_the_base_and_a_layer_refuses_on_its_own():
    m = _model()
    w0 = {k: v.clone() for k, v in _weights(m).items() if "base_layer" in k}
    lk.merge(m)
    layer = _edit_b(m)
    with pytest.raises(ValueError, match="the layer is unchanged"):
        layer.unmerge()
    assert layer.merged_adapters == ["a"]
    with torch.no_grad():
        layer.lora_B["a"].div_(2.0)  # exactly back (a power of two)
    lk.unmerge(m)
    after = m.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in w0.items()) <= 1e-6


def test_a_changed_scaling_is_refused_too():
    m = _model()
    lk.merge(m)
    layer = m.model.layers[1].mlp.down_proj
    layer.scaling["a"] *= 3
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)


def test_a_changed_dora_magnitude_is_refused():
    m = _model(dora=True, names=("d",))
    lk.merge(m)
    with torch.no_grad():
        m.model.layers[0].self_attn.v_proj.lora_magnitude_vector["d"].add_(0.5)
    before = _weights(m)
    with pytest.raises(ValueError, match=r"\['d'\] changed"):
        lk.unmerge(m)
    _assert_same(m, before)


def test_unchanged_adapters_still_unmerge_after_a_deepcopy_and_after_a_cast():
    m = _model(names=("a", "b"))
    x = _x()
    with torch.no_grad():
        unmerged = m(x).logits
    lk.merge(m)
    copied = copy.deepcopy(m)
    lk.unmerge(copied)  # equal bits in the copy: allowed
    with torch.no_grad():
        torch.testing.assert_close(copied(x).logits, unmerged, rtol=1e-5, atol=1e-5)
    m.to(torch.float64)  # a cast changes the bits, not the update: allowed
    lk.unmerge(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, unmerged.double(), rtol=1e-5, atol=1e-5)


def test_other_adapters_changed_while_one_is_merged_do_not_block():
    m = _model(names=("a", "b"))
    lk.merge(m, ["a"])
    _edit_b(m, "b")  # b is not merged: editing it is ordinary training
    lk.set_adapter(m, "a")  # a stays merged and active: nothing to unmerge
    lk.delete_adapter(m, "b")
    lk.unmerge(m)
    assert all(not layer.merged_adapters for _, layer in iter_lora_layers(m))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
def test_fingerprint_leaves_the_tensor_as_it_was(dtype):
    t = (torch.randn(6, 5) * 100).to(dtype)
    before = t.clone()
    bits_fingerprint(t)
    assert torch.equal(t, before)


def _snapshot(model):
    from lorakit.inject import get_state

    state = get_state(model)
    return (list(state.configs), list(state.active),
            [(list(layer.lora_A), list(layer.active_adapters), list(layer.merged_adapters))
             for _, layer in iter_lora_layers(model)],
            {k: v.clone() for k, v in model.state_dict().items()})


def _same(a, b):
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(v, b[3][k]) for k, v in a[3].items())


def test_refusals_that_say_the_model_is_unchanged_leave_it_unchanged():
    # delete_adapter removed the adapter, then its set_adapter refused a stale merge: "unchanged";
    # set_adapter set the new active list, then a DoRA adapter after a changed merged one refused
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    for n, t in [("a", "0"), ("b", "1"), ("c", "0")]:
        lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=[t], init_lora_weights=False), n)
    lk.merge(m, ["b"])
    with torch.no_grad():
        m[1].lora_A["b"].add_(0.1)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="the model is unchanged"):
        lk.delete_adapter(m, "c")
    assert _same(_snapshot(m), before)

    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False), "a")
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["1"], use_dora=True, init_lora_weights=False), "d")
    lk.merge(m, ["a"])
    with torch.no_grad():
        m[1].lora_B["a"].mul_(1.5)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="the model is unchanged"):
        lk.set_adapter(m, ["a", "d"])
    assert _same(_snapshot(m), before)


@pytest.mark.parametrize("edit_first", [True, False])
@pytest.mark.parametrize("cast", ["half", "double"])
def test_an_edit_with_a_cast_is_refused(edit_first, cast):
    """A change of dtype let every check through: an edit of a merged adapter before or after a cast
    was subtracted as it was then (the base left 0.042 off)."""
    m = _model()
    lk.merge(m)
    layer = m.model.layers[0].self_attn.q_proj

    def edit():
        with torch.no_grad():
            layer.lora_B["a"].mul_(2)

    if edit_first:
        edit()
    getattr(m, cast)()
    if not edit_first:
        edit()
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)


@pytest.mark.parametrize("chain", [("half", "bfloat16", "float"), ("bfloat16", "half", "float"), ("float", "double")])
def test_round_trips_through_narrower_dtypes_still_unmerge(chain):
    m = _model()
    base = {n: p.detach().double().clone() for n, p in m.named_parameters() if "lora_" not in n}
    lk.merge(m)
    for cast in chain:
        getattr(m, cast)()
    lk.unmerge(m)
    for n, p in m.named_parameters():
        if n in base:
            torch.testing.assert_close(p.detach().double(), base[n], rtol=0, atol=2e-2)  # the casts' rounding


def test_fingerprint_sees_a_change_of_the_first_element():
    """Position 0 weighs in too (the bug this catches: the weights' `| 1` dropped, so element 0 counted 0 times)."""
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    edited = t.clone()
    edited[0, 0] += 1.0
    assert bits_fingerprint(edited) != bits_fingerprint(t)


def test_an_edit_of_a_merged_adapter_s_first_entry_is_refused():
    torch.manual_seed(0)
    m = tiny_llama().eval()
    lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    lk.merge(m)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B["default"][0, 0] += 0.5
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)


def test_fingerprint_sees_chunks_trading_places():
    """Positions count across the 2^20-entry chunks (the bug this catches: each chunk weighted from 0 again)."""
    n = 1 << 20
    t = torch.randn(2 * n, generator=torch.Generator().manual_seed(0))
    swapped = torch.cat([t[n:], t[:n]])
    assert bits_fingerprint(swapped) != bits_fingerprint(t)


def test_a_bf16_tensor_cast_to_float16_is_the_same_up_to_cast():
    """bf16 -> fp16 (``model.half()`` of a bf16 model) is a cast to a dtype of the same width that
    rounds: still the same tensor (the bug this catches: only strictly narrower dtypes kept in the print).
    The values include ones fp16 cannot hold exactly (subnormal there), so the cast is lossy."""
    t = torch.tensor([1e-6, 3e-7, 0.1, -2.5, 123.0], dtype=torch.bfloat16)
    assert not torch.equal(t.half().to(torch.bfloat16), t)  # lossy on purpose
    assert same_up_to_cast(cast_print(t), t.half())
    assert not same_up_to_cast(cast_print(t), (t.half() * 2))


def test_a_widened_tensor_edited_below_the_old_precision_is_a_change():
    """fp32 -> fp64, then an edit too small to survive rounding back to fp32: a change, not a cast
    (the bug this catches: the widened values were only compared after rounding back)."""
    t = torch.randn(16, generator=torch.Generator().manual_seed(1))
    wide = t.double()
    assert same_up_to_cast(cast_print(t), wide)
    edited = wide + wide.abs() * 1e-12
    assert torch.equal(edited.float(), t) and not torch.equal(edited, wide)
    assert not same_up_to_cast(cast_print(t), edited)


def _fc_with(specs: dict[str, dict]) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(6, 5).double())
    for name, kw in specs.items():
        lk.get_lora_model(m, lk.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["fc"],
                                              "init_lora_weights": False, **kw}), adapter_name=name)
    with torch.no_grad():  # DoRA magnitudes away from the weight's norms, so order matters
        for store in (m.fc.__dict__.get("_modules", {}).get("lora_magnitude_vector") or {}).values():
            store.mul_(1.5)
    return m.eval()


def test_a_layer_level_safe_merge_refuses_non_finite_weights_and_keeps_the_layer():
    m = _fc_with({"default": {}})
    with torch.no_grad():
        m.fc.lora_B["default"][0, 0] = float("inf")
    before = m.fc.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        m.fc.merge(safe=True)
    assert torch.equal(m.fc.base_layer.weight, before) and m.fc.merged_adapters == []


def test_unmerging_a_plain_adapter_merged_before_two_separate_dora_merges_redoes_them_separately():
    """merge(a); merge(d1); merge(d2), then unmerge(a): d1 and d2 go back in as the two merges they were
    (d2 reading the weight with d1 folded in), giving the weight of merge(d1); merge(d2) without a."""
    m = _fc_with({"a": {}, "d1": {"use_dora": True}, "d2": {"use_dora": True}})
    ref = copy.deepcopy(m)
    m.fc.merge(["a"])
    m.fc.merge(["d1"])
    m.fc.merge(["d2"])
    m.fc.unmerge(["a"])
    ref.fc.merge(["d1"])
    ref.fc.merge(["d2"])
    assert m.fc.merged_adapters == ["d1", "d2"]
    torch.testing.assert_close(m.fc.base_layer.weight, ref.fc.base_layer.weight, rtol=1e-12, atol=1e-12)
    one_merge = copy.deepcopy(ref)
    one_merge.fc.unmerge()
    one_merge.fc.merge(["d1", "d2"])
    assert (one_merge.fc.base_layer.weight - ref.fc.base_layer.weight).abs().max() > 1e-6  # the order is visible


def test_float8_weights_are_refused_by_name_both_ways():
    # a merge into float8 weights raised torch's "Promotion for Float8 Types is not supported"; an
    # unmerge after the cast said the adapter had changed since the merge (only the cast had)
    torch.manual_seed(0)
    m = lk.get_lora_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                          lk.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    cast = copy.deepcopy(m).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"cannot merge \['default'\]: .*float8_e4m3fn.*keep the adapter unmerged"):
        lk.merge(cast)
    assert not cast[0].merged_adapters
    lk.merge(m)
    m.to(torch.float8_e4m3fn)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot unmerge \['default'\]: .*float8_e4m3fn.*keep the adapter merged"):
        lk.unmerge(m)
    assert m[0].merged_adapters == ["default"]
    assert all(torch.equal(v.view(torch.uint8), state[k].view(torch.uint8)) for k, v in m.state_dict().items())


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


def test_deleting_an_unmerged_adapter_beside_a_merged_one_on_a_now_computed_weight():  # B05
    """Only the adapters an operation takes out are checked for a computed weight: deleting one
    that was never merged subtracts nothing and is let through."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    cfg = lk.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    m = lk.get_lora_model(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6)), cfg)
    lk.get_lora_model(m, cfg, adapter_name="other")
    lk.set_adapter(m, "default")
    lk.merge(m)
    for i in (0, 2):
        parametrizations.weight_norm(m[i].base_layer)  # (after the merge: the weight is computed now)
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = m(x)
    lk.delete_adapter(m, "other")
    assert list(lk.inject.require_state(m).configs) == ["default"] and m[0].merged_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(m(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, None), (torch.float64, None), (torch.bfloat16, None),
                                                  (torch.float16, None), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_a_merge_in_place_writes_the_bits_of_the_merge_into_a_copy(dtype, adapter_dtype):
    """One plain adapter merges into a floating-point weight in place (``W += ΔW``); with
    ``safe=True`` the weight is computed into a copy, checked, and written: the same bits, and an
    unmerge in place gives the copy path's bits too (also a float32 adapter on a 16-bit base, as
    ``lorakit train`` keeps it on a bf16 one: the add computes in float32 and rounds once)."""
    import copy

    import lorakit as lk

    model = tiny_llama().to(dtype)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    if adapter_dtype is not None:
        for _, layer in lk.iter_lora_layers(model):
            layer.lora_A.to(adapter_dtype)
            layer.lora_B.to(adapter_dtype)
    twin = copy.deepcopy(model)
    lk.merge(model)
    lk.merge(twin, safe=True)
    for (_, a), (_, b) in zip(lk.iter_lora_layers(model), lk.iter_lora_layers(twin)):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight)
        expected = (b.base_layer.weight.to(torch.promote_types(dtype, torch.float32)) - b.delta_weight("default")).to(dtype)
        a.unmerge()
        assert torch.equal(a.base_layer.weight, expected)


def test_merge_and_unload_takes_no_fingerprints_and_gives_merge_s_weights(monkeypatch):
    """merge_and_unload removes the layers, so nothing ever unmerges: it skips the merge stamps
    (about half its time), and its weights are those lk.merge writes, bit for bit."""
    from lorakit.layers.base import LoraLayer

    stamped = []
    real = LoraLayer.merge_stamp
    monkeypatch.setattr(LoraLayer, "merge_stamp", lambda self, name: stamped.append(name) or real(self, name))
    merged = lk.merge(_model(names=("a", "b")))
    layers = sum(1 for _ in iter_lora_layers(merged))
    assert len(stamped) == 2 * layers  # (lk.merge stamps each adapter it folds in)
    stamped.clear()
    plain = lk.merge_and_unload(_model(names=("a", "b")))
    assert stamped == []
    for _, layer in iter_lora_layers(merged):
        layer.merged_adapters.clear()  # (strip the layers without unmerging: the merged weights as written)
    expect = lk.unload(merged).state_dict()
    got = plain.state_dict()
    assert got.keys() == expect.keys()
    for k in expect:
        assert torch.equal(got[k], expect[k]), k


def test_a_layer_merged_without_a_stamp_unmerges_without_the_check():
    m = _model()
    layer = m.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    layer.merge(stamp=False)
    assert layer.merged_adapters == ["a"] and "a" not in layer.merge_stamps
    _edit_b(m)  # (with a stamp this unmerge is refused: test_put_back_the_unmerge_...)
    layer.unmerge()
    assert not torch.allclose(layer.base_layer.weight, before)  # subtracted the edited update


def test_a_merge_stamp_takes_the_casts_fingerprints_only_when_a_cast_comes():
    """A merge keeps the bits' fingerprint alone (one pass per tensor); a module cast (``_apply``)
    adds the casts' first, from the tensors as merged, so a cast of the model still unmerges, and
    a cast of the copy of a merged model takes them from the copy."""
    m = _model()
    lk.merge(m)
    layer = m.model.layers[0].self_attn.q_proj
    prints = layer.merge_stamps["a"][1]
    assert prints and all(p[2] is None for p in prints)
    twin = copy.deepcopy(m)
    m.half()
    assert all(p[2] for p in m.model.layers[0].self_attn.q_proj.merge_stamps["a"][1])
    assert all(p[2] is None for p in twin.model.layers[0].self_attn.q_proj.merge_stamps["a"][1])
    lk.unmerge(m)
    twin.bfloat16()
    lk.unmerge(twin)
    assert not any(layer.merged_adapters for _, layer in iter_lora_layers(twin))


def test_a_narrowing_cast_that_bypasses_the_module_is_refused():
    """Rounding an adapter by hand (``.data`` of another dtype, no module cast) left no casts'
    fingerprints to recognise it by: the unmerge refuses, as for any change, with the model as it was."""
    m = _model()
    lk.merge(m)
    layer = m.model.layers[0].self_attn.q_proj
    layer.lora_B["a"].data = layer.lora_B["a"].data.half()
    before = _weights(m)
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)
    _assert_same(m, before)


def test_a_cast_after_an_edit_leaves_the_stamp_without_chains():
    m = _model()
    lk.merge(m)
    layer = m.model.layers[0].self_attn.q_proj
    _edit_b(m)
    m.double()  # (B was edited first: no casts' fingerprints are taken from it; A's are)
    a_print, b_print = layer.merge_stamps["a"][1]
    assert a_print[2] and b_print[2] is None
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)


def test_model_level_unmerge_checks_each_layer_once(monkeypatch):
    from lorakit.layers.base import LoraLayer

    m = _model(names=("a", "b"))
    lk.merge(m)
    calls = []
    real = LoraLayer.unmerge_blocker
    monkeypatch.setattr(LoraLayer, "unmerge_blocker", lambda self, names=None: calls.append(self) or real(self, names))
    lk.unmerge(m)
    layers = [layer for _, layer in iter_lora_layers(m)]
    assert len(calls) == len(layers) and {id(c) for c in calls} == {id(layer) for layer in layers}
    assert not any(layer.merged_adapters for layer in layers)
