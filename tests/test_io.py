"""PEFT on-disk format: golden keys, interoperability with PEFT 0.21.2 both ways, and bad input."""
from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from conftest import TinyConvNet, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def llama_input():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def test_golden_keys_and_shapes(tmp_path):
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    lk.save_adapter(m, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    golden = {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 101),
              "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4)}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn"
        golden.update({f"{p}.q_proj.lora_A.weight": (4, 32), f"{p}.q_proj.lora_B.weight": (32, 4),
                       f"{p}.v_proj.lora_A.weight": (4, 32), f"{p}.v_proj.lora_B.weight": (16, 4)})
    assert shapes == golden
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["embed_tokens", "q_proj", "v_proj"]
    for key in ("use_rslora", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "modules_to_save",
                "lora_dropout", "init_lora_weights", "task_type", "base_model_name_or_path"):
        assert key in cfg


def test_gpt2_conv1d_keys_use_linear_shapes(tmp_path):
    g = lk.get_lora_model(tiny_gpt2(), lk.LoraConfig(r=2, target_modules=["c_attn"]))
    lk.save_adapter(g, tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 32)
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 2)


# ---- interoperability with PEFT --------------------------------------------------------------------

def _peft_config(**kw):
    return peft.LoraConfig(init_lora_weights=False, **kw)


CASES = {
    "llama_qv": (tiny_llama, llama_input, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_all_linear_rslora_patterns": (tiny_llama, llama_input, dict(
        r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
        rank_pattern={"layers.0.mlp.down_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama_embedding": (tiny_llama, llama_input, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama_modules_to_save": (tiny_llama, llama_input, dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "gpt2_conv1d_bias": (tiny_gpt2, lambda: torch.randint(0, 97, (2, 9)), dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only")),
    "conv2d": (TinyConvNet, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
               dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])),
    # PEFT's task wrapper adds modules_to_save ["classifier", "score"]; this model has only `score`
    "llama_seq_cls": (lambda: tiny_llama_classifier(), llama_input,
                      dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
    # bias="all" with a modules_to_save head that has a bias: PEFT also writes head.modules_to_save.bias
    # and head.original_module.bias (refused before as keys for "another model")
    "conv2d_bias_all_saved_head": (TinyConvNet, lambda: torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                                   dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"], bias="all", modules_to_save=["head"])),
    # a scaled embedding (embed_scale = sqrt(48)): PEFT scales the LoRA rows too
    "gemma_scaled_embedding": (lambda: tiny_gemma(), llama_input, dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])),
    "gemma_scaled_embedding_dora": (lambda: tiny_gemma(), llama_input,
                                    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    # modules_to_save entries are plain suffixes in PEFT: "classifier" also names pre_classifier
    "modules_to_save_suffix": (lambda: TwoHeads(), lambda: torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),
                               dict(r=2, lora_alpha=4, target_modules=["body"], modules_to_save=["classifier"])),
}


def tiny_llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, pad_token_id=0, tie_word_embeddings=False)).eval()


def test_a_scaled_embeddings_update_is_scaled_so_merged_equals_unmerged():
    """Gemma's embedding multiplies its lookups by embed_scale: the LoRA rows must be scaled too, or
    the unmerged model computes another thing than the merged one (0.95 relative before)."""
    m = lk.get_lora_model(tiny_gemma(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                                      init_lora_weights=False))
    scale = float(m.model.embed_tokens.base_layer.embed_scale)
    assert abs(scale - 48 ** 0.5) < 1e-5
    x = llama_input()
    unmerged = _out(m, x)
    torch.testing.assert_close(_out(lk.merge_and_unload(m), x), unmerged, rtol=1e-5, atol=1e-5)


class TwoHeads(torch.nn.Module):
    """DistilBERT's head layout: ``pre_classifier`` then ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.pre_classifier = torch.nn.Linear(16, 16)
        self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.pre_classifier(torch.relu(self.body(x)))))


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _randomise_extras(model):
    """Give modules_to_save copies and trainable biases non-trivial values (PEFT starts them as copies)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in n:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saves_lorakit_loads(case, tmp_path):
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    fresh = copy.deepcopy(base)
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(**kw)).eval()
    _randomise_extras(pm)
    pm.save_pretrained(tmp_path)
    x = make_x()
    expected = _out(pm, x)
    assert (expected - _out(base, x)).abs().max() > 1e-4  # the adapter really does something
    loaded = lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_out(loaded, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_saves_peft_loads(case, tmp_path):
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    fresh = copy.deepcopy(base)
    m = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(init_lora_weights=False, **kw))
    _randomise_extras(m)
    lk.save_adapter(m, tmp_path)
    x = make_x()
    expected = _out(m, x)
    assert (expected - _out(base, x)).abs().max() > 1e-4
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(_out(pm, x), expected, rtol=1e-5, atol=1e-5)


def test_merged_model_matches_peft_merge(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(r=4, lora_alpha=8, target_modules="all-linear"))
    pm.save_pretrained(tmp_path)
    peft_merged = pm.merge_and_unload().state_dict()
    ours = lk.merge_and_unload(lk.load_adapter(copy.deepcopy(base), tmp_path)).state_dict()
    assert ours.keys() == peft_merged.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], peft_merged[k], rtol=1e-6, atol=1e-6)


