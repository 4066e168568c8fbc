"""lorakit.ops.rmsnorm: the fused norm equals the module, and LoRA nodes that rebuild its output
from the recipe give the same gradients while keeping less for backward."""
from __future__ import annotations

import pytest
import torch
from conftest import lora_llama, loss_and_grads, tiny_gpt2

import lorakit as lk
from lorakit.layers.fused import RMSNORM_RECIPE, fused_lora_add, recompute_norm
from lorakit.ops import fuse_rmsnorms, fuse_swiglu_mlps, unfuse_rmsnorms
from lorakit.ops.rmsnorm import RMSNormFn


def test_gradcheck_float64():
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFn.apply(a, b, 1e-5), (h, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_is_bit_identical_to_the_module(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    h = torch.randn(4, 7, 16, dtype=dtype, requires_grad=True)
    y = RMSNormFn.apply(h, norm.weight, norm.variance_epsilon)
    ref = norm(h)
    assert torch.equal(y, ref)
    assert torch.equal(recompute_norm(getattr(y, RMSNORM_RECIPE)), y)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (h, norm.weight), g)
    want = torch.autograd.grad(ref, (h, norm.weight), g)
    if dtype == torch.float32:  # (dL/dh by another formula than autograd's chain: rounds otherwise)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # dL/dw bit for bit; dL/dh, by its own formula, rounds the other way in at most an element or
        # two of 448 (worst over 100 seeds: 1), where grad·w rounded in another order (mutation round 8,
        # R05) moved ~150
        assert torch.equal(got[1], want[1])
        assert int((got[0] != want[0]).sum()) <= got[0].numel() // 100
        torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)


