"""lorakit.layers.gemm: fp32 CPU products with frozen weights through oneDNN, and where they are used."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import DEFAULT_ONEDNN_MIN_MACS as DEFAULT_MIN_MACS, lora_llama

import lorakit as lk
from lorakit.layers import gemm

onednn = pytest.mark.skipif(gemm._ONEDNN is None, reason="torch built without oneDNN")


def _close_to_float64(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (float32) within a few float32 roundings of a sum of ~100 unit-scale terms of ``exact``."""
    assert got.dtype == torch.float32 and got.shape == exact.shape
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-5)


@onednn
def test_which_tensors_take_onednn():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert gemm.uses_onednn(x, w)
    assert gemm.uses_onednn(x, w, None)  # (no bias)
    assert not gemm.uses_onednn(x, w, torch.zeros(3, dtype=torch.float64))  # a bias of another dtype
    assert gemm.uses_onednn(x, torch.nn.Parameter(w, requires_grad=False))
    assert not gemm.uses_onednn(x.double(), w.double())
    assert not gemm.uses_onednn(x.bfloat16(), w.bfloat16())
    assert not gemm.uses_onednn(x, w.double())  # every tensor must be float32
    with torch.backends.mkldnn.flags(enabled=False):
        assert not gemm.uses_onednn(x, w)

    class Sub(torch.Tensor):
        pass

    assert not gemm.uses_onednn(x, w.as_subclass(Sub))  # a subclass may multiply its own way