def test_task_heads_and_suffix_matching_wrap_what_peft_wraps():
    m = lk.get_lora_model(tiny_llama_classifier(), lk.LoraConfig(r=2, target_modules=["q_proj"], task_type="seq_cls"))
    assert [n for n, x in m.named_modules() if isinstance(x, lk.inject.ModulesToSave)] == ["score"]
    assert m._lorakit.configs["default"].modules_to_save == ["classifier", "score"]  # as PEFT saves it
    m = lk.get_lora_model(TwoHeads(), lk.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"]))
    assert [n for n, x in m.named_modules() if isinstance(x, lk.inject.ModulesToSave)] == ["pre_classifier", "classifier"]
    # all-linear on a classification model leaves its head to modules_to_save, as PEFT does
    m = lk.get_lora_model(tiny_llama_classifier(), lk.LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    assert isinstance(m.score, lk.inject.ModulesToSave) and isinstance(m.model.layers[0].mlp.down_proj, lk.LoraLayer)
    # a typo is still an error when creating an adapter; only the task's own heads may be absent
    with pytest.raises(ValueError, match=r"modules_to_save \['clasifier'\] matched no module"):
        lk.get_lora_model(tiny_llama_classifier(), lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["clasifier"]))


def test_loading_skips_modules_to_save_entries_naming_no_module(tmp_path):
    """PEFT ignores modules_to_save entries that name nothing in the model (it saved no tensors for them)."""
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path)
    _edit_config(tmp_path, modules_to_save=["nowhere"])
    x = llama_input()
    torch.testing.assert_close(_out(lk.load_adapter(tiny_llama(), tmp_path), x), _out(m, x), rtol=0, atol=0)


def test_overlapping_patterns_keep_their_order_on_disk(tmp_path):
    """Where several rank / alpha patterns match a module the first wins (PEFT's rule), so saving must
    not reorder them (sorted, "gate_proj" would come first and give layer 1 rank 3 and alpha 1)."""
    patterns = {"rank_pattern": {"layers.1.mlp.gate_proj": 2, "gate_proj": 3},
                "alpha_pattern": {"layers.1.mlp.gate_proj": 16.0, "gate_proj": 1.0}}
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights=False, **patterns))
    layer = m.model.layers[1].mlp.gate_proj
    assert layer.lora_A["default"].shape[0] == 2 and layer.scaling["default"] == 16.0 / 2
    assert m.model.layers[0].mlp.gate_proj.lora_A["default"].shape[0] == 3
    lk.save_adapter(m, tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in patterns.items():
        assert list(on_disk[key]) == list(value)
    x = llama_input()
    torch.testing.assert_close(_out(lk.load_adapter(tiny_llama(), tmp_path), x), _out(m, x), rtol=0, atol=0)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_out(pm, x), _out(m, x), rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path / "ad")
    return tmp_path / "ad"


def _assert_untouched(model, snapshot):
    assert not any(isinstance(x, lk.LoraLayer) for x in model.modules())
    assert "_lorakit" not in model.__dict__ or not model._lorakit.configs
    sd = model.state_dict()
    assert sd.keys() == snapshot.keys()
    for k in sd:
        assert torch.equal(sd[k], snapshot[k]), k


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _assert_refused(saved, match):
    """Loading ``saved`` into a fresh model fails with ``match`` and leaves the model as it was; returns it."""
    model = tiny_llama()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, saved)
    _assert_untouched(model, snap)
    return model


@pytest.mark.parametrize("init", ["corda", "lora_ga", "CorDA", "loftq"])
def test_adapters_of_data_driven_residual_inits_are_refused_unconverted(saved, init):
    """CorDA / LoRA-GA rewrote the base to a residual lorakit cannot recompute: loaded as plain LoRA
    on the original base it was 1.38 relative off the trained model. LoftQ too: PEFT redoes its
    quantised residual on load (it was loaded silently as plain LoRA)."""
    _edit_config(saved, init_lora_weights=init)
    _assert_refused(saved, f"init_lora_weights='{init}'.*cannot recompute.*path_initial_model_for_weight_conversion")


@pytest.mark.parametrize("missing", ["r", "lora_alpha"])
def test_config_without_r_or_alpha(saved, missing):
    _edit_config(saved, **{missing: None})
    _assert_refused(saved, f"'{missing}' is missing")


@pytest.mark.parametrize("field,value", [("alora_invocation_tokens", [5, 6]), ("lora_bias", True),
                                         ("trainable_token_indices", [3]), ("layer_replication", [[0, 2], [1, 2]]),
                                         ("target_parameters", ["mlp.experts.down_proj"]), ("use_qalora", True)])
def test_peft_fields_lorakit_does_not_implement_are_refused(saved, field, value):
    """An adapter whose config asks for a PEFT feature beyond plain LoRA is refused with the field
    named, not loaded as the plain LoRA it is not (its defaults, None / False, load as usual)."""
    _edit_config(saved, **{field: value})
    model = _assert_refused(saved, f"{field}=.*lorakit does not implement")
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg[field] = False if value is True else None
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    lk.load_adapter(model, saved)


def _rewrite_weights(path, fn):
    sd = load_file(path / "adapter_model.safetensors")
    fn(sd)
    save_file(sd, path / "adapter_model.safetensors")


def test_unexpected_key(saved):
    _rewrite_weights(saved, lambda sd: sd.__setitem__("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", torch.zeros(4, 32)))
    _assert_refused(saved, "no place for.*gate_proj")


def test_a_refusal_of_a_weight_tying_peft_file_names_the_flag(saved):
    _edit_config(saved, ensure_weight_tying=True)
    _rewrite_weights(saved, lambda sd: sd.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 32)))
    _assert_refused(saved, "no place for.*lm_head.*ensure_weight_tying=true")
    _edit_config(saved, ensure_weight_tying=False)
    with pytest.raises(ValueError) as err:
        lk.load_adapter(tiny_llama(), saved)
    assert "ensure_weight_tying" not in str(err.value)


