"""Base layers accelerate offloads (``lorakit/layers/offload.py``): their weights sit on the meta
device between forwards and live in the offload hook's map. Merges, unmerges, DoRA's column norm
and PiSSA's residual read and write the weight there; each is held against the same adapter on a
model loaded plainly, exactly."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.offload import materialized, offload_hook, stored_tensor
from conftest import tiny_llama

accelerate = pytest.importorskip("accelerate")

TARGETS = ["q_proj", "v_proj", "down_proj"]
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"}}


def _with_adapter(model: nn.Module, variant: str, targets=TARGETS) -> nn.Module:
    torch.manual_seed(0)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=targets, **VARIANTS[variant]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # (B away from its init, the same in every model: the update is not zero)
        for _, layer in lk.iter_lora_layers(model):
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=gen) * 0.1)
    return model


def _offloaded(how: str, tmp_path) -> nn.Module:
    model = tiny_llama()
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _files(folder) -> dict[str, str]:
    return {os.path.join(root, f): hashlib.sha256(open(os.path.join(root, f), "rb").read()).hexdigest()
            for root, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_offloaded_layers_compute_merge_and_unmerge_as_plainly_loaded_ones(how, variant, tmp_path):
    """Before: DoRA and PiSSA failed at injection (meta tensors), a merge was refused."""
    ids = torch.randint(3, 100, (2, 6))
    reference = _with_adapter(tiny_llama(), variant)
    model = _with_adapter(_offloaded(how, tmp_path), variant)
    q = model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.is_meta and offload_hook(q.base_layer) is not None
    files = _files(tmp_path)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    # each step on both models, the same outputs to the bit
    for step in (lk.merge, lk.unmerge, lk.merge_and_unload):
        step(reference)
        step(model)
        assert torch.equal(_logits(model, ids), _logits(reference, ids)), step.__name__
        if step is lk.merge:
            assert q.merged_adapters == ["default"] and q.base_layer.weight.is_meta  # (offloaded again)
            assert torch.equal(stored_tensor(q.base_layer), reference.model.layers[0].self_attn.q_proj.base_layer.weight)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear) and not list(lk.iter_lora_layers(model))
    assert _files(tmp_path) == files  # (the offload folder is read, never written)


def test_a_model_loaded_with_disk_entries_in_its_device_map_merges_and_saves_the_merged_weights(tmp_path):
    """``from_pretrained(device_map=...)`` with "disk" entries; transformers' ``save_pretrained`` reads
    the offloaded weights through the hooks' maps, so the merged ones are what it writes."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 100, (2, 6))
    tiny_llama().save_pretrained(tmp_path / "model")
    targets = [*TARGETS, "lm_head"]
    reference = _with_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), "lora", targets)
    lk.merge_and_unload(reference)
    expected = _logits(reference, ids)

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    model = _with_adapter(model, "lora", targets)
    assert model.lm_head.base_layer.weight.is_meta
    files = _files(tmp_path)
    lk.merge_and_unload(model)
    assert torch.equal(_logits(model, ids), expected)
    model.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(again, ids), expected)
    assert {k: v for k, v in _files(tmp_path).items() if k in files} == files  # (model files and offload folder)


def test_a_refused_safe_merge_leaves_an_offloaded_weight_as_it_was(tmp_path):
    model = _with_adapter(_offloaded("cpu_offload", tmp_path), "lora")
    q = model.model.layers[0].self_attn.q_proj
    before = stored_tensor(q.base_layer).clone()
    with torch.no_grad():
        q.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        q.merge(safe=True)
    assert q.merged_adapters == [] and q.base_layer.weight.is_meta
    assert torch.equal(stored_tensor(q.base_layer), before)


@torch.no_grad()  # (the tiny model's weights are not frozen: in-place edits need it)
def test_materialized_puts_the_placeholder_back_and_writes_only_when_asked_and_the_block_succeeds(tmp_path):
    model = _offloaded("disk_offload", tmp_path)
    layer = model.model.layers[0].mlp.up_proj
    placeholder = layer.weight
    original = stored_tensor(layer).clone()
    with materialized(layer):  # (reading: nothing stored)
        assert not layer.weight.is_meta and torch.equal(layer.weight, original)
        layer.weight.add_(1)
    assert layer.weight is placeholder and torch.equal(stored_tensor(layer), original)
    with pytest.raises(RuntimeError, match="boom"), materialized(layer, write=True):
        layer.weight.add_(1)
        raise RuntimeError("boom")
    assert layer.weight is placeholder and torch.equal(stored_tensor(layer), original)
    with materialized(layer, write=True):
        layer.weight.add_(1)
    assert layer.weight is placeholder and torch.equal(stored_tensor(layer), original + 1)
    assert torch.equal(layer(torch.ones(1, 32)), torch.ones(1, 32) @ (original + 1).T)  # (the hook loads the new value)


