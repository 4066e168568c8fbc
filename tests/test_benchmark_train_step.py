"""benchmarks/train_step.py times the attention alone as the model's training step runs it."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_step import attention_step  # noqa: E402


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
