"""benchmarks/time_to_quality.py: both runs start from the same adapter, and the time to a loss."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_quality as ttq  # noqa: E402

peft = pytest.importorskip("peft")


def test_shared_init_gives_lorakit_and_peft_the_same_adapter_in_the_libraries_range():
    # the two runs drew their A's in other orders: different adapters for the same seed (a review, /tmp/bench23)
    import lorakit as lk
    from conftest import tiny_llama

    ours, theirs = tiny_llama(), tiny_llama()
    lk.get_lora_model(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert ttq.shared_init(ours, 3) == ttq.shared_init(theirs, 3) == 14  # (2 layers x 7 projections)
    a = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    b = {n.removeprefix("base_model.model.").removesuffix(".weight"): p for n, p in theirs.named_parameters()
         if ".lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, p in a.items():
        if ".lora_B." in name:
            assert not p.any()
        else:
            bound = 1 / p.shape[1] ** 0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound and p.std() > 0.4 * bound
    before = {k: v.clone() for k, v in a.items()}
    ttq.shared_init(ours, 4)  # another seed: other values
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.lora_A.default"],
                           a["model.layers.0.self_attn.q_proj.lora_A.default"])


def test_time_to_interpolates_the_first_crossing():
    curve = [(0.0, 1.0), (10.0, 0.5), (20.0, 0.2), (30.0, 0.3)]
    assert ttq.time_to(curve, 0.5) == 10.0
    assert ttq.time_to(curve, 0.35) == pytest.approx(15.0)
    assert ttq.time_to(curve, 0.25) == pytest.approx(10 + 10 * 0.25 / 0.3)
    assert ttq.time_to(curve, 0.1) is None
    assert ttq.time_to(curve, 1.5) == 0.0
