"""The RoPE node (lorakit.ops.rotary) and the Llama attention forward that uses it (ops.grouped)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import assert_same_in_float64, lora_llama, loss_and_grads

import lorakit as lk
from lorakit.ops import fuse_qkv_projections, grouped, unfuse_qkv_projections
from lorakit.ops.patching import forward_body
from lorakit.ops.rotary import RotaryFn, apply_rotary, rotary_applies


def _hf_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _qk(dtype, batch=2, tokens=7, heads=3, kv=1, d=8, seed=0):
    """q, k as the attention makes them: (batch, heads, tokens, d) views of (batch, tokens, heads·d)
    projections (not contiguous), and real RoPE cos / sin of that dtype."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    gen = torch.Generator().manual_seed(seed)
    qp = torch.randn(batch, tokens, heads * d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    kp = torch.randn(batch, tokens, kv * d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv)
    x = torch.zeros(1, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(tokens)[None].expand(batch, tokens))
    q, k = (t.view(batch, tokens, -1, d).transpose(1, 2) for t in (qp, kp))
    return qp, kp, q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_node_gives_transformers_rope_and_its_gradients(dtype):
    qp, kp, q, k, cos, sin = _qk(dtype)
    assert rotary_applies(q, k, cos, sin)
    got, want = apply_rotary(q, k, cos, sin), _hf_rope(q, k, cos, sin)
    g = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(dtype) for i, t in enumerate(want)]
    grads_got = torch.autograd.grad(got, (qp, kp), g)
    grads_want = torch.autograd.grad(want, (qp, kp), g)
    # one fused multiply-add where the formula rounds twice: the last bit of some elements
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip((*got, *grads_got), (*want, *grads_want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert got[0].stride() == want[0].stride()  # the layout the attention kernels receive, unchanged


def test_gradcheck_with_halves_of_different_angles():
    # cos / sin whose two halves differ (not RoPE's repeated angles): the backward's half swap is the
    # transpose of the forward's, not only right where the halves agree
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64), torch.randn(2, 1, 5, 6, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: RotaryFn.apply(t, cos, sin), (x,))
    x1, x2 = x[..., :3], x[..., 3:]
    plain = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    torch.testing.assert_close(RotaryFn.apply(x, cos, sin), plain, rtol=1e-15, atol=1e-15)


def test_what_the_node_does_not_stand_for():
    _, _, q, k, cos, sin = _qk(torch.float32)
    assert rotary_applies(q, k, cos, sin)
    assert not rotary_applies(q, k, cos.double(), sin.double())                      # promoted by the formula
    assert not rotary_applies(q, k, cos.requires_grad_(), sin)                      # a gradient to cos
    cos = cos.detach()
    assert not rotary_applies(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])  # odd head dimension
    assert not rotary_applies(q, k, cos[..., :4], sin[..., :4])                    # partial rotation
    assert not rotary_applies(q, k, cos[:, :3], sin[:, :3])                        # other positions
    assert not rotary_applies(q, k[:1], cos, sin)                                  # other batches
    assert not rotary_applies(q, k, cos, sin[..., :4])


def _known_body(family: str = "Llama"):
    import transformers

    config = getattr(transformers, f"{family}Config")(hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
    module = getattr(transformers, f"{family}ForCausalLM").__module__
    attention = getattr(__import__(module, fromlist=["_"]), f"{family}Attention")(config, 0)
    body = forward_body(attention)
    if body is None or hashlib.sha256("\n".join(body).encode()).hexdigest() not in grouped.ATTENTION_BODIES:
        pytest.skip(f"this transformers' {family}Attention.forward is not one the RoPE node's forward stands for")


@pytest.fixture
def rope_calls(monkeypatch):
    calls = []
    real = RotaryFn.apply
    monkeypatch.setattr(RotaryFn, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["v_proj"], ["q_proj", "k_proj"]])
def test_the_llama_attention_with_the_node_equals_its_own_forward(rope_calls, use_cache, targets):
    _known_body()
    model = lora_llama(targets)
    model.config.use_cache = use_cache  # a cache made (and filled) in training: updated as the module does
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids)
    assert fuse_qkv_projections(model) == 2
    assert all(m.forward.variant.name == "llama" for m in model.modules()
               if isinstance(m.__dict__.get("forward"), grouped._FusedQKVForward))
    rope_calls.clear()
    result = loss_and_grads(model, ids)
    assert rope_calls == [(3, 4, 9, 8), (3, 2, 9, 8)] * 2  # q and k of both layers
    assert_same_in_float64(result, reference)
    assert unfuse_qkv_projections(model) == 2
    rope_calls.clear()
    assert_same_in_float64(loss_and_grads(model, ids), reference)
    assert rope_calls == []