@onednn
@pytest.mark.parametrize("shape", [(7, 96), (2, 5, 96), (96,), (0, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_f_linear_in_float32(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    out = gemm.linear(x, w, b)
    _close_to_float64(out, F.linear(x.double(), w.double(), None if b is None else b.double()))
    assert out._base is None  # not a view: an autograd Function's output made with it may be edited in place


@onednn
def test_a_bias_that_is_not_contiguous_memory_is_read_as_its_values():
    """oneDNN reads the bias as contiguous memory: a strided view (a column of a packed tensor) or an
    expanded one (stride 0) gave wrong outputs (off by ~3, or NaN) before it was made contiguous."""
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(5, 24, generator=g), torch.randn(8, 24, generator=g)
    for b in (torch.randn(8, 3, generator=g)[:, 0], torch.randn(1, generator=g).expand(8)):
        assert not b.is_contiguous()
        _close_to_float64(gemm.linear(x, w, b), F.linear(x.double(), w.double(), b.double()))


@onednn
def test_times_weight_and_its_sum_are_the_products_in_float32():
    g = torch.Generator().manual_seed(1)
    grad, w, into = torch.randn(9, 40, generator=g), torch.randn(40, 96, generator=g), torch.randn(9, 96, generator=g)
    _close_to_float64(gemm.times_weight(grad, w), grad.double() @ w.double())
    _close_to_float64(gemm.add_times_weight(into.clone(), grad, w), into.double() + grad.double() @ w.double())
    # transposed operands (the head's dL/dW is linear(probsᵀ, hᵀ))
    h = torch.randn(9, 96, generator=g)
    _close_to_float64(gemm.linear(grad.T, h.T), grad.double().T @ h.double())


def test_without_onednn_the_ops_are_torchs_own_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float64, torch.float32):
        x, w, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((3, 4, 96), (40, 96), (40,)))
        grad, into = torch.randn(12, 40, generator=g, dtype=dtype), torch.randn(12, 96, generator=g, dtype=dtype)
        with torch.backends.mkldnn.flags(enabled=dtype != torch.float32):  # float32: oneDNN turned off
            assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
            assert torch.equal(gemm.times_weight(grad, w), grad @ w)
            expected = into.clone().addmm_(grad, w)
            kept = into.clone()
            summed = gemm.add_times_weight(kept, grad, w)
            assert summed is kept and torch.equal(summed, expected)  # torch's addmm_, into the tensor given


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_linear_gives_f_linears_input_gradient(dtype):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(40, 96, generator=g, dtype=dtype), torch.randn(40, generator=g, dtype=dtype)
    x = torch.randn(2, 5, 96, generator=g, dtype=dtype, requires_grad=True)
    up = torch.randn(2, 5, 40, generator=g, dtype=dtype)
    out = gemm.frozen_linear(x, w, b)
    (gx,) = torch.autograd.grad(out, x, up)
    x64 = x.detach().double().requires_grad_()
    ref = F.linear(x64, w.double(), b.double())
    (gx64,) = torch.autograd.grad(ref, x64, up.double())
    if dtype == torch.float64:  # torch's own ops: the same bits
        assert torch.equal(out, ref) and torch.equal(gx, gx64)
    else:
        _close_to_float64(out.detach(), ref.detach())
        _close_to_float64(gx, gx64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frozen_linear_second_order_gradients(dtype):
    """backward(create_graph=True): float32's first-order backward is oneDNN's, which autograd cannot
    differentiate, so that backward runs torch's op instead; the second-order gradient is F.linear's."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 8, generator=g, dtype=dtype)
    x = torch.randn(3, 8, generator=g, dtype=dtype, requires_grad=True)

    def penalty(lin):
        (gx,) = torch.autograd.grad(lin(x).pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), x)[0]

    tol = None if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(penalty(lambda t: gemm.frozen_linear(t, w)), penalty(lambda t: F.linear(t, w)),
                               rtol=tol, atol=tol)


@onednn
def test_shapes_that_do_not_fit_get_torchs_error_naming_them():
    """A wrong input width (a LoRA Linear's base, with gradients on) is refused as nn.Linear refuses
    it, naming the shapes, not by oneDNN's "could not create a primitive descriptor"."""
    w, b = torch.randn(5, 8), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(3x7 and 8x5\)"):
        gemm.linear(torch.randn(3, 7), w)
    with pytest.raises(RuntimeError, match="size"):
        gemm.linear(torch.randn(3, 8), w, torch.randn(4))  # a bias of the wrong length
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gemm.times_weight(torch.randn(3, 4), w)
    with pytest.raises(RuntimeError, match="size"):
        gemm.add_times_weight(torch.randn(3, 7), torch.randn(3, 5), w)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(8, 5)), lk.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(3x7 and 8x5\)"):
        model(torch.randn(3, 7, requires_grad=True))
    assert torch.equal(gemm.linear(torch.randn(0, 8), w, b), torch.empty(0, 5))  # (no rows: fine)


@onednn
def test_products_over_zero_terms_are_zeros():
    """A layer with 0 input features (or dL/dx through one with 0 outputs): sums of no terms, zeros
    (oneDNN cannot make a primitive for them: torch's kernels run)."""
    x, w, b = torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemm.linear(x, w), torch.zeros(3, 4))
    g, w2 = torch.randn(3, 0), torch.randn(0, 5)
    assert torch.equal(gemm.times_weight(g, w2), torch.zeros(3, 5))
    into = torch.randn(3, 5)
    assert torch.equal(gemm.add_times_weight(into.clone(), g, w2), into)


def test_frozen_linear_refuses_a_trained_weight():
    w = torch.randn(6, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        gemm.frozen_linear(torch.randn(3, 8), w)
    with pytest.raises(ValueError, match="frozen"):
        gemm.frozen_linear(torch.randn(3, 8), w.detach(), torch.zeros(6, requires_grad=True))


def _routed(monkeypatch, layer, x) -> int:
    """How many times ``layer(x)`` (with gradients, if on) computed its base through ``frozen_linear``."""
    calls, real = [], gemm.frozen_linear
    monkeypatch.setattr(gemm, "frozen_linear", lambda *a: calls.append(1) or real(*a))
    layer(x)
    monkeypatch.undo()
    return len(calls)


@onednn
def test_lora_linear_base_takes_frozen_linear_only_where_that_is_its_call(monkeypatch):
    torch.manual_seed(0)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), lk.LoraConfig(r=2, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(3, 16, requires_grad=True)
    assert _routed(monkeypatch, layer, x) == 1
    with torch.no_grad():  # inference: the base layer's own call (its bits)
        assert _routed(monkeypatch, layer, x) == 0
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: None)
    assert _routed(monkeypatch, layer, x) == 0  # a hook on the base layer must run
    handle.remove()
    with lk.disable_adapters(model):  # the base model's output, bitwise (gradients on or not)
        assert _routed(monkeypatch, layer, x) == 0
        assert torch.equal(layer(x), layer.base_layer(x))
    layer.lora_A["default"].requires_grad_(False)
    assert _routed(monkeypatch, layer, x) == 1  # x still wants its gradient
    frozen_x = x.detach()
    assert _routed(monkeypatch, layer, frozen_x) == 0  # nothing needs a gradient: the base layer's call
    layer.lora_B["default"].requires_grad_(False)
    assert _routed(monkeypatch, layer, frozen_x) == 0
    layer.lora_A["default"].requires_grad_(True)
    assert _routed(monkeypatch, layer, frozen_x) == 1  # the adapter wants its gradient
    layer.base_layer.weight.requires_grad_(True)
    assert _routed(monkeypatch, layer, x) == 0  # a trained base weight needs its own gradient
    layer.base_layer.weight.requires_grad_(False)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _routed(monkeypatch, layer, x) == 0
    model.double()
    assert _routed(monkeypatch, layer, x.double()) == 0


@onednn
def test_base_routing_looks_at_the_active_adapters_only(monkeypatch):
    """With x frozen, the base takes frozen_linear where an active adapter wants a gradient."""
    torch.manual_seed(0)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), lk.LoraConfig(r=2, target_modules=["0"]))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["0"]), adapter_name="other")
    layer = model[0]
    x = torch.randn(3, 16)
    lk.set_adapter(model, ["default", "other"])
    layer.lora_A["default"].requires_grad_(True)
    layer.lora_A["other"].requires_grad_(False)
    assert _routed(monkeypatch, layer, x) == 1  # one of the active adapters wants its gradient
    lk.set_adapter(model, "other")
    assert _routed(monkeypatch, layer, x) == 0  # only an inactive one does


