"""transformers' own save_pretrained and adapter methods on a model lorakit injected into.

save_pretrained (which transformers.Trainer calls for its checkpoints and save_model) wrote the
whole model under lorakit's in-memory names, which from_pretrained loaded with every adapted weight
freshly initialised; the PEFT-integration methods worked on transformers' PEFT adapters instead.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import io
import json

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import tiny_llama

IDS = torch.tensor([[5, 9, 3, 7, 11, 4]])


def _two_adapters():
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False),
                      adapter_name="other")
    return model


def test_save_pretrained_writes_the_adapters_in_peft_layout_that_peft_and_lorakit_load(tmp_path):
    import peft
    from safetensors.torch import load_file

    model = _two_adapters()
    lk.set_trainable(model, ["default"])
    assert model.save_pretrained(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "model.safetensors", "other"]
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2
    assert not (tmp_path / "config.json").exists()  # (from_pretrained never takes it for a whole model)
    # model.safetensors: the trainable tensors under their in-memory names, for transformers.Trainer
    trainer_file = load_file(tmp_path / "model.safetensors")
    assert trainer_file.keys() == {n for n, p in model.named_parameters() if p.requires_grad} != set()
    with torch.no_grad():
        want = model(IDS).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(IDS).logits
        torch.testing.assert_close(theirs, want, rtol=0, atol=1e-6)
        lk.set_adapter(model, "other")
        want_other = model(IDS).logits
        ours = lk.load_adapter(tiny_llama(), tmp_path / "other", adapter_name="other").eval()(IDS).logits
        assert torch.equal(ours, want_other)


def test_save_pretrained_options(tmp_path):
    model = _two_adapters()
    model.save_pretrained(tmp_path / "sel", selected_adapters=["other"], state_dict=model.state_dict())
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["other"]  # (Trainer's file: full saves only)
    model.save_pretrained(tmp_path / "later", is_main_process=False)  # a later process of a distributed run
    assert not (tmp_path / "later").exists()
    with pytest.raises(ValueError, match="'nope'.*'default', 'other'"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])
    for kwargs, named in (({"safe_serialization": False}, "safe_serialization=False.*merge_and_unload"),
                          ({"push_to_hub": True}, "push_to_hub.*upload_folder"),
                          ({"path_initial_model_for_weight_conversion": "x"}, "convert_to_lora=True"),
                          ({"variant": "fp16"}, "variant.*merge_and_unload")):
        with pytest.raises(TypeError, match=named):
            model.save_pretrained(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
    model.save_pretrained(tmp_path / "peft_defaults", save_embedding_layers="auto", max_shard_size="5GB")
    assert (tmp_path / "peft_defaults" / "adapter_model.safetensors").is_file()


def test_trainer_checkpoints_hold_the_adapter_and_resume_and_best_model_load_them(tmp_path):
    """The checkpoints became adapters (PEFT's format); Trainer then found no weights it could read
    back: resume_from_checkpoint and load_best_model_at_end failed (caught by a review)."""
    from transformers import Trainer, TrainingArguments

    def fresh():
        model = tiny_llama()
        lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        return model

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 101, (8, 12), generator=g)]
    kw = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, learning_rate=1e-2, disable_tqdm=True,
              save_steps=1, seed=0)
    model = fresh()
    Trainer(model=model, args=TrainingArguments(str(tmp_path / "a"), max_steps=2, **kw), train_dataset=data).train()
    for d in (tmp_path / "a" / "checkpoint-1", tmp_path / "a" / "checkpoint-2"):
        assert (d / "adapter_model.safetensors").is_file() and not (d / "config.json").exists()
    resumed = fresh()
    Trainer(model=resumed, args=TrainingArguments(str(tmp_path / "a"), max_steps=2, **kw),
            train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    model.eval(), resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(IDS).logits, model(IDS).logits)
        reloaded = lk.load_adapter(tiny_llama(), tmp_path / "a" / "checkpoint-2")(IDS).logits
        assert torch.equal(reloaded, model(IDS).logits)
        assert not torch.equal(reloaded, tiny_llama()(IDS).logits)  # (it trained)
    best = fresh()
    trainer = Trainer(model=best, args=TrainingArguments(str(tmp_path / "b"), max_steps=2, eval_strategy="steps",
                                                         eval_steps=1, load_best_model_at_end=True, **kw),
                      train_dataset=data, eval_dataset=data[:4])
    trainer.train()  # (raised FileNotFoundError: pytorch_model.bin)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_peft_integration_methods_use_lorakits_or_name_it(tmp_path):
    model = _two_adapters()
    assert model.active_adapters() == ["default"]
    model.set_adapter("other")
    assert lk.active_adapters(model) == ["other"]
    model.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call, use in ((lambda: model.load_adapter(str(tmp_path)), "lorakit.load_adapter"),
                      (lambda: model.add_adapter(None), "lorakit.get_lora_model"),
                      (lambda: model.disable_adapters(), "lorakit.disable_adapters"),
                      (lambda: model.enable_adapters(), "lorakit.disable_adapters"),
                      (lambda: model.get_adapter_state_dict(), "lorakit.adapter_state_dict")):
        with pytest.raises(TypeError, match=use):
            call()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    model.delete_adapter(["default"])
    assert lk.active_adapters(model) == ["other"] and list(lk.inject.require_state(model).configs) == ["other"]


def test_unload_gives_back_transformers_methods_and_copies_keep_their_own(tmp_path):
    from transformers import PreTrainedModel

    model = _two_adapters()
    clone = copy.deepcopy(model)
    assert clone.save_pretrained.args[0] is clone
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.save_pretrained(tmp_path / "pickled")
    assert (tmp_path / "pickled" / "adapter_model.safetensors").is_file()
    lk.merge_and_unload(model)
    assert "save_pretrained" not in model.__dict__ and "set_adapter" not in model.__dict__
    assert model.save_pretrained.__func__ is PreTrainedModel.save_pretrained
    model.save_pretrained(tmp_path / "merged")  # a plain model again
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    lk.unload(clone)
    assert not any(n in clone.__dict__ for n in ("save_pretrained", "load_adapter", "active_adapters"))


def test_only_transformers_models_and_their_unchanged_methods_are_given_lorakits():
    from transformers import LlamaForCausalLM

    plain = nn.Sequential(nn.Linear(4, 4))
    lk.get_lora_model(plain, lk.LoraConfig(r=2, target_modules=["0"]))
    assert "save_pretrained" not in plain.__dict__ and not hasattr(plain, "save_pretrained")

    class OwnAdapters(LlamaForCausalLM):  # (as wav2vec2's language adapters)
        def load_adapter(self, target_lang):
            return target_lang

    model = OwnAdapters(tiny_llama().config)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.load_adapter("spa") == "spa" and "save_pretrained" in model.__dict__


def test_a_first_injection_that_fails_leaves_transformers_methods(monkeypatch, tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a.b")
    model2 = tiny_llama()

    def boom(self, *a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(lk.layers.LoraLayer, "add_adapter", boom)
    with pytest.raises(RuntimeError, match="boom"):
        lk.get_lora_model(model2, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.undo()
    # a load that fails after the injection (a Ctrl-C while the tensors are copied in)
    saved = tiny_llama()
    lk.get_lora_model(saved, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(saved, tmp_path)
    model3 = tiny_llama()
    monkeypatch.setattr(lk.io, "check_fits", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        lk.load_adapter(model3, tmp_path)
    for m in (model, model2, model3):
        assert not any(n in m.__dict__ for n in ("_lorakit", "save_pretrained", "set_adapter", "load_adapter"))


def test_deleting_the_last_adapter_gives_back_the_plain_model(tmp_path):
    """The model kept an empty lorakit state and lorakit's save_pretrained, which then refused to save,
    and unload / merge_and_unload refused too ("no LoRA adapters")."""
    from transformers import PreTrainedModel

    model = _two_adapters()
    model.delete_adapter(["default", "other"])
    assert not any(n in model.__dict__ for n in ("_lorakit", "save_pretrained", "active_adapters"))
    assert model.save_pretrained.__func__ is PreTrainedModel.save_pretrained
    assert not list(lk.iter_lora_layers(model)) and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, tiny_llama()(IDS).logits)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))  # starts afresh
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()


def test_peft_style_delete_checks_every_name_first_and_inference_mode_freezes():
    model = _two_adapters()
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter(["default", "nope"])  # ("default" was gone before the error, which named neither)
    assert list(lk.inject.require_state(model).configs) == ["default", "other"]
    with pytest.warns(UserWarning, match="created frozen.*inference_mode=True"):
        frozen = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], inference_mode=True))
    assert lk.count_parameters(frozen)[0] == 0  # (trained 512 numbers where PEFT trains none)


def test_a_model_with_transformers_own_peft_adapters_keeps_their_methods():
    model = tiny_llama()
    model._hf_peft_config_loaded = True  # (as transformers' add_adapter / load_adapter set it)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "save_pretrained" in model.__dict__
    assert not any(n in model.__dict__ for n in ("set_adapter", "enable_adapters", "disable_adapters", "load_adapter"))


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


def test_enable_peft_hotswap_is_refused_naming_hotswap_adapter():  # H02
    model = _two_adapters()
    with pytest.raises(TypeError, match=r"lorakit\.hotswap_adapter"):
        model.enable_peft_hotswap()


def test_save_pretrained_takes_transformers_harmless_keywords(tmp_path):  # H08, H09, H10
    model = _two_adapters()
    model.save_pretrained(tmp_path / "a", save_peft_format=True, token="hf_dummy", variant=None,
                          distributed_checkpoint=False, push_to_hub=False)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_save_pretrained_with_no_selected_adapter_is_refused(tmp_path):  # H12, H13
    model = _two_adapters()
    with pytest.raises(ValueError, match="selected_adapters"):
        model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not (tmp_path / "none").exists()


def test_an_adapter_name_with_a_slash_is_refused_by_save_pretrained(tmp_path):  # H14
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="x/y")
    with pytest.raises(ValueError, match="path separator"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_frozen_model_writes_no_trainer_weights_file(tmp_path):  # H18
    with pytest.warns(UserWarning, match="created frozen"):
        model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], inference_mode=True))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors").exists()


def test_a_non_contiguous_trainable_parameter_is_saved(tmp_path):  # H19
    from safetensors.torch import load_file

    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    n = model.model.norm.weight.numel()
    strided = nn.Parameter(torch.arange(2 * n, dtype=torch.float32)[::2])  # a view: not contiguous
    assert not strided.is_contiguous()
    model.model.norm.weight = strided  # (trained alongside the adapter)
    model.save_pretrained(tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["model.norm.weight"], strided.detach())


def test_delete_adapter_takes_a_single_name():  # H23
    model = _two_adapters()
    model.delete_adapter("default")
    assert list(lk.inject.require_state(model).configs) == ["other"]


def test_active_adapters_lists_every_active_adapter():  # H24
    model = _two_adapters()
    lk.set_adapter(model, ["default", "other"])
    assert model.active_adapters() == lk.active_adapters(model) == ["default", "other"]


def test_a_plain_module_is_injected_without_transformers_imported():  # H26
    code = ("import sys, torch.nn as nn, lorakit as lk\n"
            "m = lk.get_lora_model(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(r=2, target_modules=['0']))\n"
            "lk.unload(m)\n"
            "print('transformers.modeling_utils' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_model_class_with_its_own_save_pretrained_keeps_it():  # H29
    from transformers import LlamaForCausalLM

    class OwnSave(LlamaForCausalLM):
        def save_pretrained(self, directory, **kwargs):
            return ("own", directory)

    model = OwnSave(tiny_llama().config)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert "save_pretrained" not in model.__dict__ and model.save_pretrained("d") == ("own", "d")
    assert "set_adapter" in model.__dict__  # (the adapter methods are still lorakit's)


def test_a_method_the_user_set_on_the_instance_is_kept_through_injection_and_unload():  # H30, H32
    model = tiny_llama()

    def mine(*args, **kwargs):
        return "mine"
    model.save_pretrained = mine
    model.load_adapter = mine
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.save_pretrained is mine and model.load_adapter is mine
    assert "set_adapter" in model.__dict__
    lk.unload(model)
    assert model.save_pretrained is mine and model.load_adapter is mine
    assert "set_adapter" not in model.__dict__


def test_the_trainer_weights_file_says_its_format(tmp_path):  # H20
    from safetensors import safe_open

    model = _two_adapters()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"  # (what transformers' loaders check)


def test_an_unknown_selected_adapter_writes_nothing(tmp_path):  # H34
    model = _two_adapters()
    with pytest.raises(ValueError, match="'nope'.*'default', 'other'"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["default", "nope"])
    assert not (tmp_path / "bad").exists()  # (checked before anything is written)


def test_repeated_names_and_transformers_defaults_passed_explicitly(tmp_path):
    """(mutation round 7's bugs) delete_adapter(["other", "other"]) deleted it, then raised "unknown
    adapter"; save_pretrained refused save_original_format=True, transformers' own default."""
    model = _two_adapters()
    model.delete_adapter(["other", "other"])
    assert list(lk.inject.require_state(model).configs) == ["default"]
    model.save_pretrained(tmp_path, save_original_format=True, distributed_checkpoint=False, variant=None)
    assert (tmp_path / "adapter_model.safetensors").is_file()



def test_review11_a_wrapped_models_keys_a_models_own_weights_a_ctrl_c_and_stale_files(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = _two_adapters()
    lk.set_trainable(model, ["default"])
    # Trainer hands a torch.compile'd model's state_dict ("_orig_mod." keys) and loads the file back
    # into that wrapper: the names must be the wrapper's (they matched nothing, and the resume
    # silently started from a fresh adapter)
    wrapped = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "compiled", state_dict=wrapped)
    keys = set(load_file(tmp_path / "compiled" / "model.safetensors"))
    assert keys == {"_orig_mod." + n for n, p in model.named_parameters() if p.requires_grad}
    # a directory holding a model's own weights (the base model's directory) is never overwritten
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "base")
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not written by lorakit"):
        model.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "base" / "adapter_config.json").exists()
    # lorakit's own file is replaced, and removed where nothing trains any more (it would be loaded back)
    model.save_pretrained(tmp_path / "again")
    lk.set_trainable(model, [])
    model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / "model.safetensors").exists()
    # a Ctrl-C during a first injection leaves nothing (it left the state, the methods, half-wrapped layers)
    fresh = tiny_llama()

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(lk.layers.LoraLayer, "add_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lk.get_lora_model(fresh, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not any(n in fresh.__dict__ for n in ("_lorakit", "save_pretrained")) and not list(lk.iter_lora_layers(fresh))


def test_a_submodule_named_module_keeps_its_name_in_the_trainer_file(tmp_path):
    """(the wrapper prefixes "module." / "_orig_mod." are stripped only from names the model lacks)"""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    class WithModule(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.module = nn.Linear(4, 4)

    model = WithModule(tiny_llama().config)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["module"]))
    model.save_pretrained(tmp_path, state_dict=model.state_dict())
    assert set(load_file(tmp_path / "model.safetensors")) == {"module.lora_A.default", "module.lora_B.default"}


