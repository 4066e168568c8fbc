"""The fused LoRA branch gives the plain path's outputs and gradients (float64), with and without dropout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import Wrap, graph_node_names
from lorakit.layers.fused import FusedLoraLinear, KeepMask, dropout_mask, fused_lora_add, pack_bits, unpack_bits


def reference(result, x, A, B, scale, drop):
    xa = x if drop is None else x * drop.get().reshape(x.shape) / drop.keep
    return result + scale * (xa @ A.T) @ B.T


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(3, 5, 10), (7, 10)])
def test_fused_matches_plain_in_float64(p, shape):
    torch.manual_seed(0)
    W = torch.randn(12, 10, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    B = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    drop = KeepMask((x.numel() // 10, 10), p, x.device) if p else None

    ref = reference(x @ W.T, x, A, B, 1.7, drop)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, A, B), g)

    out = FusedLoraLinear.apply(x @ W.T, x, A, B, 1.7, drop)
    grads = torch.autograd.grad(out, (x, A, B), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, A_, B_: FusedLoraLinear.apply(x_ @ W.T, x_, A_, B_, 1.7, drop),
                                    (x, A, B))


def test_keep_mask_survives_release_bit_for_bit_and_advances_the_global_generator():
    torch.manual_seed(1)
    drop = KeepMask((300, 70), 0.1, torch.device("cpu"))
    first = drop.get().clone()
    after_draw = torch.rand(3)
    drop.release()
    assert drop._mask is None and drop._packed[0].numel() == 300 * 70 // 8   # only the bits are kept
    assert torch.equal(drop.get(), first)                  # unpacked bit for bit
    drop.release()
    assert torch.equal(drop.get(), first)                  # again (a second backward through the graph)
    torch.manual_seed(1)
    KeepMask((300, 70), 0.1, torch.device("cpu"))
    assert torch.equal(torch.rand(3), after_draw)          # getting it back did not touch the generator
    assert abs(first.float().mean().item() - drop.keep) < 0.01
    assert drop.keep == round(0.9 * 65536) / 65536


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (5, 7), (3, 16), (2, 3, 11)])
def test_pack_bits_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for keep in (0.0, 0.3, 0.97, 1.0):
        mask = torch.rand(shape, generator=g) < keep
        packed = pack_bits(mask)
        assert packed[0].dtype == torch.uint8 and packed[0].numel() == mask.numel() // 8
        assert torch.equal(unpack_bits(packed, mask.shape), mask)
        out = torch.ones(shape, dtype=torch.bool)
        assert unpack_bits(packed, mask.shape, out=out) is out and torch.equal(out, mask)
    # a view starting mid-word packs the same; a wrong ``out`` is refused
    mask = torch.rand(50, generator=g) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask[3:]), (47,)), mask[3:])
    with pytest.raises(ValueError, match="out must be"):
        unpack_bits(pack_bits(mask), (50,), out=torch.empty(49, dtype=torch.bool))
    # bit i of byte j is element 8j + i
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 9]] = True
    assert pack_bits(mask)[0].tolist() == [0b1001, 0b10]


def test_reused_buffers_keep_each_mask_apart():
    torch.manual_seed(2)
    first = KeepMask((40, 9), 0.5, torch.device("cpu"), reuse=True)
    a = first.get().clone()
    first.release()
    second = KeepMask((40, 9), 0.5, torch.device("cpu"), reuse=True)   # drawn into the same buffer
    b = second.get().clone()
    second.release()
    assert not torch.equal(a, b)
    assert torch.equal(first.get(), a)
    first.release()
    assert torch.equal(second.get(), b)


def test_keep_mask_edge_probabilities():
    assert KeepMask((5, 7), 0.0, torch.device("cpu")).get().all()
    none = KeepMask((5, 7), 1.0, torch.device("cpu"))
    assert not none.get().any() and none.inv_keep == 0.0
    with pytest.raises(ValueError, match="dropout probability"):
        KeepMask((2, 2), 1.5, torch.device("cpu"))
    x, A, B = torch.randn(5, 7), torch.randn(2, 7), torch.randn(3, 2)
    base = torch.randn(5, 3)
    out = FusedLoraLinear.apply(base.clone(), x, A, B, 2.0, none)
    torch.testing.assert_close(out, base)                  # p = 1: the branch adds nothing


def test_fused_dropout_on_a_view_falls_back_with_the_same_statistics():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    base = torch.zeros(64, 12)[:, :6]                      # a view: the in-place path is not safe
    out = fused_lora_add(base, x, A, B, 1.0, 0.5, training=True)
    zeroed = ((x @ A.T) @ B.T - out).abs().sum(1) > 0
    assert out.shape == (64, 6) and 0 < int(zeroed.sum()) <= 64
    out.sum().backward()
    assert A.grad is not None and x.grad is not None


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


@pytest.mark.parametrize("tokens", [1, 16, 64, 300])
def test_bf16_base_inference_branch(tokens):
    # Inference on a bf16 base takes fp32 products, rounded once into the bf16 output: the result
    # equals bf16(result + s·(x Aᵀ) Bᵀ computed in fp32) to one rounding step, at any number of
    # tokens (above 32 it took bf16 products: a few bf16 roundings more, so a row's result
    # depended on how many tokens shared the call).
    torch.manual_seed(1)
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    W = torch.randn(96, 64, dtype=torch.bfloat16)
    A, B = torch.randn(8, 64), torch.randn(96, 8)
    result = x @ W.T
    exact = result.double() + 0.7 * (x.double() @ A.double().T) @ B.double().T
    with torch.no_grad():
        out = fused_lora_add(result.clone(), x, A, B, 0.7, 0.0, training=False)
    assert out.dtype == torch.bfloat16
    diff = (out.double() - exact).abs()
    err = (diff / exact.abs().clamp_min(1.0)).max().item()
    assert err <= 2.0 ** -8 * 1.01, err  # one bf16 rounding of the exact value (plus fp32 noise)
    # each row as it would come out alone: the same bits
    with torch.no_grad():
        alone = torch.cat([fused_lora_add(result[i:i + 1].clone(), x[i:i + 1], A, B, 0.7, 0.0, training=False)
                           for i in range(min(tokens, 5))])
    assert torch.equal(alone, out[:min(tokens, 5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 1, 24), (3, 40, 24), (5, 24), (24,)])
def test_lean_inference_path_is_bitwise_the_generic_path(dtype, shape):
    """LoraLinear.forward's inference path (no autograd, eval) gives exactly what the generic
    LoraLayer.forward gives, with one and with two active adapters (an adapter absent from the layer
    skipped), and the generic path still runs where gradients or training mode ask for it."""
    from torch import nn

    from lorakit.layers.base import LoraLayer
    from lorakit.layers.linear import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(24, 20).to(dtype))
    for name in ("a", "b"):
        layer.add_adapter(name, r=4, lora_alpha=8, scaling=2.0 - 0.5 * (name == "b"), init_lora_weights=False)
    layer.eval()
    x = torch.randn(*shape, dtype=dtype)
    for active in (["a"], ["a", "b"], ["b", "missing", "a"]):
        layer.active_adapters = active
        with torch.inference_mode():
            lean = layer(x)
            generic = LoraLayer.forward(layer, x)
        assert torch.equal(lean, generic)
        with torch.no_grad():  # no_grad takes the lean path too, with inference mode's very bits
            assert torch.equal(layer(x), lean)
            # the generic path may add out of place there (F.linear's output can be a view then)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(LoraLayer.forward(layer, x), lean, **tol)  # to rounding
        # a fresh reference: the base plus each adapter's product, in float64
        ref = layer.base_layer(x).double()
        for n in active:
            if n in layer.lora_A:
                ref += layer.scaling[n] * (x.double() @ layer.lora_A[n].double().T) @ layer.lora_B[n].double().T
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(lean.double(), ref, rtol=tol, atol=tol)
    # with gradients the generic (autograd) path runs and agrees (other kernels: to rounding)
    layer.active_adapters = ["a", "b"]
    out = layer(x)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), lean, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2)
    # one adapter merged, the other active unmerged (the lean path leaves the merged one out, as the
    # generic path does; it used to hand every layer with a merged adapter to the generic path)
    layer.merge(["a"])
    for active in (["a"], ["a", "b"]):
        layer.active_adapters = active
        with torch.inference_mode():
            assert torch.equal(layer(x), LoraLayer.forward(layer, x))
    layer.unmerge()
    # disabled: exactly the base layer
    layer.disabled = True
    with torch.inference_mode():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_lean_path_calls_the_base_layer_where_calling_it_does_more_than_f_linear():
    """The one-adapter inference path runs ``F.linear``'s ops on the base weight itself, skipping the
    base module's call, only where that call would do nothing else: a forward or pre-hook on the base
    layer, a global module hook, a subclass of nn.Linear, a ``forward`` replaced on the instance or a
    tensor subclass as the weight makes it call the base layer (so the hook runs, the subclass's
    forward is used, the weight's own F.linear runs); a bias-less base, a non-contiguous input and
    autocast keep the generic path's results."""
    from torch import nn

    from lorakit.layers.base import LoraLayer
    from lorakit.layers.linear import LoraLinear

    torch.manual_seed(0)

    def make(base):
        layer = LoraLinear(base)
        layer.add_adapter("a", r=4, lora_alpha=8, scaling=2.0, init_lora_weights=False)
        return layer.eval()

    x = torch.randn(6, 3, 24)
    calls = []
    layer = make(nn.Linear(24, 20))
    handle = layer.base_layer.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with torch.inference_mode():
        hooked = layer(x)
    assert calls == [torch.Size([6, 3, 20])]  # the hook ran: the base layer itself was called
    handle.remove()
    handle = layer.base_layer.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    with torch.inference_mode():
        doubled = layer(x)
        expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A["a"].T) @ layer.lora_B["a"].T
    torch.testing.assert_close(doubled, expected)  # the pre-hook changed what the base layer saw
    handle.remove()
    global_handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append("global"))
    try:
        calls.clear()
        with torch.inference_mode():
            assert torch.equal(layer(x), hooked)
        assert calls.count("global") == 2  # the LoRA layer and its base layer
    finally:
        global_handle.remove()

    class Shifted(nn.Linear):
        def forward(self, inp):
            return super().forward(inp) + 1.0

    shifted = make(Shifted(24, 20))
    with torch.inference_mode():
        assert torch.equal(shifted(x), LoraLayer.forward(shifted, x))
        torch.testing.assert_close(shifted(x) - 1.0, linear_plus_lora(shifted, x))
    replaced = make(nn.Linear(24, 20))
    replaced.base_layer.forward = lambda inp: torch.zeros(*inp.shape[:-1], 20)
    with torch.inference_mode():
        torch.testing.assert_close(replaced(x), linear_plus_lora(replaced, x, base=False))

    class Logged(torch.Tensor):  # a tensor subclass as the base weight, as quantized or sharded ones are
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    sub = make(nn.Linear(24, 20))
    sub.base_layer.weight = nn.Parameter(sub.base_layer.weight.detach().as_subclass(Logged), requires_grad=False)
    with torch.inference_mode():
        Logged.seen.clear()
        out = sub(x)
        assert "linear" in Logged.seen  # the subclass saw F.linear itself, not mm on a transposed view
        torch.testing.assert_close(out.as_subclass(torch.Tensor), linear_plus_lora(sub, x).as_subclass(torch.Tensor))

    for layer in (make(nn.Linear(24, 20, bias=False)), make(nn.Linear(24, 20))):
        for inp in (x, x.transpose(0, 1)):  # contiguous, and not
            with torch.inference_mode():
                assert torch.equal(layer(inp), LoraLayer.forward(layer, inp))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            assert torch.equal(out, LoraLayer.forward(layer, x))
        assert out.dtype == torch.bfloat16  # autocast chose the dtype, as it does for the base layer