def test_a_directory_of_named_adapter_subfolders_says_which_to_give(saved, tmp_path):
    """PEFT saves adapters other than 'default' in a subfolder named after them."""
    import shutil

    root = tmp_path / "peft_save"
    shutil.copytree(saved, root / "other")
    with pytest.raises(FileNotFoundError, match=r"subfolder\(s\) \['other'\].*give one of those"):
        lk.load_adapter(tiny_llama(), root)
    lk.load_adapter(tiny_llama(), root / "other")


def test_missing_key(saved):
    _rewrite_weights(saved, lambda sd: sd.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    _assert_refused(saved, "missing.*layers.1.self_attn.v_proj.lora_B")


def test_shape_mismatch_names_key_and_shapes(saved):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(saved, lambda sd: sd.__setitem__(key, torch.zeros(4, 31)))
    model = tiny_llama()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        lk.load_adapter(model, saved)
    assert key in str(err.value) and "[4, 32]" in str(err.value) and "[4, 31]" in str(err.value)
    _assert_untouched(model, snap)


def test_a_transposed_factor_of_the_right_size_is_refused(saved):
    # A saved as (in, r) instead of (r, in) holds as many numbers: a check of sizes alone loaded it
    # scrambled into the layer (found by a mutation test of the shape check)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(saved, lambda sd: sd.__setitem__(key, sd[key].T.contiguous()))
    _assert_refused(saved, r"shape mismatch for .*q_proj.*\[4, 32\].*\[32, 4\]")


def test_truncated_and_corrupt_files(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    model = tiny_llama()
    snap = copy.deepcopy(model.state_dict())
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lk.load_adapter(model, saved)
    (saved / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        lk.load_adapter(model, saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lk.load_adapter(model, saved)
    _assert_untouched(model, snap)


def test_missing_files_and_dirs(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        lk.load_adapter(tiny_llama(), tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(tiny_llama(), empty)
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lk.load_adapter(tiny_llama(), saved)
    (saved / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        lk.load_adapter(tiny_llama(), saved)


def test_wrong_model_and_wrong_peft_type(saved):
    with pytest.raises(ValueError, match="matched no module"):
        lk.load_adapter(TinyConvNet(), saved)
    _edit_config(saved, peft_type="IA3")
    with pytest.raises(ValueError, match="IA3"):
        lk.load_adapter(tiny_llama(), saved)


def test_save_is_atomic(saved, monkeypatch):
    before = (saved / "adapter_model.safetensors").read_bytes()
    m = lk.get_lora_model(tiny_llama(seed=5), lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(m, saved)
    monkeypatch.undo()
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]


def test_load_twice_needs_new_name(saved):
    m = lk.load_adapter(tiny_llama(), saved)
    with pytest.raises(ValueError, match="already exists"):
        lk.load_adapter(m, saved)
    lk.load_adapter(m, saved, adapter_name="second")
    assert set(m._lorakit.configs) == {"default", "second"}
    assert not any(p.requires_grad for p in m.parameters())  # loaded for inference by default


def test_load_trainable(saved):
    m = lk.load_adapter(tiny_llama(), saved, is_trainable=True)
    assert lk.count_parameters(m)[0] == 2 * (4 * 64 + 4 * 48)


def _bias_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def _trained_bias_adapter(path, seed, **cfg):
    m = lk.get_lora_model(_bias_net(), lk.LoraConfig(r=2, init_lora_weights=False, **cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    lk.save_adapter(m, path)


def test_only_one_adapter_on_a_model_may_train_the_shared_biases(tmp_path):
    # the biases are the base model's own: a second bias-training adapter overwrote the first's
    # (adapter "a" then computed 2.7 away from itself loaded alone); refused as in PEFT, model unchanged
    _trained_bias_adapter(tmp_path / "a", 1, target_modules=["0"], bias="all")
    _trained_bias_adapter(tmp_path / "b", 2, target_modules=["0"], bias="all")
    x = torch.randn(5, 4, dtype=torch.float64)
    model = lk.load_adapter(_bias_net(), tmp_path / "a", "a").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'b' trains biases .*'a' on this model already does"):
        lk.load_adapter(model, tmp_path / "b", "b")
    with pytest.raises(ValueError, match="only one adapter on a model may train them"):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["2"], bias="lora_only"), adapter_name="c")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert lk.active_adapters(model) == ["a"]
    alone = lk.load_adapter(_bias_net(), tmp_path / "a", "a").eval()
    assert torch.equal(model(x), alone(x))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["2"]), adapter_name="plain")  # bias none: fine


def test_bias_all_leaves_a_modules_to_save_original_frozen():
    # PEFT: 47 trainable; lorakit made the wrapped head's unused original bias trainable too (50)
    cfg = dict(r=2, target_modules=["0"], modules_to_save=["2"], bias="all")
    ours = lk.get_lora_model(_bias_net(), lk.LoraConfig(**cfg))
    theirs = peft.get_peft_model(_bias_net(), peft.LoraConfig(**cfg))
    assert not ours[2].original_module.bias.requires_grad and not ours[2].original_module.weight.requires_grad
    assert lk.count_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad) == 47
    lk.get_lora_model(ours, lk.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]), adapter_name="two")
    lk.set_trainable(ours, "default")  # the other adapter's copy of the head stays frozen, bias included
    assert not ours[2].modules_to_save["two"].bias.requires_grad
    assert ours[2].modules_to_save["default"].bias.requires_grad and ours[0].base_layer.bias.requires_grad


def test_a_bias_all_file_loads_where_another_adapter_wraps_one_of_its_biases_modules(tmp_path):
    # "b" (bias="all", targets "2") was saved on a bare model, so its file names "0.bias"; loaded after
    # "a" (wraps "0") that bias is "0.base_layer.bias": it was refused as "for another model", and PEFT
    # drops it (7.8 off); here it loads, and the reverse direction too
    _trained_bias_adapter(tmp_path / "a", 1, target_modules=["0"])
    _trained_bias_adapter(tmp_path / "b", 2, target_modules=["2"], bias="all")
    x = torch.randn(5, 4, dtype=torch.float64)
    want = lk.load_adapter(_bias_net(), tmp_path / "b", "b").eval()(x)
    model = lk.load_adapter(_bias_net(), tmp_path / "a", "a")
    lk.load_adapter(model, tmp_path / "b", "b")
    lk.set_adapter(model, "b")
    assert torch.equal(model.eval()(x), want)
    lk.save_adapter(model, tmp_path / "b2", adapter_name="b")  # names "0.base_layer.bias" now
    assert "base_model.model.0.base_layer.bias" in load_file(tmp_path / "b2" / "adapter_model.safetensors")
    assert torch.equal(lk.load_adapter(_bias_net(), tmp_path / "b2", "b").eval()(x), want)
    fresh = lk.load_adapter(_bias_net(), tmp_path / "b", "b")
    with torch.no_grad():
        fresh[0].bias.zero_()
    lk.load_adapter_weights(fresh, tmp_path / "b2", "b")  # a hot swap reads the other name too
    assert torch.equal(fresh.eval()(x), want)


@pytest.mark.parametrize("second", [dict(target_modules="all-linear"), dict(target_modules=["0"], bias="all")])
def test_a_file_for_a_module_another_adapter_holds_as_modules_to_save_says_so(tmp_path, second):
    # "a" holds module "2" whole; "b" has LoRA tensors (or a trained bias) for it: refused, with the
    # reason named (the message asked whether the file was for another model), model unchanged
    _trained_bias_adapter(tmp_path / "a", 1, target_modules=["0"], modules_to_save=["2"])
    _trained_bias_adapter(tmp_path / "b", 2, **second)
    model = lk.load_adapter(_bias_net(), tmp_path / "a", "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'2' is held whole as modules_to_save by adapter\(s\) \['a'\]"):
        lk.load_adapter(model, tmp_path / "b", "b")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_name, adapters", [
    (layer, adapters) for layer in ("linear", "gpt2_conv1d", "embedding", "conv2d")
    for adapters in [("lora",), ("lora", "lora")] + ([("dora",), ("lora", "dora")] if layer == "linear" else [])])