def test_a_layer_not_offloaded_is_left_alone():
    layer = nn.Linear(3, 2)
    weight = layer.weight
    with materialized(layer, write=True):
        assert layer.weight is weight
    assert stored_tensor(layer) is weight and offload_hook(layer) is None


def test_a_meta_weight_with_no_offload_map_is_still_refused():
    with torch.device("meta"):
        model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="the model is not materialised"):
        lk.merge(model)
    assert not any(layer.merged_adapters for _, layer in lk.iter_lora_layers(model))


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_unmerging_a_tied_offloaded_head_gives_the_tie_back_as_on_a_plain_model(tmp_path, targets):
    """Found by a review (/tmp/review19): the head kept W + ΔW − ΔW and its tie was gone for good;
    on a plainly loaded model the unmerge ties the original weight back."""
    ids = torch.randint(3, 100, (2, 6))
    reference = _with_adapter(tiny_llama(tie=True), "lora", targets)
    model = tiny_llama(tie=True)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    model = _with_adapter(model, "lora", targets)
    head, embed = model.lm_head.base_layer, model.model.embed_tokens
    embed = getattr(embed, "base_layer", embed)
    assert stored_tensor(head).data_ptr() == stored_tensor(embed).data_ptr()  # (tied in the offload map)
    with pytest.warns(UserWarning, match="tied"):
        lk.merge(reference)
    lk.merge(model)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert not torch.equal(stored_tensor(head), stored_tensor(embed))
    lk.unmerge(reference)
    lk.unmerge(model)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert stored_tensor(head).data_ptr() == stored_tensor(embed).data_ptr()


def test_a_merge_into_weights_a_device_map_keeps_on_the_cpu_replaces_them_there():
    """accelerate keeps device_map "cpu" entries in its loader's state dict (read before its files):
    the merged weight replaces the entry there, not in front of it (the old one was kept too)."""
    import gc
    import weakref

    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader

    model = tiny_llama()
    blocks = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    loader = OffloadedWeightsLoader(state_dict={k: v.clone() for k, v in model.state_dict().items()})
    attach_align_device_hook_on_blocks(model, execution_device={k: torch.device("cpu") for k in blocks},
                                       offload={k: True for k in blocks}, weights_map=loader)
    model = _with_adapter(model, "lora")
    q = model.model.layers[0].self_attn.q_proj
    old = weakref.ref(loader.state_dict["model.layers.0.self_attn.q_proj.weight"])
    lk.merge(model)
    gc.collect()
    assert old() is None and torch.equal(loader.state_dict["model.layers.0.self_attn.q_proj.weight"],
                                         stored_tensor(q.base_layer))


def test_an_adapter_with_biases_is_refused_on_offloaded_layers_and_the_model_is_left_as_it_was(tmp_path):
    """Their biases sit on the meta device too: the load copied the saved biases into nothing."""
    ids = torch.randint(3, 100, (2, 6))
    source = tiny_llama(bias=True)
    lk.get_lora_model(source, lk.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"))
    lk.save_adapter(source, tmp_path / "a")
    model = tiny_llama(bias=True)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    before = _logits(model, ids)
    with pytest.raises(ValueError, match="on the meta device .* a bias cannot be loaded or trained there"):
        lk.load_adapter(model, tmp_path / "a")
    assert not list(lk.iter_lora_layers(model)) and torch.equal(_logits(model, ids), before)


def test_unmerging_a_deepcopy_of_a_merged_offloaded_model_leaves_the_original_alone():
    """What an unmerge puts back was a closure over the original's layer: unmerging a copy put the
    original's head back behind its back (a review, /tmp/review20)."""
    import copy

    ids = torch.randint(3, 100, (2, 6))
    model = tiny_llama(tie=True)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    model = _with_adapter(model, "lora", ["lm_head"])
    lk.merge(model)
    before = _logits(model, ids)
    twin = copy.deepcopy(model)
    lk.unmerge(twin)
    assert torch.equal(_logits(model, ids), before) and model.lm_head.merged_adapters == ["default"]
    assert stored_tensor(twin.lm_head.base_layer).data_ptr() == stored_tensor(twin.model.embed_tokens).data_ptr()
    lk.unmerge(model)
    assert torch.equal(_logits(model, ids), _logits(twin, ids))
