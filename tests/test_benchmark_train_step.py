"""benchmarks/train_step.py times the attention alone as the model's training step runs it."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_step import attention_step, make_batch, setup  # noqa: E402


def _sdpa_calls(monkeypatch, fn) -> list[tuple]:
    """The (q, k, v shapes, dtype, causal, backward taken) of every SDPA call ``fn`` makes."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, kwargs.get("is_causal"),
                      kwargs.get("enable_gqa", False), q.requires_grad))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fn()
    monkeypatch.undo()
    return calls


def test_attention_step_makes_the_models_own_attention_calls(monkeypatch):
    model = tiny_llama().train()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(3, 100, (3, 7))
    model_calls = _sdpa_calls(monkeypatch, lambda: model(ids, labels=ids).loss.backward())
    step = attention_step(model.config, tuple(ids.shape), "fp32")
    step_calls = _sdpa_calls(monkeypatch, step)
    assert len(model_calls) == model.config.num_hidden_layers
    assert step_calls == model_calls  # same count, shapes, dtype, causal flag, with gradients
    seconds = step()
    assert seconds[0] == seconds[1] > 0  # (whole, forward + backward): attention has no optimizer step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_step_with_lorakits_products_gives_the_plain_full_steps_gradients(dtype, monkeypatch):
    """``setup("full")`` multiplies through lorakit.layers.gemm (oneDNN in fp32, as the LoRA steps it
    is compared with): every weight's gradient as the model's own modules give it (float64: torch's
    ops, the same bits; float32: within rounding)."""
    import copy

    from lorakit.layers import gemm
    from lorakit.train.generate import loss_sum

    model = tiny_llama().to(dtype).train()
    batch = make_batch("lm", 101, (2, 9))
    plain = copy.deepcopy(model)
    patched, loss_fn = setup("full", model, batch)
    linears = [m for m in patched.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 15 and all("forward" in m.__dict__ for m in linears)  # 2 x 7, and the head
    calls, real = [], gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: calls.append(1) or real(*a))
    loss_fn().backward()
    assert len(calls) >= 2 * 2 * 7  # each layer's forward and dL/dW
    loss, n = loss_sum(plain, batch)
    (loss / n).backward()
    got = dict(patched.named_parameters())
    for name, p in plain.named_parameters():
        if dtype == torch.float64:
            assert torch.equal(got[name].grad, p.grad), name
        else:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_step_products_with_a_bias(dtype):
    """same_products_for_full on linear layers with a bias (Qwen2's q/k/v) and without: every
    nn.Linear patched (the count returned), outputs and gradients, the bias's included, as the
    modules' own."""
    import copy

    from train_step import same_products_for_full

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6, bias=False)).to(dtype)
    plain = copy.deepcopy(model)
    assert same_products_for_full(model) == 2
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = model(x), plain(x2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    up = torch.randn_like(out)
    out.backward(up)
    ref.backward(up)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


_REFAULTS = """
import resource, torch
torch.empty(50_000_000).fill_(1.0)  # 200 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(37_500_000).fill_(1.0)  # 150 MB (the same size would not fit the hole: alignment takes a few bytes more)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's tunables")
def test_the_full_workers_allocator_keeps_freed_memory(monkeypatch):
    """The LoRA ÷ full worker's GLIBC_TUNABLES make a second model-sized buffer reuse the first's pages
    (glibc's defaults map it anew: ~37,000 page faults for 150 MB), and keep a caller's own tunables."""
    import train_step

    def refaults(env):
        out = subprocess.run([sys.executable, "-c", _REFAULTS], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # (with 2 MB pages a fresh map faults ~100 times)
        assert refaults(base) > 30_000
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert refaults(dict(base, GLIBC_TUNABLES=train_step.keep_freed_tunables())) < 1_000
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert train_step.keep_freed_tunables() == "glibc.malloc.arena_max=2:" + train_step.KEEP_FREED