def test_half_precision_outputs_equal_peft_bit_for_bit(dtype, layer_name, adapters):
    # fp32 adapters on a half-precision base: each update is added in fp32 and a layer's sum rounded
    # once, as PEFT computes it. Conv1D / Embedding / Conv2d / DoRA rounded the update to half first
    # (1.2x further from float64 than PEFT), and several adapters rounded after each (up to 3x).
    from conftest import LAYER_CASES, Wrap

    make_layer, make_x = LAYER_CASES[layer_name]  # (DoRA's half-precision sum: on Linear)
    torch.manual_seed(0)
    base = Wrap(make_layer()).to(dtype).eval()
    names = [f"a{i}" for i in range(len(adapters))]
    ours = theirs = None
    for name, kind in zip(names, adapters):
        # (alpha 5: a scaling of 1.25, whose product rounds; a power of two hid a rounding-order difference)
        cfg = dict(r=4, lora_alpha=5, target_modules=["layer"], init_lora_weights=False, use_dora=kind == "dora",
                   fan_in_fan_out=layer_name == "gpt2_conv1d")
        if ours is None:
            ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**cfg), name)
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name=name)
        else:
            lk.get_lora_model(ours, lk.LoraConfig(**cfg), name)
            theirs.add_adapter(name, peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            for p in (ours.layer.lora_A[name], ours.layer.lora_B[name]):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name in ours.layer.variants:
                ours.layer.lora_magnitude_vector[name].mul_(0.3)
    for name in names:
        peft.set_peft_model_state_dict(theirs, lk.adapter_state_dict(ours, name), adapter_name=name)
    lk.set_adapter(ours, names)
    theirs.base_model.set_adapter(names)
    x = make_x()
    x = x.to(dtype) if x.is_floating_point() else x
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    if not (dtype == torch.bfloat16 and layer_name in ("linear", "gpt2_conv1d")):  # (bf16 products, docs/core.md)
        got, want = ours(x), theirs(x)  # with gradients on: the fused node's path
        assert torch.equal(got, want)


def test_a_velora_adapter_loads_as_the_plain_lora_it_computes(tmp_path):
    # VeLoRA's per-layer buffer serves its compressed backward only; the file was refused on it as
    # "for another model"
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                               velora_config={}))
    theirs.save_pretrained(tmp_path)
    assert any(k.endswith(".lora_velora_embed") for k in load_file(tmp_path / "adapter_model.safetensors"))
    x = llama_input()
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits
        got = lk.load_adapter(tiny_llama(), tmp_path).eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, tiny_llama().eval()(x).logits, atol=1e-3)