def linear_plus_lora(layer, x, base=True):
    """The base layer's plain ``F.linear`` (or nothing) plus the adapter's product, computed apart."""
    out = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) if base else 0.0
    return out + layer.scaling["a"] * (x @ layer.lora_A["a"].T) @ layer.lora_B["a"].T


def test_lean_path_bad_and_empty_inputs_behave_as_the_base_layer():
    """A wrong feature size or dtype raises the base layer's own error, weights untouched; an empty
    batch gives an empty output."""
    from torch import nn

    from lorakit.layers.linear import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(24, 20))
    layer.add_adapter("a", r=4, lora_alpha=8, scaling=2.0, init_lora_weights=False)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (torch.randn(3, 23), torch.randn(2, 5, 24, dtype=torch.float64)):
        with pytest.raises(RuntimeError) as base_err:
            layer.base_layer(bad)
        with torch.inference_mode(), pytest.raises(RuntimeError) as lora_err:
            layer(bad)
        assert str(lora_err.value) == str(base_err.value)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    with torch.inference_mode():
        assert layer(torch.randn(0, 3, 24)).shape == (0, 3, 20)


# ---- never writing into a tensor someone else holds (found by a layer audit) ---------------------

class TanhLinear(nn.Linear):
    """A Linear subclass whose output autograd saves (tanh's backward needs it)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def _one_layer(base, **kw):
    torch.manual_seed(0)
    model = Wrap(base)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False, **kw))
    return model


def _reference(model, x):
    """base(x) + s·B A x by the plain formula."""
    layer = model.layer
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    return layer.base_layer(x) + s * (x @ A.T) @ B.T


@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_a_hook_that_keeps_the_base_output_keeps_it_unchanged(mode):
    model = _one_layer(nn.Linear(8, 6))
    model.train(mode == "train")
    captured = []
    model.layer.base_layer.register_forward_hook(lambda mod, args, out: captured.append(out))
    x = torch.randn(3, 8)
    with torch.set_grad_enabled(mode != "no_grad"):
        y = model(x)
    with torch.no_grad():
        base_out = nn.functional.linear(x, model.layer.base_layer.weight, model.layer.base_layer.bias)
    assert torch.equal(captured[0], base_out) and captured[0] is not y
    torch.testing.assert_close(y, _reference(model, x).detach() if mode == "no_grad" else _reference(model, x))


@pytest.mark.parametrize("mode", ["train", "no_grad"])
def test_a_hook_that_returns_the_input_leaves_the_input_alone(mode):
    model = _one_layer(nn.Linear(8, 8))
    model.train(mode == "train")
    model.layer.base_layer.register_forward_hook(lambda mod, args, out: args[0])
    x = torch.randn(3, 8)
    kept = x.clone()
    with torch.set_grad_enabled(mode != "no_grad"):
        model(x)
    assert torch.equal(x, kept)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_a_base_whose_output_autograd_saved_still_backpropagates(bias):
    model = _one_layer(TanhLinear(8, 8).double(), bias=bias).double().train()
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in (x, model.layer.lora_A["default"], model.layer.lora_B["default"])]
    for p in (x, model.layer.lora_A["default"], model.layer.lora_B["default"]):
        p.grad = None
    _reference(model, x).sum().backward()
    for got, p in zip(grads, (x, model.layer.lora_A["default"], model.layer.lora_B["default"])):
        torch.testing.assert_close(got, p.grad)


@pytest.mark.parametrize("layer", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_an_empty_batch_gives_an_empty_output(layer, mode):
    from transformers.pytorch_utils import Conv1D

    model = _one_layer(nn.Linear(10, 12) if layer == "linear_bias" else Conv1D(12, 10))
    model.train(mode == "train")
    with torch.set_grad_enabled(mode != "no_grad"):
        y = model(torch.randn(0, 5, 10))
    assert y.shape == (0, 5, 12)


@pytest.mark.parametrize("mode", ["train", "no_grad"])
def test_float16_base_with_a_large_rank_r_intermediate_stays_finite(mode):
    """x·Aᵀ beyond float16's 65504 while the update itself fits: no inf (the first product stays in
    the adapter's float32 into the second)."""
    model = _one_layer(nn.Linear(256, 3, bias=False).half())
    layer = model.layer
    with torch.no_grad():
        layer.base_layer.weight.fill_(0.001)
        layer.lora_A["default"].fill_(1.0)
        layer.lora_B["default"].fill_(1e-3)
    model.train(mode == "train")
    x = torch.full((1, 256), 300.0, dtype=torch.float16)
    with torch.set_grad_enabled(mode != "no_grad"):
        y = model(x)
    expected = (x.float() @ layer.base_layer.weight.float().T + layer.scaling["default"] * (x.float() @ layer.lora_A["default"].T)
                @ layer.lora_B["default"].T)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=0)