def test_lora_node_rebuilding_its_input_gives_the_same_gradients_in_float64():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    assert not hasattr(RMSNormFn.apply(h.detach(), w, 1e-5), RMSNORM_RECIPE)  # no gradient: no recipe
    W = torch.randn(6, 8, dtype=torch.float64)
    A = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def run(tagged: bool):
        y = RMSNormFn.apply(h, w, 1e-5)
        if not tagged:
            y = y * 1.0  # a plain tensor: the LoRA node keeps it
            assert not hasattr(y, RMSNORM_RECIPE)
        out = fused_lora_add(y @ W.T, y, A, B, 0.7, 0.0, training=True)
        return torch.autograd.grad(out.pow(2).sum(), (h, A, B))

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_consumers_of_one_norm_share_one_rebuild(monkeypatch):
    # q, k and v read one norm's output: backward rebuilds it once for the three, also when the
    # graph is run twice (retain_graph), with the same gradients as three separate rebuilds
    import lorakit.layers.fused as fused

    calls = []
    real = fused.recompute_norm
    monkeypatch.setattr(fused, "recompute_norm", lambda *a, **k: calls.append(k.get("h_acc") is None) or real(*a, **k))
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64)
    Ws = [torch.randn(6, 8, dtype=torch.float64) for _ in range(3)]
    As = [torch.randn(3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    Bs = [torch.randn(6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def loss(tagged: bool):
        y = RMSNormFn.apply(h, w, 1e-5)
        if not tagged:
            y = y * 1.0
        outs = [fused_lora_add(y @ W.T, y, A, B, 0.7, 0.0, training=True) for W, A, B in zip(Ws, As, Bs)]
        return sum((o * (i + 1)).pow(2).sum() for i, o in enumerate(outs))

    want = torch.autograd.grad(loss(False), (h, *As, *Bs))
    calls.clear()
    tagged = loss(True)
    got = torch.autograd.grad(tagged, (h, *As, *Bs), retain_graph=True)
    assert sum(calls) == 1  # one rebuild in backward for the three consumers
    again = torch.autograd.grad(tagged, (h, *As, *Bs))
    assert sum(calls) == 4  # the second run: its count is spent, each consumer rebuilds
    for a, b, c in zip(got, again, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)


def test_model_same_loss_and_gradients_and_fewer_saved_bytes():
    model = lora_llama(dtype=torch.float32)
    fuse_swiglu_mlps(model)
    ids = torch.randint(3, 101, (3, 9))

    def saved_bytes():
        storages = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss
        return sum(storages.values())

    ref_loss, ref_grads = loss_and_grads(model, ids)
    plain = saved_bytes()
    assert fuse_rmsnorms(model) == 5  # 2 per layer + the final norm
    loss, grads = loss_and_grads(model, ids)
    assert torch.equal(loss, ref_loss)  # the forward is bit-identical
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    fused = saved_bytes()
    # the normalised inputs (3 x 9 tokens x 32 floats each) are no longer kept, except the first
    # layer's first one (its input, the embeddings, needs no gradient, so the norm keeps nothing)
    assert plain - fused >= 3 * 3 * 9 * 32 * 4
    assert unfuse_rmsnorms(model) == 5 and fuse_rmsnorms(model) == 5 and fuse_rmsnorms(model) == 5


def test_no_grad_float64_and_other_norms_use_the_module():
    model = lora_llama(dtype=torch.float64)
    ids = torch.randint(3, 101, (2, 6))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    fuse_rmsnorms(model)
    loss, grads = loss_and_grads(model, ids)  # float64: the module's own forward, exactly
    assert torch.equal(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want)
    assert fuse_rmsnorms(tiny_gpt2()) == 0  # LayerNorm is not this formula
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_rmsnorms("model")


def test_training_kernels_under_torch_compile_give_eager_gradients():
    # dynamo cannot trace the fused norm's recipe tag (a side effect); compiled, the norm runs its own
    # forward, and the gradients equal eager's (they were 0.13 off on a 0.13 scale)
    from lorakit.train.loop import use_lora_training_kernels

    torch._dynamo.reset()
    model = lora_llama(targets="all-linear", dtype=torch.float32)
    use_lora_training_kernels(model)
    model.train()
    ids = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(1))
    params = [t for t in model.parameters() if t.requires_grad]
    ref = torch.autograd.grad(model(ids, labels=ids).loss, params)
    got = torch.autograd.grad(torch.compile(model, backend="aot_eager")(ids, labels=ids).loss, params)
    scale = max(float(r.abs().max()) for r in ref)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("edit", ["mul", "add", "clamp"])
def test_a_norm_output_edited_in_place_is_read_as_edited(edit):
    # a forward hook's out.mul_(1.5) (activation steering) between the norm and a LoRA layer: the
    # LoRA node rebuilt the *unedited* output from the recipe, dL/dA 50% off with no error
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.layers.linear import LoraLinear

    torch.manual_seed(0)
    norm = LlamaRMSNorm(8)
    lin = LoraLinear(nn.Linear(8, 4, bias=False).requires_grad_(False))
    lin.add_adapter("a", 2, 1.0, 1.0, init_lora_weights=False)
    lin.train()
    h = torch.randn(3, 8, requires_grad=True)
    op = {"mul": lambda y: y.mul_(2), "add": lambda y: y.add_(1), "clamp": lambda y: y.clamp_(max=0)}[edit]
    grads = []
    for fused in (False, True):
        if fused:
            fuse_rmsnorms(norm)
        y = norm(h)
        assert (getattr(y, RMSNORM_RECIPE, None) is not None) == fused
        op(y)
        grads.append(torch.autograd.grad(lin(y).square().sum(), (lin.lora_A["a"], lin.lora_B["a"], h)))
    unfuse_rmsnorms(norm)
    for plain, got in zip(*grads):
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)


def test_the_fused_norms_survive_train_and_eval_on_a_model_with_hub_kernels(monkeypatch):
    """transformers 5 turns its hub kernels on for every model from_pretrained loads where the
    `kernels` package is installed, and each model.train() / eval() then re-kernelizes the layers
    they decorate (RMSNorm), deleting lorakit's fused forward: `lorakit train` on the embedded model
    ran without it (133 MiB more kept for backward at 4 x 256). The kernels turn hub kernels off for
    the run and the undo gives them back."""
    pytest.importorskip("kernels")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    from lorakit.ops.rmsnorm import _FusedNormForward
    from lorakit.train.loop import _undo_kernels, use_lora_training_kernels

    model = tiny_llama_lm(tiny_tokenizer())
    model.set_use_kernels(True)
    assert model.use_kernels
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    use_lora_training_kernels(model)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    model.eval()
    model.train()
    assert norms and all(isinstance(n.__dict__.get("forward"), _FusedNormForward) for n in norms)
    _undo_kernels(model, None)
    assert model.use_kernels and not any("forward" in n.__dict__ for n in norms)


def test_models_lorakit_loads_have_hub_kernels_off(tmp_path, monkeypatch):
    pytest.importorskip("kernels")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tiny_lm import save_tiny_model

    from lorakit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "m")))
    assert not getattr(model, "use_kernels", False)


def test_the_fused_norms_survive_train_on_a_peft_model_over_hub_kernels(monkeypatch):
    """A wrapper (PEFT's PeftModel) passes use_kernels through from the model it holds: the kernels
    turned it off on the wrapper only, and the held model's train() re-kernelized the norms away."""
    pytest.importorskip("kernels")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    from lorakit.ops.rmsnorm import _FusedNormForward
    from lorakit.train.loop import _undo_kernels, use_lora_training_kernels

    base = tiny_llama_lm(tiny_tokenizer())
    base.set_use_kernels(True)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    use_lora_training_kernels(wrapped)
    wrapped.train()
    norms = [m for m in wrapped.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(isinstance(n.__dict__.get("forward"), _FusedNormForward) for n in norms)
    assert not base.use_kernels
    _undo_kernels(wrapped, None)
    assert base.use_kernels


def test_bf16_norm_weight_gradient_is_the_module_s():
    """dL/dw of the fused norm on bf16 input is what autograd gives for the module's own
    ``weight * y.to(bf16)``: the product with the bf16-rounded y (the bug this catches: the unrounded
    fp32 x̂ used instead)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.ops import fuse_rmsnorms

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(64, dtype=torch.bfloat16))
    h = torch.randn(4, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    ref = torch.autograd.grad((norm(h) * g).sum(), norm.weight)[0]
    assert fuse_rmsnorms(norm) == 1
    got = torch.autograd.grad((norm(h) * g).sum(), norm.weight)[0]
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=0)