def test_an_unknown_field_left_off_is_ignored_and_one_set_is_refused(saved):
    # a newer PEFT's field at its "off" value loads (PEFT drops unknown keys); set, it is refused
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(cfg | {"some_future_option": None, "another_one": False}))
    with pytest.warns(UserWarning, match=r"ignoring unknown field\(s\) \['another_one', 'some_future_option'\]"):
        lk.load_adapter(tiny_llama(), saved)
    _edit_config(saved, some_future_option={"mode": 2})
    _assert_refused(saved, r"unknown field\(s\) \['some_future_option'\] set to \[\{'mode': 2\}\]")


@pytest.mark.parametrize("init, loads", [("eva", True), ("orthogonal", True), ("mica", True), ("Gaussian", True),
                                         ("olora", True), ("pissa_niter_3", True), ("foo", False)])
def test_an_unknown_init_is_refused_and_base_keeping_ones_load(saved, init, loads):
    # an init string lorakit does not know loaded as plain LoRA (PEFT refuses it): a future init that
    # rewrites the base, as PiSSA does, would then load silently wrong
    _edit_config(saved, init_lora_weights=init)
    if loads:
        lk.load_adapter(tiny_llama(), saved)
    else:
        _assert_refused(saved, "init_lora_weights='foo' is an initialisation neither PEFT 0.21 nor lorakit knows")


def test_temporaries_of_writes_killed_an_hour_ago_are_removed(tmp_path):
    # a merge or resize killed mid-write left its hidden temporary directory (a merge's is the size of
    # the model) and nothing ever removed it
    import os
    import time

    from lorakit.io import write_new_directory

    old = tmp_path / ".out.abc123.tmp"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 10)
    young = tmp_path / ".out.def456.tmp"  # a write running now
    young.mkdir()
    other = tmp_path / ".other.abc.tmp"
    other.mkdir()
    hour_ago = time.time() - 3700
    for p in (old, other):
        os.utime(p, (hour_ago, hour_ago))
    write_new_directory(tmp_path / "out", lambda d: (d / "f").write_text("whole"))
    assert (tmp_path / "out" / "f").read_text() == "whole"
    assert not old.exists() and young.exists() and other.exists()


@pytest.mark.parametrize("dilation", [1, 2])
def test_an_adapter_on_a_dilated_conv2d_warns_that_peft_computes_it_otherwise(tmp_path, dilation):
    # PEFT 0.21's lora_A conv leaves the dilation out: with padding 'same' it loads this file and runs
    # it with other outputs (an audit: ~7% off), silently; lorakit's output is the merged conv's
    import warnings

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same", dilation=dilation)).double()
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                init_lora_weights=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.save_adapter(ours, tmp_path)
    said = [str(w.message) for w in caught if "dilated Conv2d" in str(w.message)]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x)
        merged = torch.nn.functional.conv2d(x, base[0].weight + ours[0].delta_weight("default"), base[0].bias,
                                            padding="same", dilation=dilation)
    torch.testing.assert_close(got, merged)
    if dilation == 1:
        assert said == [] and torch.allclose(theirs, got)
    else:
        assert len(said) == 1 and "['0']" in said[0]
        assert not torch.allclose(theirs, got, rtol=1e-2)  # what the warning is about


