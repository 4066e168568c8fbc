"""Misuse of the public Python API: a clear error naming what was wrong, and the model as it was.

From a report-only audit that called every public function with wrong types, orders and names and
compared the model with a snapshot after each failing call (374 calls)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lorakit as lk


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _assert_same(model, snap):
    sd, types = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert [type(m).__name__ for m in model.modules()] == types


@pytest.mark.parametrize("name", ["keys", "training", "to", "_parameters", "update", "forward"])
def test_an_adapter_name_the_parameter_stores_cannot_hold_is_refused_and_nothing_changes(name, tmp_path):
    # the ParameterDict refused the key after registering half of it, the rollback failed the same
    # way, and the model was left with a ghost adapter (or, for "_parameters", no state_dict at all)
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    fresh = tiny_llama()
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=rf"adapter name {name!r} is an attribute of the layers' parameter stores"):
        lk.get_lora_model(fresh, cfg, adapter_name=name)
    _assert_same(fresh, snap)
    assert "_lorakit" not in fresh.__dict__
    model = lk.get_lora_model(tiny_llama(), cfg)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="parameter stores"):
        lk.get_lora_model(model, cfg, adapter_name=name)
    lk.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="parameter stores"):
        lk.load_adapter(model, tmp_path / "a", adapter_name=name)
    with pytest.raises(ValueError, match="parameter stores"):
        lk.combine_adapters(model, {"default": 1.0}, name=name, method="cat")
    _assert_same(model, snap)
    assert lk.active_adapters(model) == ["default"] and list(model._lorakit.configs) == ["default"]


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", "no", "use_dora must be True or False"),      # a string turned DoRA on
    ("use_rslora", "no", "use_rslora must be True or False"),  # ... and rsLoRA's scaling
    ("fan_in_fan_out", None, "fan_in_fan_out must be True or False"),
    ("inference_mode", 1, "inference_mode must be True or False"),
    ("lora_dropout", "0.1", "lora_dropout must be a number"),  # saved as "0.1": PEFT could not load it
    ("lora_dropout", None, "lora_dropout must be a number"),
    ("target_modules", "[", "target_modules is not a valid regular expression"),
    ("exclude_modules", "(", "exclude_modules is not a valid regular expression"),
    ("rank_pattern", {"q_proj[": 4}, "rank_pattern key 'q_proj\\[' is not a valid regular expression"),
    ("alpha_pattern", {"(": 4.0}, "alpha_pattern key '\\(' is not a valid regular expression"),
    ("rank_pattern", "q_proj", "rank_pattern must be a dict"),
    ("rank_pattern", {5: 4}, "rank_pattern keys must be module names"),
    ("target_modules", ["all-linear", "embed_tokens"], "'all-linear' is a value of its own"),  # (matched only embed_tokens)
    ("init_lora_weights", "pisa", "unknown init_lora_weights 'pisa'.*'pissa'"),   # (failed only at injection)
    ("init_lora_weights", "pissa_niter_x", "'pissa_niter_x': expected 'pissa_niter_' and a number"),
    ("init_lora_weights", "corda", "'corda' is a PEFT initialisation lorakit does not implement"),
])
def test_config_fields_of_the_wrong_kind_are_refused_by_name(field, value, message):
    kw = {"r": 2, "target_modules": ["q_proj"], field: value}
    with pytest.raises((TypeError, ValueError), match=message):
        lk.LoraConfig(**kw)


@pytest.mark.parametrize("init", ["eva", "orthogonal", "mica"])
def test_a_peft_only_init_is_a_config_that_loads_but_makes_no_adapter(init):
    """PEFT 0.21's base-keeping inits: a file saying so loads (its tensors carry everything), so the
    config is valid; making an adapter with one is refused by name, the model unchanged."""
    config = lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=f"'{init}' is a PEFT initialisation lorakit does not implement"):
        lk.get_lora_model(model, config)
    _assert_same(model, snap)


def test_lora_dropout_is_stored_as_a_float():
    assert lk.LoraConfig(r=2, target_modules=["q"], lora_dropout=0).to_dict()["lora_dropout"] == 0.0


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_a_multihead_attentions_out_proj_is_never_a_silent_no_op():
    # MultiheadAttention reads out_proj.weight itself: a LoRA there changed nothing and trained nothing
    model = _WithAttention()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["out_proj"]))
    _assert_same(model, snap)
    excluded = lk.get_lora_model(_WithAttention(), lk.LoraConfig(r=2, target_modules=["out_proj", "fc"],
                                                                 exclude_modules=["mha.out_proj"]))
    assert [n for n, _ in lk.iter_lora_layers(excluded)] == ["fc"]  # excluded: skipped, not refused
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert [n for n, _ in lk.iter_lora_layers(model)] == ["fc"]
    x = torch.randn(3, 1, 8)
    with lk.disable_adapters(model):
        base = model(x)
    assert not torch.allclose(model(x), base)  # the adapter that was placed acts


def test_register_layer_type_checks_before_it_changes_the_registry():
    from lorakit.layers import LAYER_TYPES, register_layer_type

    before = dict(LAYER_TYPES)
    with pytest.raises(TypeError, match="needs an nn.Module class, got None"):
        register_layer_type(None)
    with pytest.raises(TypeError, match="decorates a LoraLayer subclass"):
        register_layer_type(nn.LSTM)(int)
    assert LAYER_TYPES == before
    model = tiny_llama()  # injection still works (a None entry broke every later one)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("wd", [-1.0, float("nan"), "x", True])
def test_loraplus_weight_decay_is_checked(wd):
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        lk.create_loraplus_optimizer(model, lr=1e-3, weight_decay=wd)


def test_calls_on_what_is_not_a_model_or_a_path_say_so():
    cfg = lk.LoraConfig(r=2, target_modules=["0"])
    for call in (lambda: lk.get_lora_model(None, cfg), lambda: lk.count_parameters("model"),
                 lambda: list(lk.iter_lora_layers(None)), lambda: lk.find_target_modules(5, cfg)):
        with pytest.raises(TypeError, match="expected a model \\(an nn.Module\\)"):
            call()
    with pytest.raises(TypeError, match="expected a lorakit LoraConfig"):
        lk.find_target_modules(nn.Sequential(nn.Linear(2, 2)), None)
    model = lk.get_lora_model(nn.Sequential(nn.Linear(4, 4)), cfg)
    for call in (lambda: lk.save_adapter(model, None), lambda: lk.load_adapter(copy.deepcopy(model), 5),
                 lambda: lk.hotswap_adapter(model, None)):
        with pytest.raises(TypeError, match="an adapter directory must be a path"):
            call()
    with pytest.raises(ValueError, match="has no LoRA adapters"):  # (a silent no-op, while merge refused)
        lk.unmerge(nn.Sequential(nn.Linear(4, 4)))


def test_quantize_skip_is_checked_and_a_string_is_one_name():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="skip entry '\\[' is not a valid regular expression"):
        lk.quantize_model_nf4(model, skip=["["])
    with pytest.raises(ValueError, match="block_size must be an integer"):
        lk.quantize_model_nf4(model, block_size="64")
    assert all(type(m) is nn.Linear for m in model)  # unchanged
    lk.quantize_model_nf4(model, skip="1")  # one name, not the letters of it
    assert [type(m).__name__ for m in model] == ["LinearNF4", "Linear"]


def test_train_refuses_all_linear_inside_a_list_before_loading():
    from lorakit.train.config import TrainConfig

    with pytest.raises(ValueError, match="all-linear is a value of its own, not a list entry"):
        TrainConfig(target_modules="all-linear,embed_tokens")
    assert TrainConfig(target_modules="q_proj,embed_tokens").target_modules == "q_proj,embed_tokens"