def test_trainer_resuming_reports_no_frozen_weight_missing(tmp_path, monkeypatch):
    """Trainer loads lorakit's checkpoint (the trainable tensors) with load_state_dict(strict=False)
    and logged every frozen weight as "missing keys in the checkpoint model loaded"."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 101, (4, 12), generator=g)]
    kw = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, save_steps=1)

    def fresh():
        return lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    Trainer(model=fresh(), args=TrainingArguments(str(tmp_path), max_steps=1, **kw), train_dataset=data).train()
    reported = []
    monkeypatch.setattr(Trainer, "_issue_warnings_after_load", lambda self, result: reported.append(result))
    Trainer(model=fresh(), args=TrainingArguments(str(tmp_path), max_steps=2, **kw),
            train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert len(reported) == 1 and reported[0].missing_keys == [] and reported[0].unexpected_keys == []


def test_only_a_load_of_exactly_the_trainable_tensors_is_quiet_about_the_frozen_ones():
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert model.load_state_dict(trainable, strict=False).missing_keys == []
    one_less = dict(list(trainable.items())[1:])
    assert len(model.load_state_dict(one_less, strict=False).missing_keys) > len(trainable)  # (all of them, as torch)
    with_extra = {**trainable, "not.a.key": torch.zeros(1)}
    result = model.load_state_dict(with_extra, strict=False)
    assert result.unexpected_keys == ["not.a.key"] and "model.norm.weight" in result.missing_keys
    full = model.state_dict()
    del full["model.norm.weight"]
    assert model.load_state_dict(full, strict=False).missing_keys == ["model.norm.weight"]
    frozen = copy.deepcopy(model).requires_grad_(False)  # (nothing trainable: a load of nothing is no match)
    assert "model.norm.weight" in frozen.load_state_dict({}, strict=False).missing_keys
    with pytest.raises(RuntimeError, match="Missing key"):
        frozen.load_state_dict({})
    twin = copy.deepcopy(model)
    lk.unload(model)  # (the hook goes with lorakit; the copy keeps its own)
    assert "model.norm.weight" in model.load_state_dict({}, strict=False).missing_keys
    assert twin.load_state_dict({k: v for k, v in twin.state_dict().items() if "lora_" in k}, strict=False).missing_keys == []