@pytest.mark.parametrize("how", ["load_adapter", "hotswap_adapter", "load_adapter_weights"])
def test_an_adapter_file_holding_nan_is_refused_and_the_model_kept(saved, tmp_path, how):
    # it loaded (as in PEFT), and every output of the model was NaN from then on
    tensors = load_file(saved / "adapter_model.safetensors")
    key = sorted(tensors)[1]
    tensors[key][0, 0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    (bad / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    model = tiny_llama() if how == "load_adapter" else lk.load_adapter(tiny_llama(), saved)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    call = {"load_adapter": lambda: lk.load_adapter(model, bad), "hotswap_adapter": lambda: lk.hotswap_adapter(model, bad),
            "load_adapter_weights": lambda: lk.load_adapter_weights(model, bad)}[how]
    with pytest.raises(ValueError, match=rf"tensor '{key}' holds NaN or inf \(1 of \d+ values\)"):
        call()
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- a configuration fuzz against PEFT 0.21.2 (1,750 configs) and its findings ------------------------


class _Container(torch.nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.conv = (torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)) if nested
                     else torch.nn.Linear(4, 3))

    def forward(self, x):
        return self.conv(self.fc(x))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("how", ["load_adapter", "load_adapter_weights", "hotswap_adapter"])
def test_peft_bias_all_file_with_a_saved_container_loads(nested, how, tmp_path):
    """bias="all" + modules_to_save on an nn.Sequential: PEFT writes <m>.modules_to_save.default.0.bias and
    <m>.original_module.0.bias, refused as keys 'for another model'; load_adapter_weights and hotswap
    refused the direct (non-container) spelling too."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Container(nested).double().eval()
    kw = dict(target_modules=["fc"], r=2, lora_alpha=4, bias="all", modules_to_save=["conv"], init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 4, dtype=torch.float64)
    if how == "load_adapter":
        ours = lk.load_adapter(copy.deepcopy(base), tmp_path)
    else:
        ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**kw)).eval()
        getattr(lk, how)(ours, tmp_path)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


def test_modules_to_save_entry_naming_a_lora_target_warns():
    """PEFT refuses target 'out_proj' + modules_to_save 'proj' (a plain suffix of it) and cannot load the
    file; lorakit took it silently."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out_proj, self.proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    with pytest.warns(UserWarning, match="'proj' also names the LoRA target 'out_proj'.*PEFT 0.21 refuses"):
        m = lk.get_lora_model(Net(), lk.LoraConfig(r=2, target_modules=["out_proj"], modules_to_save=["proj"]))
    assert isinstance(m.out_proj, lk.LoraLayer)


def test_all_linear_file_means_the_same_to_peft(tmp_path):
    """PEFT reads "all-linear" as the Linear modules' full names matched as suffixes: a top-level Linear
    'fc' also pulled in an embedding 'block.fc' (0.76 off with init_lora_weights=False)."""
    peft = pytest.importorskip("peft")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Embedding(10, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Block(), torch.nn.Linear(4, 4)

        def forward(self, ids):
            return self.fc(self.block.fc(ids))

    torch.manual_seed(0)
    base = Net().double().eval()
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    lk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    wrapped = sorted(n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped == ["fc"]
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(theirs(ids), ours(ids), rtol=0, atol=1e-12)
    again = lk.load_adapter(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in lk.iter_lora_layers(again)] == ["fc"]
    # the usual case keeps the short form
    lk.save_adapter(lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules="all-linear")), tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["target_modules"] == "all-linear"


@pytest.mark.parametrize("kw", [dict(target_modules=["proj"], modules_to_save=["proj"]),
                                dict(target_modules=["proj"], exclude_modules=["proj"])])
def test_a_target_left_out_by_an_exclusion_is_named_so(kw):
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(4, 4))
    net.add_module("head", torch.nn.Linear(4, 2))
    field_name = "modules_to_save" if "modules_to_save" in kw else "exclude_modules"
    with pytest.raises(ValueError, match=rf"matched only modules that {field_name} \['proj'\] leave out.*\['proj'\]"):
        lk.get_lora_model(net, lk.LoraConfig(r=2, **kw))


# ---- an audit of hostile and corrupt adapter files (about 124 cases) and its findings -----------------


def _saved_q(tmp_path, name="src"):
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    return m, lk.save_adapter(m, tmp_path / name)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("how", ["load_adapter", "load_adapter_weights", "hotswap_adapter"])
def test_float64_values_that_overflow_the_adapter_are_refused(how, tmp_path):
    """1e300 is finite in a float64 file and inf in the float32 adapter: it loaded silently."""
    m, d = _saved_q(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors = {k: v.double() for k, v in tensors.items()}
    tensors[key][0, 0] = 1e300
    save_file(tensors, str(d / "adapter_model.safetensors"))
    target = tiny_llama() if how == "load_adapter" else m
    before = _state(target)
    with pytest.raises(ValueError, match=r"values up to 1e\+300, beyond the range of torch.float32"):
        getattr(lk, how)(target, d)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_float8_tensors_are_refused_by_name(tmp_path):
    _, d = _saved_q(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="float8_e4m3fn; adapter weights are read from float16"):
        lk.load_adapter(tiny_llama(), d)


@pytest.mark.parametrize("field_name,value", [("rank_pattern", {"(?i)Q_PROJ": 4}), ("alpha_pattern", {"(?i)Q_PROJ": 4.0}),
                                              ("modules_to_save", "("), ("layers_pattern", "(")])
def test_regexes_are_checked_as_the_matcher_uses_them(field_name, value):
    """'(?i)Q_PROJ' compiles alone but not inside the pattern-key matcher: a bare re.error from deep
    inside loading (and a hot swap that had copied the new tensors already)."""
    extra = {"layers_to_transform": [0]} if field_name == "layers_pattern" else {}
    with pytest.raises(ValueError, match=f"LoraConfig.{field_name}.*not a valid regular expression"):
        lk.LoraConfig(r=2, target_modules=["q_proj"], **{field_name: value}, **extra)


def test_deeply_nested_config_json_is_named(tmp_path):
    _, d = _saved_q(tmp_path)
    (d / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        lk.load_adapter(tiny_llama(), d)


def test_a_file_given_for_the_adapter_directory_is_named(tmp_path):
    _, d = _saved_q(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file; give the adapter's directory"):
        lk.load_adapter(tiny_llama(), d / "adapter_model.safetensors")


def _saved(tmp_path):
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    return lk.save_adapter(m, tmp_path / "a")


def test_load_adapter_sets_inference_mode_as_peft_does(tmp_path):
    # I4: not trainable -> inference_mode True (and so in a re-saved config); trainable -> False
    d = _saved(tmp_path)
    frozen = lk.load_adapter(tiny_llama(), d)
    from lorakit.inject import require_state
    assert require_state(frozen).configs["default"].inference_mode is True
    lk.save_adapter(frozen, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["inference_mode"] is True
    trainable = lk.load_adapter(tiny_llama(), d, is_trainable=True)
    assert require_state(trainable).configs["default"].inference_mode is False
    lk.save_adapter(trainable, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["inference_mode"] is False


def test_loading_a_second_adapter_leaves_user_unfrozen_parameters_alone(tmp_path):
    # I5: only the first adapter on a model freezes every parameter; a later load must not re-freeze
    # what the user chose to train (as PEFT's load_adapter)
    d = _saved(tmp_path)
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["v_proj"]))
    m.lm_head.weight.requires_grad_(True)
    lk.load_adapter(m, d, adapter_name="second")
    assert m.lm_head.weight.requires_grad


def _lin_model(seed: int = 0, r: int = 2, alpha: float = 4.0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(4, 3))
    lk.get_lora_model(m, lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"], init_lora_weights=False))
    return m


@pytest.fixture
def _umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_saved_adapter_files_get_ordinary_permissions(tmp_path, _umask_022):
    """Saved through private temporary files, the adapter's files still end with the permissions a plain
    open() gives under the umask (0644 with umask 022), so others can read a shared adapter."""
    lk.save_adapter(_lin_model(), tmp_path / "ad")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "ad" / name).st_mode) == 0o644, name


def test_lora_only_biases_saved_are_those_of_the_adapter_s_own_layers(tmp_path):
    """bias="lora_only" saves the biases of the modules *this* adapter wraps; a module wrapped only by
    another adapter keeps its bias out of the file."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(4, 4))
    m.add_module("fc2", nn.Linear(4, 3))
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["fc1"], bias="lora_only", init_lora_weights=False),
                      adapter_name="a")
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False), adapter_name="b")
    sd = lk.adapter_state_dict(m, "a")
    assert sorted(sd) == ["base_model.model.fc1.base_layer.bias", "base_model.model.fc1.lora_A.weight",
                          "base_model.model.fc1.lora_B.weight"]


def test_save_records_the_model_s_name_as_base_model(tmp_path):
    """With no base_model_name_or_path in the adapter's config, saving records the model's own name
    (config._name_or_path), as PEFT does."""
    from conftest import tiny_llama

    model = tiny_llama()
    model.config._name_or_path = "org/tiny-llama"
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"


def _fc_head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(4, 4))
    m.add_module("head", nn.Linear(4, 3))
    return m.eval()


def _save_edited(tmp_path, edit, **config):
    """Save a bias="all"-style adapter of ``_fc_head`` to tmp_path/"ad", then ``edit(tensors)`` its file."""
    from safetensors.torch import load_file, save_file

    src = _fc_head(1)
    lk.get_lora_model(src, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights=False, **config))
    lk.save_adapter(src, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))
    return tmp_path / "ad"


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    assert lk.inject.get_state(model) is None or not lk.inject.get_state(model).configs
    assert {k: v for k, v in model.state_dict().items()}.keys() == snapshot.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def _refused_unchanged(tmp_path, edit, match: str, **config) -> None:
    """An adapter of ``_fc_head`` saved with ``config`` and its file edited by ``edit``: loading it
    is refused with ``match`` in the message, and the model is left as it was."""
    path = _save_edited(tmp_path, edit, **config)
    model = _fc_head()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, path)
    _unchanged(model, snap)


def test_a_float64_bias_beyond_float32_is_refused(tmp_path):
    """A trained bias saved in float64 with a value float32 cannot hold (1e300) is refused before loading,
    as a LoRA factor would be: copied, it became inf in the model's bias."""
    def edit(t):
        t["base_model.model.fc.base_layer.bias"] = torch.full((4,), 1e300, dtype=torch.float64)

    _refused_unchanged(tmp_path, edit, "beyond the range", bias="all")


def test_a_bias_under_both_its_names_with_two_values_is_refused(tmp_path):
    """A file naming one bias both as <m>.base_layer.bias and <m>.bias with different values is ambiguous:
    refused (not one of them silently kept)."""
    def edit(t):
        t["base_model.model.fc.bias"] = t["base_model.model.fc.base_layer.bias"] + 1.0

    _refused_unchanged(tmp_path, edit, "same bias", bias="all")


def test_a_modules_to_save_copy_bias_under_both_spellings_with_two_values_is_refused(tmp_path):
    """PEFT's bias="all" writes a modules_to_save copy's bias also as <m>.modules_to_save.bias; when that
    disagrees with <m>.bias the file is refused."""
    def edit(t):
        t["base_model.model.head.modules_to_save.bias"] = t["base_model.model.head.bias"] + 1.0

    _refused_unchanged(tmp_path, edit, "same bias", bias="all", modules_to_save=["head"])


def test_an_integer_factor_in_the_file_is_refused(tmp_path):
    """Adapter factors are floating point; an integer tensor in their place is refused by name."""
    def edit(t):
        key = "base_model.model.fc.lora_A.weight"
        t[key] = torch.ones_like(t[key], dtype=torch.int64)

    _refused_unchanged(tmp_path, edit, "floating-point")


def test_loading_under_a_taken_name_is_refused_and_keeps_that_adapter(tmp_path):
    """load_adapter into a name the model already has is refused up front (telling to pass another
    adapter_name), and the existing adapter is left as it was."""
    lk.save_adapter(_lin_model(seed=1), tmp_path / "ad")
    model = _lin_model(seed=2)
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pass another adapter_name"):
        lk.load_adapter(model, tmp_path / "ad")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
    assert list(lk.inject.get_state(model).configs) == ["default"]


def test_a_failed_load_of_a_residual_adapter_restores_the_base_weights(tmp_path):
    """An unconverted PiSSA adapter rewrites the base to its residual on load; when the file is then refused
    (a factor float32 cannot hold), the base weight is put back exactly as it was."""
    torch.manual_seed(0)
    src = nn.Sequential()
    src.add_module("fc", nn.Linear(6, 5))
    lk.get_lora_model(src, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], init_lora_weights="pissa"))
    lk.save_adapter(src, tmp_path / "ad")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.fc.lora_B.weight"
    tensors[key] = torch.full(tensors[key].shape, 1e300, dtype=torch.float64)
    save_file(tensors, str(weights))
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(6, 5))
    before = model.fc.weight.detach().clone()
    with pytest.raises(ValueError, match="beyond the range"):
        lk.load_adapter(model, tmp_path / "ad")
    assert isinstance(model.fc, nn.Linear) and torch.equal(model.fc.weight, before)