def test_sparse_embedding_trains():
    base = nn.Embedding(20, 6, sparse=True)
    model = _one_layer(base).train()
    ids = torch.tensor([[1, 4, 4, 7]])
    model(ids).sum().backward()
    layer = model.layer
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    A_ref, B_ref = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    (s * nn.functional.embedding(ids, A_ref.T) @ B_ref.T).sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad)
    torch.testing.assert_close(B.grad, B_ref.grad)


def test_keep_mask_keeps_something_for_any_p_below_one():
    mask = KeepMask((64, 64), 0.999995, "cpu")
    assert mask.keep > 0 and mask.inv_keep == 1 / mask.keep
    assert KeepMask((4, 4), 1.0, "cpu").keep == 0.0  # exactly 1 drops everything


def _lora_linear_fn(p: float):
    """(x, A, B) -> a LoRA Linear's training-mode output through the fused node, the dropout mask
    drawn from a fixed seed each call (so gradcheck sees one deterministic function)."""
    torch.manual_seed(0)
    layer = lk.get_lora_model(Wrap(nn.Linear(6, 5).double()), lk.LoraConfig(r=3, lora_alpha=6, lora_dropout=p,
                                                                            target_modules=["layer"])).layer
    layer.train()

    def fn(x, A, B):
        # A and B swapped in as plain tensors (not torch.func.functional_call: under a torch.func
        # transform the layer takes plain autograd ops, and this test is about the fused node)
        torch.manual_seed(1)  # the same dropout mask at every call
        stores = layer.lora_A._parameters, layer.lora_B._parameters
        old = stores[0]["default"], stores[1]["default"]
        stores[0]["default"], stores[1]["default"] = A, B
        try:
            return layer(x)
        finally:
            stores[0]["default"], stores[1]["default"] = old

    return fn, layer.lora_A["default"].detach().clone(), torch.randn(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_second_order_gradients_of_the_fused_node_are_exact(p):
    # backward(create_graph=True) through FusedLoraLinear: gradgradcheck compares the derivative of
    # its gradients with finite differences (the node used to treat drop(x) Aᵀ as a constant there)
    fn, A, B = _lora_linear_fn(p)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    out = fn(x, A, B)
    assert out.grad_fn is not None and "FusedLoraLinear" in type(out.grad_fn).__name__
    assert torch.autograd.gradcheck(fn, (x, A, B))
    assert torch.autograd.gradgradcheck(fn, (x, A, B))


def test_gradient_penalty_on_a_lora_llama_matches_peft():
    # the gradient of ‖∇L‖² (a gradient penalty / Hessian-vector product) equals PEFT's on the same weights
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    ids = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(1))

    def base():
        m = tiny_llama().double()
        m.set_attn_implementation("eager")  # SDPA has no double backward on CPU
        return m

    mine = base()
    torch.manual_seed(100)
    lk.get_lora_model(mine, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, t in mine.named_parameters():
            if "lora_" in n:
                named["base_model.model." + n + ".weight"].copy_(t)
    results = []
    for m in (mine, theirs):
        m.train()
        params = [t for t in m.parameters() if t.requires_grad]
        grads = torch.autograd.grad(m(ids, labels=ids).loss, params, create_graph=True)
        results.append(torch.autograd.grad(sum((g ** 2).sum() for g in grads), params))
    scale = max(float(t.abs().max()) for t in results[1])
    assert scale > 1e-3
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)