def test_a_step_after_a_filled_cache_equals_its_own_forward(rope_calls):
    # keys and values of earlier tokens in the cache, gradients on: the new keys are appended after RoPE
    _known_body()
    model = lora_llama()
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        with torch.no_grad():
            cache = model(ids[:, :6], use_cache=True).past_key_values
        logits = model(ids[:, 6:], cache=cache, use_cache=True).logits
        return logits.detach(), torch.autograd.grad(logits.square().sum(), params)

    want = run()
    fuse_qkv_projections(model)
    rope_calls.clear()
    got = run()
    assert len(rope_calls) == 4
    assert_same_in_float64(got, want)


def test_an_attention_whose_rope_is_not_llama_s_keeps_its_own(rope_calls):
    # GLM's attention forward has the Llama text, but its apply_rotary_pos_emb rotates interleaved
    # pairs of half the dimensions: checked on numbers, the module keeps its own forward (with the
    # grouped projections)
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, pad_token_id=0)
    model = GlmForCausalLM(cfg).double()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.train()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids)
    assert fuse_qkv_projections(model) == 1
    attention = model.model.layers[0].self_attn
    assert attention.forward.variant is None and not grouped._rope_is_llama(attention)
    rope_calls.clear()
    assert_same_in_float64(loss_and_grads(model, ids), reference)
    assert rope_calls == []


def test_the_rope_check_is_made_once_per_attention_class(monkeypatch):
    _known_body()
    checks = []
    real = grouped.apply_rotary
    monkeypatch.setattr(grouped, "apply_rotary", lambda *a: checks.append(1) or real(*a))
    monkeypatch.setattr(grouped, "_VARIANTS", {})
    for _ in range(2):
        assert fuse_qkv_projections(lora_llama()) == 2
    assert checks == [1]


def test_hooks_on_the_projections_run_on_the_llama_path(rope_calls):
    # the projections are called as modules with the grouped outputs served: a forward hook that edits
    # q's output (activation steering) is applied as in the module's own forward
    _known_body()
    model = lora_llama()
    seen = []

    def steer(module, args, out):
        seen.append(out.shape)
        return out * 1.5

    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(steer)
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(2))
    reference = loss_and_grads(model, ids)
    fuse_qkv_projections(model)
    rope_calls.clear()
    seen.clear()
    result = loss_and_grads(model, ids)
    assert seen == [(2, 7, 32)] and len(rope_calls) == 4
    assert_same_in_float64(result, reference)
    handle.remove()


def test_cos_and_sin_the_node_does_not_stand_for_take_the_module_s_rope(rope_calls):
    # cos / sin in float32 for a float64 model: transformers' formula promotes; the node is not used
    _known_body()
    model = lora_llama()
    rotary_emb = model.model.rotary_emb
    real = type(rotary_emb).forward
    rotary_emb.forward = lambda x, position_ids: tuple(t.float() for t in real(rotary_emb, x, position_ids))
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    reference = loss_and_grads(model, ids)
    fuse_qkv_projections(model)
    rope_calls.clear()
    assert_same_in_float64(loss_and_grads(model, ids), reference)
    assert rope_calls == []


@pytest.mark.parametrize("family, variant", [("Qwen2", "qwen2"), ("Mistral", "mistral"), ("Qwen3", "qwen3"), ("Gemma", "llama")])
def test_the_other_known_attention_forwards_equal_their_own(rope_calls, monkeypatch, family, variant):
    # Qwen2's and Mistral's pass a sliding window to the attention function (set here, on one layer of
    # two for Qwen2), Qwen3's norms q and k per head before RoPE; Gemma's is Llama's text
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    windows = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda *a, **k: windows.append(k.get("sliding_window")) or sdpa(*a, **k))

    _known_body(family)
    extra = {"Qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
             "Mistral": dict(sliding_window=3), "Qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)}
    cfg = getattr(transformers, f"{family}Config")(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                                   **extra.get(family, {}))
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).double()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    model.config._attn_implementation = "sdpa"
    reference = loss_and_grads(model, ids)
    passed, windows[:] = list(windows), []
    assert fuse_qkv_projections(model) == 2
    assert [layer.self_attn.forward.variant.name for layer in model.model.layers] == [variant] * 2
    rope_calls.clear()
    assert_same_in_float64(loss_and_grads(model, ids), reference)
    assert len(rope_calls) == 4
    assert windows == passed and len(passed) == 2  # the same window arguments, layer by layer
    if family in extra:
        assert 3 in passed


def test_a_model_with_the_known_forwards_pickles_and_copies():
    import copy
    import pickle

    _known_body("Qwen2")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).double()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    fuse_qkv_projections(model)
    model.train()
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    reference = loss_and_grads(model, ids)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.model.layers[0].self_attn.forward.variant.name == "qwen2"
        assert_same_in_float64(loss_and_grads(other, ids), reference)
