"""Mutation round 12 (/tmp/mutants12): tests for the gaps the surviving mutants of multi.py, inject.py,
ops/grouped.py, layers/offload.py, layers/embedding.py and layers/conv2d.py showed. Each compares
against an independent computation (a plainly loaded model, plain torch ops, PEFT)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import tiny_llama

accelerate = pytest.importorskip("accelerate")


# ---- layers/offload.py -----------------------------------------------------------------------------

def _two_adapters(model: nn.Module) -> nn.Module:
    """Adapter "a" (plain LoRA) and "b" (DoRA) on q_proj, with B away from zero, the same in every model."""
    torch.manual_seed(0)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), "b")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(model):
            for name in ("a", "b"):
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.1)
    return model


def test_a_partial_unmerge_that_remerges_a_dora_adapter_on_an_offloaded_layer_matches_a_plain_model():
    """Unmerging "a" from [a, then DoRA b] takes both out and merges b again, inside one materialized
    block: the re-merge must start from the weight as the block left it, not from the offload map."""
    from lorakit.layers.offload import stored_tensor

    plain = _two_adapters(tiny_llama())
    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    model = _two_adapters(model)
    q_ref = plain.model.layers[0].self_attn.q_proj
    q = model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.is_meta
    for layer in (q_ref, q):
        layer.merge(["a"])
        layer.merge(["b"])
        layer.unmerge(["a"])
        assert layer.merged_adapters == ["b"]
    assert torch.equal(stored_tensor(q.base_layer), q_ref.base_layer.weight)


def test_dora_on_an_offloaded_model_cast_to_bfloat16_reads_the_weight_in_the_model_dtype():
    """The offload map keeps float32 values; the layer (and accelerate's forward) use the meta
    parameter's dtype, bf16 after a cast: DoRA's column norm must be taken of the bf16 weight, as on
    a plainly loaded bf16 model."""
    def build(offload: bool) -> nn.Module:
        model = tiny_llama()
        if offload:
            accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        model = model.to(torch.bfloat16)
        torch.manual_seed(0)
        lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                               init_lora_weights=False))
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # (magnitudes away from the norms they start at, the same in both models)
            for _, layer in lk.iter_lora_layers(model):
                mag = layer.lora_magnitude_vector["default"]
                mag.copy_(torch.rand(mag.shape, generator=gen) + 0.5)
        return model

    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    plain, offloaded = build(False), build(True)
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, plain(ids).logits)


# ---- layers/embedding.py ---------------------------------------------------------------------------

class _Emb(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.emb = embedding

    def forward(self, ids):
        return self.emb(ids)


def test_an_embedding_adapter_starts_as_peft_s_does_a_zero_and_b_random():
    """PEFT 0.21 starts an embedding's A at zero and B random (the reverse of Linear)."""
    import copy

    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.manual_seed(0)
    model = _Emb(nn.Embedding(20, 8))
    peft_model = get_peft_model(copy.deepcopy(model), PeftConfig(r=4, target_modules=["emb"]))
    peft_layer = peft_model.base_model.model.emb
    assert not peft_layer.lora_embedding_A["default"].any() and peft_layer.lora_embedding_B["default"].any()
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["emb"]))
    layer = model.emb
    assert layer.lora_A["default"].shape == peft_layer.lora_embedding_A["default"].shape
    assert not layer.lora_A["default"].any() and layer.lora_B["default"].any()


