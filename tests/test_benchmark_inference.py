"""benchmarks/inference.py builds its unmerged models on the base model's own tensors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import lorakit as lk
from lorakit.layers.base import LoraLayer

peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from inference import main, sharing_weights  # noqa: E402


def test_sharing_weights_copies_modules_but_not_tensors():
    base = tiny_llama().eval()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        before = base(ids).logits
    copy = sharing_weights(base)
    assert copy is not base
    for (name, p), q in zip(base.named_parameters(), copy.parameters()):
        assert p is q, name
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ours = lk.get_lora_model(copy, lk.LoraConfig(**cfg)).eval()
    theirs = peft.get_peft_model(sharing_weights(base), peft.LoraConfig(**cfg)).eval()
    with torch.no_grad():
        # the base model is untouched by the injections into its copies (its modules are its own)
        assert torch.equal(base(ids).logits, before)
        assert not torch.allclose(ours(ids).logits, before)
        assert not torch.allclose(theirs(ids).logits, before)
        with lk.disable_adapters(ours):
            assert torch.equal(ours(ids).logits, before)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


def test_bad_thread_count_is_refused_before_any_model_loads(capsys, monkeypatch):
    import lorakit.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer", no_load)
    with pytest.raises(SystemExit) as exc:
        main(["--threads", "0"])
    assert exc.value.code == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_ratio_stats_gives_the_interquartile_range_for_many_rounds():
    from _common import ratio_stats

    values = [1.0 + i / 100 for i in range(9)]  # 1.00 ... 1.08
    assert ratio_stats(values) == "1.040 (1.000–1.080)"
    assert ratio_stats(values, quartiles=True) == "1.040 (IQR 1.015–1.065)"  # quartiles of 9 points: 2.5th, 7.5th
    assert ratio_stats(values[:5], quartiles=True) == "1.020 (1.000–1.040)"  # too few rounds: min–max