def test_higher_order_gradients_through_the_training_kernels_fail_loudly():
    from conftest import lora_llama
    from lorakit.ops import fuse_rmsnorms

    model = lora_llama(targets=["q_proj", "v_proj"], dtype=torch.float32)
    model.set_attn_implementation("eager")
    fuse_rmsnorms(model)
    model.train()
    ids = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    params = [t for t in model.parameters() if t.requires_grad]
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(model(ids, labels=ids).loss, params, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_func_grad_vmap_and_forward_ad_on_a_training_lora_layer(dtype):
    # torch.func transforms and forward-mode AD take plain autograd ops (the fused node supports
    # neither, nor does the float32 base's oneDNN node, lorakit.layers.gemm.frozen_linear)
    torch.manual_seed(0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    model = lk.get_lora_model(Wrap(nn.Linear(6, 5).to(dtype)), lk.LoraConfig(r=3, target_modules=["layer"],
                                                                             init_lora_weights=False))
    model.train()
    layer = model.layer
    params = {n: t.detach() for n, t in model.named_parameters() if t.requires_grad}
    x = torch.randn(4, 6, dtype=dtype)

    def loss(pr, xb):
        return torch.func.functional_call(model, pr, (xb,)).square().sum()

    ref = torch.autograd.grad(model(x).square().sum(), [t for t in model.parameters() if t.requires_grad])
    got = torch.func.grad(loss)(params, x)
    for r, n in zip(ref, params):
        torch.testing.assert_close(got[n], r, rtol=tol, atol=tol)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for r, n in zip(ref, params):
        torch.testing.assert_close(per_sample[n].sum(0), r, rtol=tol * 100, atol=tol)

    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    A = layer.lora_A["default"].detach()
    B = layer.lora_B["default"].detach()
    expected = tangent @ layer.base_layer.weight.detach().T + layer.scaling["default"] * (tangent @ A.T) @ B.T
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected, rtol=tol, atol=tol)


def test_the_fused_swiglu_tail_refuses_a_second_differentiation():
    from conftest import lora_llama
    from lorakit.ops import fuse_swiglu_mlps

    model = lora_llama(targets=["down_proj"], dtype=torch.float32)
    model.set_attn_implementation("eager")
    assert fuse_swiglu_mlps(model) == 2
    model.train()
    ids = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    params = [t for t in model.parameters() if t.requires_grad]
    with pytest.raises(RuntimeError, match="fused SwiGLU MLP .*unfuse_swiglu_mlps"):  # (at the first backward now)
        torch.autograd.grad(model(ids, labels=ids).loss, params, create_graph=True)


def _first_order_kernels():
    from lorakit.ops import linear_cross_entropy
    from lorakit.ops.attention import ShortAttention
    from lorakit.ops.grouped import SharedInputLinears
    from lorakit.ops.rmsnorm import RMSNormFn
    from lorakit.ops.rotary import RotaryFn
    from lorakit.ops.swiglu import _SwiGLUDown

    torch.manual_seed(0)
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    A, B, W = torch.randn(2, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True), torch.randn(5, 4)
    gate, up = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    q = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(5, 4, requires_grad=True)
    return [
        ("RMSNorm", "unfuse_rmsnorms", lambda: RMSNormFn.apply(x, w, 1e-5), (x, w)),
        ("SwiGLU MLP", "unfuse_swiglu_mlps", lambda: _SwiGLUDown.apply(gate, up, W, None, A, B, 1.0, None), (gate, up, A, B)),
        ("q/k/v", "unfuse_qkv_projections", lambda: SharedInputLinears.apply(x, (1.0,), None, W, None, A, B)[0], (x, A, B)),
        ("attention", "restore_attention", lambda: ShortAttention.apply(q, q[:, :1], q[:, :1], None, 0.5, True).float(), (q,)),
        ("linear_cross_entropy", "F.cross_entropy",
         lambda: linear_cross_entropy(x, head, torch.tensor([0, 1, 2])), (x, head)),
        ("rotary embedding", "unfuse_qkv_projections", lambda: RotaryFn.apply(x, w.detach(), w.detach().flip(0)), (x,)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_first_order_kernels_refuse_create_graph_instead_of_dropping_terms(case):
    # once_differentiable raised only where the incoming gradient required grad: at the root of the
    # graph (the loss) linear_cross_entropy got a constant 1, answered constants, and a gradient
    # penalty through a LoRA model came out 0.70 relative off on lora_B, silently
    name, remedy, run, inputs = _first_order_kernels()[case]
    out = run()
    grads = torch.autograd.grad(out.sum(), inputs)  # first order: fine
    assert all(g is not None for g in grads)
    with pytest.raises(RuntimeError, match=rf"higher-order gradients through lorakit's fused .*{name.split()[0]}.*{remedy}"):
        torch.autograd.grad(run().sum(), inputs, create_graph=True)


def test_a_gradient_penalty_through_the_fused_head_raises():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.ops import linear_cross_entropy

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    model = lk.get_lora_model(LlamaForCausalLM(cfg), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(0, 30, (1, 6))
    hidden = model.model(input_ids=ids).last_hidden_state[0, :-1]
    loss = linear_cross_entropy(hidden, model.lm_head.weight, ids[0, 1:])
    B = model.model.layers[0].self_attn.q_proj.lora_B["default"]
    with pytest.raises(RuntimeError, match="linear_cross_entropy"):
        torch.autograd.grad(loss, B, create_graph=True)


def test_compiled_inference_runs_a_hook_added_to_the_base_layer_later():
    # the lean no-grad path read the base layer's hooks from its __dict__ and never called it, so
    # dynamo put no guard on them: with its hook guards on, a hook added after compiling never ran
    import torch._dynamo

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = lk.get_lora_model(Net().double(), lk.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False)).eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    old = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
            handle = model.fc.base_layer.register_forward_hook(lambda mod, args, out: out * 2)
            want = model(x)
            torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
            handle.remove()
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = old
        torch._dynamo.reset()


# ---- layers whose output is a view of their own 2-D result (found by a readability review) --------

def _view_output_layer(kind, dtype=torch.float64, p=0.0):
    """A LoRA layer on a base whose output for a 3-D input is a reshaped view of its own ``addmm``
    result: ``nn.Linear`` with a bias (``F.linear``) or GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(10, 12) if kind == "linear_bias" else Conv1D(12, 10)
    model = Wrap(base.to(dtype))
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["layer"], init_lora_weights=False,
                                           lora_dropout=p))
    return model


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_3d_input_to_a_view_making_base_takes_the_fused_node(kind, p):
    """Their LoRA branch is added by the fused node (before: autograd's plain ops, which keep the
    dropped-out input), and a (2, 5, 10) input gets exactly what the same 10 rows as (10, 10) get:
    the same mask (the same draws), outputs and gradients."""
    model = _view_output_layer(kind, p=p).train()
    A, B = model.layer.lora_A["default"], model.layer.lora_B["default"]
    x = torch.randn(2, 5, 10, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = model(x)
    assert "FusedLoraLinearBackward" in graph_node_names(y.grad_fn) and y.shape == (2, 5, 12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), g)
    x2 = x.detach().reshape(10, 10).requires_grad_()
    torch.manual_seed(1)
    y2 = model(x2)
    grads2 = torch.autograd.grad(y2, (x2, A, B), g.reshape(10, 12))
    assert torch.equal(y.detach().reshape(10, 12), y2.detach())
    for got, want in zip(grads, grads2):
        assert torch.equal(got.reshape(want.shape), want)
    if p == 0:
        ref = _reference(model, x)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, torch.autograd.grad(ref, (x, A, B), g)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_a_view_making_base_saves_no_dropout_copy(kind):
    """With dropout, a 3-D input saves no more for backward than the same rows in 2-D (no float copy
    of the dropped-out input)."""
    model = _view_output_layer(kind, dtype=torch.float32, p=0.1).train()

    def saved_bytes(x):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(x)
        return sum(total)

    x = torch.randn(4, 64, 10, requires_grad=True)
    assert saved_bytes(x) == saved_bytes(x.detach().reshape(256, 10).requires_grad_())


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
@pytest.mark.parametrize("mode", ["train", "no_grad"])
def test_a_bf16_view_making_base_computes_its_branch_as_a_2d_input_does(kind, mode):
    """fp32 adapters on a bf16 base: a 3-D input's output is bitwise the same rows given in 2-D (the
    branch in bf16 in training, in fp32 rounded once in inference, whatever the input's shape)."""
    model = _view_output_layer(kind, dtype=torch.bfloat16)
    model.train(mode == "train")
    assert model.layer.lora_A["default"].dtype == torch.float32
    x = torch.randn(2, 5, 10, dtype=torch.bfloat16)
    with torch.set_grad_enabled(mode == "train"):
        y3, y2 = model(x), model(x.reshape(10, 10))
    assert torch.equal(y3.reshape(10, 12), y2)


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_a_view_making_base_in_inference_gets_the_unmerged_sum(kind):
    model = _view_output_layer(kind).eval()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    with torch.inference_mode():
        y = model(x)
    torch.testing.assert_close(y, _reference(model, x).detach(), rtol=1e-12, atol=1e-12)
    assert y.shape == (2, 5, 12)


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
def test_inference_under_autocast_runs_the_fused_nodes_ops_without_the_node(kind, monkeypatch):
    """Under bf16 autocast without gradients the branch runs the fused node's very ops (bitwise its
    output with gradients on) without the autograd node (a performance audit: decode under autocast
    took 1.2x PEFT's time through the node)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(10, 12, bias=False), "linear_bias": lambda: nn.Linear(10, 12),
            "conv1d": lambda: Conv1D(12, 10)}[kind]()
    model = Wrap(base)
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["layer"], init_lora_weights=False)).eval()
    x = torch.randn(2, 5, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
    assert "FusedLoraLinearBackward" in graph_node_names(want.grad_fn)
    calls = []
    forward = FusedLoraLinear.forward
    monkeypatch.setattr(FusedLoraLinear, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a)))
    for mode in (torch.inference_mode, torch.no_grad):
        with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.detach())
    assert not calls


# ---- where a view of the base output is not the layer's plain reshape (an audit of whole_base) -----

@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
@pytest.mark.parametrize("shape", [(7, 10), (2, 5, 10)])
def test_a_full_backward_hook_on_the_base_layer_runs_and_its_gradient_counts(kind, shape):
    """The hook puts a node between the base's result and the view the layer gets: the branch must
    not be added below it (the hook was skipped and its change to grad_input lost, 1.65 off)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(10, 12, bias=False), "linear_bias": lambda: nn.Linear(10, 12),
            "conv1d": lambda: Conv1D(12, 10)}[kind]().double()
    model = Wrap(base)
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["layer"], init_lora_weights=False))
    calls = []
    model.layer.base_layer.register_full_backward_hook(lambda mod, gi, go: calls.append(1) or tuple(2 * g for g in gi))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    layer = model.layer
    W = layer.base_layer.weight if kind != "conv1d" else layer.base_layer.weight.T
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    g = torch.ones(*shape[:-1], 12, dtype=torch.float64)
    assert calls == [1]
    torch.testing.assert_close(x.grad, 2 * (g @ W) + s * (g @ B @ A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, backend, shape, p", [("linear_bias", "aot_eager", (2, 5, 10), 0.0),
                                                      ("conv1d", "eager", (7, 10), 0.3)])
