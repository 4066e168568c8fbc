"""LoRA+: B's learning rate is ratio x A's; nothing else changes."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from conftest import tiny_llama


def _model(**kw):
    return lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False, **kw))


def test_groups_cover_every_trainable_parameter_once():
    m = _model(use_dora=True)
    groups = lk.loraplus_param_groups(m, lr=1e-3, ratio=16, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_A"]["lr"] == 1e-3 and by_name["lora_B"]["lr"] == pytest.approx(16e-3)
    assert by_name["other_no_decay"]["weight_decay"] == 0.0  # DoRA magnitudes
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in by_name["lora_B"]["params"])
    assert all(".lora_A." in names[id(p)] for p in by_name["lora_A"]["params"])


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_no_weight_decay_on_dora_magnitudes_of_any_shape():
    """A Conv2d's DoRA magnitude is (1, out, 1, 1): chosen by its dimension count, it was decayed
    towards zero (and with it the layer's output) in LoRA+'s groups and in `lorakit train`'s."""
    from types import SimpleNamespace

    from lorakit.train.loop import _make_optimizer

    m = lk.get_lora_model(_ConvNet(), lk.LoraConfig(r=2, target_modules=["conv", "fc"], use_dora=True))
    magnitudes = {id(p) for n, p in m.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 and {p.dim() for n, p in m.named_parameters() if "magnitude" in n} == {1, 4}
    by_name = {g["name"]: g for g in lk.loraplus_param_groups(m, lr=1e-3, weight_decay=0.1)}
    assert {id(p) for p in by_name["other_no_decay"]["params"]} == magnitudes
    assert "other" not in by_name
    params = [p for p in m.parameters() if p.requires_grad]
    cfg = SimpleNamespace(lora_plus_ratio=0, learning_rate=1e-3, weight_decay=0.1)
    for group in _make_optimizer(m, params, cfg).param_groups:
        assert (group["weight_decay"] == 0.0) == any(id(p) in magnitudes for p in group["params"])
        assert all(id(p) in magnitudes for p in group["params"]) or not any(id(p) in magnitudes for p in group["params"])


def test_one_sgd_step_moves_b_ratio_times_further():
    torch.manual_seed(0)
    x = torch.randint(0, 101, (2, 7))
    moved = {}
    for ratio in (1.0, 8.0):
        m = _model()
        start = copy.deepcopy({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        opt = lk.create_loraplus_optimizer(m, lr=0.01, ratio=ratio, optimizer_cls=torch.optim.SGD)
        m(x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        moved[ratio] = {n: (p.detach() - start[n]) for n, p in m.named_parameters() if p.requires_grad}
    for n, d in moved[8.0].items():
        factor = 8.0 if ".lora_B." in n else 1.0
        torch.testing.assert_close(d, factor * moved[1.0][n], rtol=1e-4, atol=1e-7)


def test_embedding_lr_and_bad_input():
    groups = lk.loraplus_param_groups(_model(), lr=1e-3, lr_embedding=1e-6)
    emb = next(g for g in groups if g["name"] == "lora_embedding")
    assert emb["lr"] == 1e-6 and len(emb["params"]) == 2
    with pytest.raises(ValueError, match="ratio must be a positive finite number, got 0"):
        lk.loraplus_param_groups(_model(), lr=1e-3, ratio=0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            lk.loraplus_param_groups(_model(), lr=bad)
    with pytest.raises(ValueError, match="no trainable parameters"):
        m = _model()
        for p in m.parameters():
            p.requires_grad_(False)
        lk.loraplus_param_groups(m, lr=1e-3)


# Z2: trainable biases (1-D) are not decayed, in LoRA+'s groups and in lorakit train's optimizer
def test_no_weight_decay_on_trainable_biases():
    from types import SimpleNamespace

    from lorakit.train.loop import _make_optimizer

    m = lk.get_lora_model(_ConvNet(), lk.LoraConfig(r=2, target_modules=["conv", "fc"], bias="lora_only"))
    biases = {id(p) for n, p in m.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert len(biases) == 2
    by_name = {g["name"]: g for g in lk.loraplus_param_groups(m, lr=1e-3, weight_decay=0.1)}
    assert {id(p) for p in by_name["other_no_decay"]["params"]} == biases
    assert by_name["other_no_decay"]["weight_decay"] == 0.0
    params = [p for p in m.parameters() if p.requires_grad]
    cfg = SimpleNamespace(lora_plus_ratio=0, learning_rate=1e-3, weight_decay=0.1)
    for group in _make_optimizer(m, params, cfg).param_groups:
        assert (group["weight_decay"] == 0.0) == any(id(p) in biases for p in group["params"])


def test_peft_keyword_names_are_taken():
    """PEFT's loraplus_lr_ratio / loraplus_lr_embedding reached AdamW, whose TypeError named neither."""
    ours = lk.create_loraplus_optimizer(_model(), lr=1e-3, ratio=8, lr_embedding=1e-6)
    peftish = lk.create_loraplus_optimizer(_model(), lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-6)
    assert [(g["name"], g["lr"]) for g in peftish.param_groups] == [(g["name"], g["lr"]) for g in ours.param_groups]
    decayed = lk.create_loraplus_optimizer(_model(), lr=1e-3, loraplus_weight_decay=0.1)
    assert {g["weight_decay"] for g in decayed.param_groups if g["name"] in ("lora_A", "lora_B")} == {0.1}
    assert any(g["lr"] == 8e-3 for g in peftish.param_groups) and any(g["lr"] == 1e-6 for g in peftish.param_groups)
    with pytest.raises(TypeError, match="loraplus_lr_ratio.*ratio.*give one"):
        lk.create_loraplus_optimizer(_model(), lr=1e-3, ratio=4, loraplus_lr_ratio=8)


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


def test_the_same_ratio_under_both_names_is_taken():  # L04
    opt = lk.create_loraplus_optimizer(_model(), lr=1e-3, ratio=8, loraplus_lr_ratio=8)
    assert any(g["lr"] == 8e-3 for g in opt.param_groups)
    opt = lk.create_loraplus_optimizer(_model(), lr=1e-3, weight_decay=0.1, loraplus_weight_decay=0.1)
    assert {g["weight_decay"] for g in opt.param_groups if g["name"] in ("lora_A", "lora_B")} == {0.1}


def test_an_explicit_ratio_equal_to_the_default_still_conflicts_with_peft_s_name():
    # (ratio=16.0 was taken for "not given", and loraplus_lr_ratio=8 silently won)
    with pytest.raises(TypeError, match="give one"):
        lk.create_loraplus_optimizer(_model(), lr=1e-3, ratio=16.0, loraplus_lr_ratio=8)
    assert any(g["lr"] == 16e-3 for g in lk.create_loraplus_optimizer(_model(), lr=1e-3).param_groups)