def test_load_adapter_weights_refuses_a_merged_adapter(tmp_path):
    """Replacing a merged adapter's weights would leave the old update in the base weight: refused."""
    lk.save_adapter(_lin_model(seed=1), tmp_path / "ad")
    model = _lin_model(seed=2)
    model.fc.merge()
    A = model.fc.lora_A["default"].detach().clone()
    with pytest.raises(ValueError, match="is merged"):
        lk.load_adapter_weights(model, tmp_path / "ad")
    assert torch.equal(model.fc.lora_A["default"], A)


def test_a_load_stopped_after_it_wrote_a_base_bias_puts_that_bias_back(tmp_path, monkeypatch):
    """A bias="all" file overwrites the base layer's bias; a load that stops after that (here a Ctrl-C
    at the next tensor's copy) restores the bias from a copy taken before, not from a view of the
    bias it had already overwritten."""
    path = _save_edited(tmp_path, lambda t: None, bias="all")
    model = _fc_head()
    snap = _snapshot(model)
    bias = model.fc.bias
    real_copy, wrote_bias = torch.Tensor.copy_, []

    def copy_then_stop(self, src, *args, **kwargs):
        if wrote_bias and not wrote_bias[0]:
            wrote_bias[0] = True
            raise KeyboardInterrupt
        out = real_copy(self, src, *args, **kwargs)
        if self is bias and not wrote_bias:
            wrote_bias.append(False)
        return out

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lk.load_adapter(model, path)
    monkeypatch.undo()
    assert wrote_bias == [True]
    assert not torch.equal(snap["fc.bias"], _fc_head(1).fc.bias)  # the file's bias differs from the model's
    _unchanged(model, snap)