def test_compiled_training_of_a_view_making_base_gives_eager_gradients(kind, backend, shape, p):
    """Under torch.compile the branch takes its traced path (aot_eager: the adapters got no gradient;
    eager with dropout: an AttributeError after a graph break)."""
    import torch._dynamo
    from transformers.pytorch_utils import Conv1D

    make = (lambda: nn.Linear(10, 10)) if kind == "linear_bias" else (lambda: Conv1D(10, 10))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = make(), make()

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    torch.manual_seed(0)
    model = Two().double()
    lk.get_lora_model(model, lk.LoraConfig(r=3, target_modules=["l1", "l2"], init_lora_weights=False,
                                           lora_dropout=p)).train()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = [q for q in model.parameters() if q.requires_grad]
    torch.manual_seed(5)
    want_y = model(x)
    g = torch.randn_like(want_y)
    want = torch.autograd.grad(want_y, [x, *params], g)
    torch._dynamo.reset()
    try:
        torch.manual_seed(5)
        got_y = torch.compile(model, backend=backend)(x)
        got = torch.autograd.grad(got_y, [x, *params], g)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_torch_func_grad_and_jvp_through_a_view_making_base(kind):
    from torch.func import functional_call, grad, jvp

    model = _view_output_layer(kind)
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters() if "lora_" in k}
    grads = grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    A, B = model.layer.lora_A["default"], model.layer.lora_B["default"]
    want = torch.autograd.grad(_reference(model, x).sum(), (A, B))
    torch.testing.assert_close(grads["layer.lora_A.default"], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["layer.lora_B.default"], want[1], rtol=1e-12, atol=1e-12)
    _, tangent = jvp(model, (x,), (torch.ones_like(x),))
    W = model.layer.base_layer.weight if kind == "linear_bias" else model.layer.base_layer.weight.T
    s = model.layer.scaling["default"]
    torch.testing.assert_close(tangent, torch.ones_like(x) @ (W + s * B @ A).T.detach(), rtol=1e-12, atol=1e-12)