class _ScaledEmbedding(nn.Embedding):
    """As transformers' BART scaled embedding: a float ``embed_scale`` multiplying the lookups."""

    def __init__(self, num: int, dim: int, embed_scale: float) -> None:
        super().__init__(num, dim)
        self.embed_scale = embed_scale

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_a_float_embed_scale_scales_the_update_too():
    torch.manual_seed(0)
    model = _Emb(_ScaledEmbedding(20, 8, 3.0)).double()
    lk.get_lora_model(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"], init_lora_weights=False))
    layer = model.emb
    A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    ids = torch.tensor([[1, 5, 19, 0]])
    W = layer.base_layer.weight.detach() + 2.0 * (B @ A).T  # scaling = 8 / 4
    torch.testing.assert_close(model(ids), W[ids] * 3.0, rtol=1e-12, atol=1e-12)


# ---- layers/conv2d.py ------------------------------------------------------------------------------

def test_a_conv2d_with_reflect_padding_is_refused_and_the_model_left_as_it_was():
    """The branch pads with zeros (F.conv2d): on a reflect-padded conv its border outputs would be
    wrong, silently. Refused before any change."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode"):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["0"]))
    assert type(model[0]) is nn.Conv2d and not list(lk.iter_lora_layers(model))


# ---- ops/grouped.py --------------------------------------------------------------------------------

def _ids(rows: int = 3) -> torch.Tensor:
    return torch.randint(3, 101, (rows, 7), generator=torch.Generator().manual_seed(0))


def test_grouped_qkv_with_adapters_disabled_gives_the_base_model():
    """Gradients on (the adapters train), adapters disabled: q/k/v are the base projections."""
    from conftest import lora_llama
    from lorakit.ops import fuse_qkv_projections

    model = lora_llama(["q_proj", "k_proj", "v_proj"])
    base = tiny_llama().double().train()
    assert fuse_qkv_projections(model) == 2
    with lk.disable_adapters(model):
        got = model(_ids()).logits
    torch.testing.assert_close(got, base(_ids()).logits, rtol=1e-12, atol=1e-12)


def test_grouped_qkv_in_a_mixed_adapter_batch_gives_each_row_its_adapter():
    from conftest import lora_llama
    from lorakit.ops import fuse_qkv_projections

    model = lora_llama(["q_proj", "k_proj", "v_proj"])
    torch.manual_seed(1)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    names = ["b", "default", "__base__"]
    reference = model(_ids(), adapter_names=names).logits
    assert fuse_qkv_projections(model) == 2
    torch.testing.assert_close(model(_ids(), adapter_names=names).logits, reference, rtol=1e-12, atol=1e-12)


def test_grouped_qkv_with_a_dora_adapter_equals_the_separate_layers():
    from conftest import assert_same_in_float64, loss_and_grads
    from lorakit.ops import fuse_qkv_projections

    model = tiny_llama().double()
    torch.manual_seed(0)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True,
                                           init_lora_weights=False))
    model.train()
    reference = loss_and_grads(model, _ids(2), seed=0)
    assert fuse_qkv_projections(model) == 2
    assert_same_in_float64(loss_and_grads(model, _ids(2), seed=0), reference)


def test_grouped_qkv_with_a_trainable_base_bias_keeps_its_gradient():
    from conftest import assert_same_in_float64, lora_llama, loss_and_grads
    from lorakit.ops import fuse_qkv_projections

    model = lora_llama(["q_proj", "v_proj"], bias=True)
    attn = model.model.layers[0].self_attn
    attn.q_proj.base_layer.bias.requires_grad_(True)
    attn.k_proj.bias.requires_grad_(True)
    reference = loss_and_grads(model, _ids(2), seed=0)
    assert fuse_qkv_projections(model) == 2
    assert_same_in_float64(loss_and_grads(model, _ids(2), seed=0), reference)


# ---- inject.py -------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class _Stacks(nn.Module):
    """``layers.N.fc`` at the top (no segment before the layer list) and ``enc.layers.N.fc`` below."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.enc = nn.Module()
        self.enc.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in [*self.layers, *self.enc.layers]:
            x = block(x)
        return x


def _lora_names(model: nn.Module) -> list[str]:
    return sorted(n for n, _ in lk.iter_lora_layers(model))


def test_layers_to_transform_without_a_pattern_reads_the_layer_index_as_peft_does():
    """PEFT's rule: the index is the first numbered segment after at least two others, so a
    top-level ``layers.1.fc`` has none and is not targeted."""
    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_Stacks(), PeftConfig(r=2, target_modules=["fc"], layers_to_transform=[1]))
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                          if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    model = lk.get_lora_model(_Stacks(), lk.LoraConfig(r=2, target_modules=["fc"], layers_to_transform=[1]))
    assert _lora_names(model) == peft_targets == ["enc.layers.1.fc"]


def test_layers_pattern_list_uses_the_first_pattern_that_matches_as_peft_does():
    from peft import LoraConfig as PeftConfig, get_peft_model

    kw = dict(r=2, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=["layers", "blocks"])
    peft_model = get_peft_model(tiny_llama(), PeftConfig(**kw))
    peft_targets = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                          if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(**kw))
    assert _lora_names(model) == peft_targets == ["model.layers.1.self_attn.q_proj"]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pre_classifier = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.pre_classifier(self.fc(x)))


@pytest.mark.filterwarnings("ignore:modules_to_save entry")
@pytest.mark.parametrize("saved", [["classifier"], "classifier"])
def test_a_module_to_save_is_saved_in_full_and_takes_no_adapter_in_list_or_regex_form(saved):
    from lorakit.inject import ModulesToSave

    model = lk.get_lora_model(_Head(), lk.LoraConfig(r=2, target_modules="all-linear", modules_to_save=saved))
    assert isinstance(model.classifier, ModulesToSave)
    assert _lora_names(model) == ["fc", "pre_classifier"]


def test_a_modules_to_save_entry_keeps_adapters_off_its_module_at_a_dotted_boundary_only():
    """``classifier`` in modules_to_save keeps the adapter off ``classifier``, not off ``pre_classifier``
    (the target named in full keeps its LoRA; a warning says PEFT would refuse the config)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lk.get_lora_model(_Head(), lk.LoraConfig(r=2, target_modules=["pre_classifier"],
                                                         modules_to_save=["classifier"]))
    assert _lora_names(model) == ["pre_classifier"]


def test_a_combined_adapter_names_its_modules_as_a_list_where_no_path_ends_another():
    """combine_adapters' config: a plain list of the module paths (PEFT's list form) unless a path
    is also the dotted end of another module's name; on a Llama none is."""
    from conftest import lora_llama

    model = lora_llama(["q_proj", "v_proj"])
    lk.combine_adapters(model, {"default": 0.5}, "mix")
    config = lk.inject.get_state(model).configs["mix"]
    assert config.target_modules == sorted(n for n, l in lk.iter_lora_layers(model) if "mix" in l.lora_A)


def test_a_tie_whose_original_changed_since_the_merge_is_not_restored():
    """Merging the tied head unties it; the input embedding (holding the original) is then changed
    by hand: unmerging leaves the head its own weight (W again), not the changed embedding's."""
    import warnings

    model = tiny_llama(tie=True)
    original = model.lm_head.weight.detach().clone()
    torch.manual_seed(0)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.merge(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    lk.unmerge(model)
    head = model.lm_head.base_layer.weight
    assert head is not model.model.embed_tokens.weight
    torch.testing.assert_close(head, original, rtol=1e-5, atol=1e-5)