def test_failed_writes_come_out_as_os_errors_naming_where(tmp_path, monkeypatch):
    # a full disk: safetensors raises its own SafetensorError, torch.save a RuntimeError from its zip
    # writer, a plain write an OSError naming no file ("[Errno 28] No space left on device")
    import errno

    from lorakit.io import atomic_write_bytes, write_new_directory, writing

    SafetensorError = type("SafetensorError", (Exception,), {})
    for exc in (SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })'),
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")):
        with pytest.raises(OSError, match=f"could not write into '{tmp_path}' .*disk full") as info:
            with writing(tmp_path):
                raise exc
        assert info.value.__cause__ is exc
    with pytest.raises(OSError) as info:
        with writing(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path))
    for exc in (ValueError("bad value"), RuntimeError("a bug"), OSError(errno.EACCES, "denied", "/x"),
                SafetensorError("Some tensors share memory, this will lead to duplicate memory on disk")):
        with pytest.raises(type(exc)) as info:
            with writing(tmp_path):
                raise exc
        assert info.value is exc  # not a write failure (or already named): unchanged

    def full(_tmp):
        raise SafetensorError("No space left on device")
    with pytest.raises(OSError, match="could not write into"):
        write_new_directory(tmp_path / "out", full)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    def fsync_full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert info.value.filename == str(tmp_path) and not list(tmp_path.glob(".f.bin.*"))


# ---- mutation round 6 (/tmp/mutants6): reading PEFT's adapter_config.json
_PEFT_BASE = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def test_unsupported_peft_fields_left_empty_are_accepted():
    # newer PEFT writes some of these as [] / {} when unused: that is plain LoRA, not the feature
    cfg = lk.LoraConfig.from_dict({**_PEFT_BASE, "target_parameters": [], "trainable_token_indices": {},
                                   "layer_replication": [], "lora_bias": False})
    assert cfg.r == 2


def test_peft_type_is_read_case_insensitively():
    assert lk.LoraConfig.from_dict({**_PEFT_BASE, "peft_type": "lora"}).r == 2


def test_tensors_saved_atomically_are_synced_by_the_name_they_end_under(tmp_path, monkeypatch, _umask_022):
    """safetensors' save_file puts a file of its own at the path it is given (a rename over the
    temporary): the sync and the mode go to that file, by name, not to the temporary mkstemp made;
    the bytes are save()'s, and a failed write leaves no temporary and no file."""
    from safetensors.torch import save

    from lorakit.io import atomic_save_tensors

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or fsync(fd))
    out = tmp_path / "w.safetensors"
    atomic_save_tensors(out, tensors, {"format": "pt"})
    assert out.read_bytes() == save(tensors, metadata={"format": "pt"})
    assert synced == [os.stat(out).st_ino]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    with pytest.raises(TypeError):  # (safetensors refuses a non-string metadata value)
        atomic_save_tensors(tmp_path / "bad.safetensors", tensors, {"format": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_save_writes_adapter_tensors_that_share_memory_and_leaves_them_as_they_were(tmp_path):
    """save_adapter writes the adapter's own contiguous tensors without copying them first; tensors
    that share memory (views of one buffer, one parameter in two layers), which safetensors refuses
    to write as they are, are copied: the file loads back to the same values, and the model keeps its
    tensors (the same objects, the same storage)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    lk.get_lora_model(m, lk.LoraConfig(r=2, target_modules=["0", "1", "2"], init_lora_weights=False))
    buf = torch.randn(32)
    with torch.no_grad():
        m[0].lora_A["default"].data = buf[:16].view(2, 8)
        m[1].lora_A["default"].data = buf[16:].view(2, 8)
    m[2].lora_B["default"] = m[1].lora_B["default"]
    own = m[2].lora_A["default"]
    before = {k: v.clone() for k, v in lk.adapter_state_dict(m).items()}
    lk.save_adapter(m, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], v) for k, v in before.items())
    assert m[0].lora_A["default"].data_ptr() == buf.data_ptr() and m[2].lora_A["default"] is own
    assert m[2].lora_B["default"] is m[1].lora_B["default"]
    assert all(torch.equal(v, lk.adapter_state_dict(m)[k]) for k, v in before.items())