@onednn
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_lora_step_in_float32_matches_the_float64_step(dropout):
    """Every product of a float32 step (base, grouped q/k/v and gate/up, SwiGLU tail, head) through
    oneDNN: the adapter gradients within float32 rounding of the float64 step's. With LoRA dropout
    both steps draw the same masks (same seed, same shapes)."""
    from lorakit.train.generate import loss_sum
    from lorakit.train.loop import use_lora_training_kernels

    import copy

    grads = {}
    model64 = lora_llama(dtype=torch.float64, dropout=dropout)
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(model64).to(dtype)  # the same weights in both
        use_lora_training_kernels(model)
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
        torch.manual_seed(12)
        loss, n = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        (loss / n).backward()
        grads[dtype] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert grads[torch.float32].keys() == grads[torch.float64].keys() and len(grads[torch.float32]) == 28
    for k, g32 in grads[torch.float32].items():
        torch.testing.assert_close(g32.double(), grads[torch.float64][k], rtol=2e-4, atol=2e-6, msg=k)


@onednn
def test_every_product_with_a_frozen_weight_in_a_step_goes_to_onednn(monkeypatch):
    """A float32 LoRA step with the training kernels on a 2-layer Llama: per layer the forward's 7
    base products (q, k, v, o, gate, up, down) and the backward's dL/dx through them (q, gate, o,
    down alone; k, v, up summed into the first; none for the first layer's q, k, v, whose input comes
    from the frozen embeddings), and the head's logits and dL/dh (one chunk, both in the forward:
    ``linear_cross_entropy`` computes dL/dh there)."""
    from lorakit.train.generate import loss_sum
    from lorakit.train.loop import use_lora_training_kernels

    model = lora_llama(dtype=torch.float32)
    use_lora_training_kernels(model)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(7))
    calls = {"linear": 0, "sum": 0}

    def counting(kind, real):
        return lambda *a: calls.__setitem__(kind, calls[kind] + 1) or real(*a)

    monkeypatch.setattr(gemm, "_ONEDNN", counting("linear", gemm._ONEDNN))
    monkeypatch.setattr(gemm, "_ONEDNN_SUM", counting("sum", gemm._ONEDNN_SUM))
    loss, n = loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert calls == {"linear": 2 * 7 + 2, "sum": 0}
    (loss / n).backward()
    assert calls == {"linear": 2 * 7 + 2 + (3 + 4), "sum": 1 + 3}


@onednn
@pytest.mark.parametrize("trained", [False, True])
def test_linear_cross_entropy_in_float32_through_onednn(trained):
    from lorakit.ops import linear_cross_entropy

    g = torch.Generator().manual_seed(6)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * 0.2).requires_grad_(trained)
    b = torch.randn(300, generator=g).requires_grad_(trained)
    y = torch.randint(0, 300, (40,), generator=g)
    loss = linear_cross_entropy(h, w, y, bias=b, chunk_size=16)
    wrt = (h, w, b) if trained else (h,)
    got = torch.autograd.grad(loss, wrt)
    leaves = [t.detach().double().requires_grad_() for t in wrt]
    h64, w64, b64 = leaves if trained else (leaves[0], w.double(), b.double())
    ref = F.cross_entropy(h64 @ w64.T + b64, y, reduction="sum")
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-4)
    for a, e in zip(got, torch.autograd.grad(ref, leaves)):
        _close_to_float64(a, e)