def test_lean_path_through_a_hooked_bf16_base_with_two_adapters_returns_bf16():
    """Lean inference path, not the direct kernel (a forward pre-hook on the base) and not in place
    (F.linear of a 3-D input with a bias returns a view): two fp32 adapters are summed in fp32 and
    rounded once into the bf16 output, which must come back as bf16 and equal the generic path
    (the bug this catches: ``return total`` without ``.to(result.dtype)``)."""
    from lorakit.layers.base import LoraLayer
    from lorakit.layers.linear import LoraLinear

    torch.manual_seed(0)
    base = nn.Linear(24, 20).to(torch.bfloat16)
    base.register_forward_pre_hook(lambda module, args: None)
    layer = LoraLinear(base)
    for name in ("a", "b"):
        layer.add_adapter(name, r=4, lora_alpha=8, scaling=1.5, init_lora_weights=False)
    layer.active_adapters = ["a", "b"]
    layer.eval()
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        lean = layer(x)
        generic = LoraLayer.forward(layer, x)
    assert lean.dtype == torch.bfloat16 == generic.dtype
    torch.testing.assert_close(lean, generic, rtol=1e-2, atol=1e-2)


def test_keep_mask_keeps_with_exactly_its_stated_probability_at_the_smallest_threshold():
    """keep = threshold / 65536: at p = 1 − 2^-16 one 16-bit value in 65536 keeps. Over 2^24 draws
    that is 256 kept (σ = 16); counting one lane value too many (``<=`` for ``<``) doubles it.
    The seed is fixed, so the count is deterministic."""
    from lorakit.layers.fused import KeepMask

    torch.manual_seed(0)
    km = KeepMask((1 << 12, 1 << 12), 1.0 - 2.0 ** -16, torch.device("cpu"))
    assert km.keep == 2.0 ** -16
    kept = int(km.get().sum())
    expected = (1 << 24) * km.keep
    assert abs(kept - expected) < 5 * expected ** 0.5, kept


def test_b_grad_product_is_g_transposed_times_h_in_b_s_layout():
    """dL/dB's product, formed as (hᵀ g)ᵀ, is gᵀ h (float64), contiguous like B (so autograd keeps it
    as B's gradient without a copy), for a column slice of a wider h too (the grouped node's)."""
    from lorakit.layers.fused import b_grad_product

    g = torch.randn(37, 11, dtype=torch.float64)
    wide = torch.randn(37, 12, dtype=torch.float64)
    for h in (wide[:, :4].contiguous(), wide[:, 4:8]):
        got = b_grad_product(g, h)
        assert got.shape == (11, 4) and got.is_contiguous()
        torch.testing.assert_close(got, g.T @ h, rtol=1e-12, atol=1e-12)