@onednn
def test_an_evaluation_loss_keeps_torchs_kernel(monkeypatch):
    """Under no_grad the head's products are torch's (the loss has the bits it had before oneDNN)."""
    import importlib

    lce = importlib.import_module("lorakit.ops.linear_cross_entropy")
    calls, real = [], gemm._ONEDNN
    monkeypatch.setattr(gemm, "_ONEDNN", lambda *a: calls.append(1) or real(*a))
    h, w, y = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = lce.linear_cross_entropy(h, w, y, chunk_size=8)
    assert calls == []
    with torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
        assert torch.equal(loss, lce.linear_cross_entropy(h, w, y, chunk_size=8))
    lce.linear_cross_entropy(h.requires_grad_(), w, y, chunk_size=8)
    assert len(calls) == 2 * 3  # with gradients: each chunk's logits and dL/dh


@onednn
def test_head_chunks_logits_are_released_before_the_next_are_made(monkeypatch):
    import importlib

    lce = importlib.import_module("lorakit.ops.linear_cross_entropy")
    made, alive_at_make, real = [], [], gemm.linear

    def spy(a, w, b=None):
        alive_at_make.append(sum(r() is not None for r in made))
        out = real(a, w, b)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(gemm, "linear", spy)
    h, w, y = torch.randn(50, 8, requires_grad=True), torch.randn(30, 8), torch.randint(0, 30, (50,))
    loss = lce.linear_cross_entropy(h, w, y, chunk_size=8)
    assert len(made) == 7 and alive_at_make == [0] * 7  # 7 chunks' logits, each made with no other alive
    torch.testing.assert_close(loss.double(), F.cross_entropy(h.double() @ w.double().T, y, reduction="sum"),
                               rtol=1e-6, atol=1e-4)


def _onednn_calls(monkeypatch) -> list:
    calls = []
    for name in ("_ONEDNN", "_ONEDNN_SUM"):
        real = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@onednn
def test_products_below_the_threshold_keep_torchs_kernel_bit_for_bit(monkeypatch):
    """oneDNN's fixed cost per call outweighs its faster kernel on small products: below
    ``ONEDNN_MIN_MACS`` multiply-adds (rows × weight elements) torch's own ops run, with their bits."""
    assert DEFAULT_MIN_MACS == 1 << 23
    gemm.ONEDNN_MIN_MACS = 10 * 12 * 8  # x (2, 5, 12) and W (8, 12): 10 rows × 96 elements, exactly
    calls = _onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(2, 5, 12, generator=g), torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    gemm.linear(x, w, b)
    assert calls == ["_ONEDNN"]  # at the threshold: oneDNN
    small_x, small_w = x[:, :4], w[:7]
    for out, ref in ((gemm.linear(small_x, w, b), F.linear(small_x, w, b)),      # 8 rows x 96
                     (gemm.linear(x, small_w, b[:7]), F.linear(x, small_w, b[:7]))):  # 10 rows x 84
        assert torch.equal(out, ref) and out._base is None
    grad = torch.randn(9, 8, generator=g)  # 9 rows x 96 elements
    into = torch.randn(9, 12, generator=g)
    assert torch.equal(gemm.times_weight(grad, w), grad @ w)
    summed = gemm.add_times_weight(kept := into.clone(), grad, w)
    assert summed is kept and torch.equal(summed, into.clone().addmm_(grad, w))
    assert calls == ["_ONEDNN"]
    gemm.times_weight(torch.randn(10, 8), w)
    gemm.add_times_weight(torch.randn(10, 12), torch.randn(10, 8), w)
    assert calls == ["_ONEDNN", "_ONEDNN", "_ONEDNN_SUM"]


@onednn
def test_a_small_lora_layer_computes_its_base_with_its_own_call(monkeypatch):
    """A LoRA Linear's base takes ``frozen_linear`` (oneDNN) only for a product worth it."""
    torch.manual_seed(0)
    model = lk.get_lora_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), lk.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(3, 16, requires_grad=True)
    gemm.ONEDNN_MIN_MACS = 3 * 16 * 8 + 1
    assert _routed(monkeypatch, model[0], x) == 0
    gemm.ONEDNN_MIN_MACS = 3 * 16 * 8
    assert _routed(monkeypatch, model[0], x) == 1


@onednn
def test_a_head_below_the_threshold_keeps_torchs_kernel(monkeypatch):
    from lorakit.ops import linear_cross_entropy

    gemm.ONEDNN_MIN_MACS = DEFAULT_MIN_MACS
    calls = _onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(10)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w, y = torch.randn(300, 32, generator=g) * 0.2, torch.randint(0, 300, (40,), generator=g)
    loss = linear_cross_entropy(h, w, y, chunk_size=16)
    (gh,) = torch.autograd.grad(loss, h)
    assert calls == []
    h64 = h.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w.double().T, y, reduction="sum")
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-4)
    _close_to_float64(gh, torch.autograd.grad(ref, h64)[0])


@pytest.mark.parametrize("min_macs", [0, DEFAULT_MIN_MACS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_biased_product_of_a_batch_may_be_edited_in_place_after_the_node(min_macs, dtype):
    """F.linear of a 1-D or 3-D input with a bias is a view of its 2-D addmm; returned from an
    autograd Function and edited in place, autograd refused it ("Output 0 of _FrozenLinear is a
    view and is being modified inplace"). gemm.linear's output is never a view, on either kernel."""
    gemm.ONEDNN_MIN_MACS = min_macs
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(4, 8, generator=g, dtype=dtype), torch.randn(4, generator=g, dtype=dtype)
    for shape in ((2, 3, 8), (8,)):
        x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
        y = gemm.frozen_linear(x, w, b)
        assert y._base is None
        if dtype == torch.float64 or min_macs:
            assert torch.equal(y, F.linear(x, w, b))  # torch's kernel: its bits
        y.mul_(2.0).sum().backward()
        torch.testing.assert_close(x.grad, (2 * w.sum(0)).expand(shape))


@pytest.mark.parametrize("vendor, mkl, pays", [("GenuineIntel", True, False), ("GenuineIntel", False, True),
                                               ("AuthenticAMD", True, True), ("", True, True)])
def test_onednn_pays_except_on_intel_s_cpus_with_mkl(vendor, mkl, pays):
    assert gemm._onednn_pays(vendor, mkl) is pays


def test_the_cpu_vendor_is_read_from_the_system(monkeypatch):
    import builtins
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = [ln for ln in cpuinfo.read_text(errors="replace").splitlines() if ln.startswith("vendor_id")]
        if lines:
            assert gemm._cpu_vendor() == lines[0].partition(":")[2].strip()
    real_open = builtins.open

    def no_cpuinfo(path, *a, **k):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(gemm.sys, "platform", "win32")
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6 Model 167 Stepping 1, GenuineIntel")
    assert gemm._cpu_vendor() == "GenuineIntel"   # Windows' description
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert gemm._cpu_vendor() == ""
    # elsewhere without /proc/cpuinfo (macOS): no processor query (a `uname -p` subprocess there)
    monkeypatch.setattr(gemm.sys, "platform", "darwin")
    monkeypatch.setattr(platform, "processor", lambda: pytest.fail("platform.processor() was called"))
    assert gemm._cpu_vendor() == ""


@onednn
def test_where_onednn_does_not_pay_every_product_keeps_torch_s_kernel_bit_for_bit(monkeypatch):
    gemm.ONEDNN_PAYS = False
    calls = _onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(12)
    x, w, b = torch.randn(2, 5, 12, generator=g), torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    grad, into = torch.randn(9, 8, generator=g), torch.randn(9, 12, generator=g)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemm.times_weight(grad, w), grad @ w)
    assert torch.equal(gemm.add_times_weight(into.clone(), grad, w), into.clone().addmm_(grad, w))
    model = lora_llama(dtype=torch.float32)
    from lorakit.train.loop import use_lora_training_kernels

    use_lora_training_kernels(model)
    ids = torch.randint(3, 101, (2, 8), generator=g)
    model(ids, labels=ids).loss.backward()
    assert calls == []
    gemm.ONEDNN_PAYS = True
    model(ids, labels=ids).loss.backward()
    assert calls  # (the same step with oneDNN paying: its products there)
