"""Tests from mutation round 14 (/tmp/mutants14: mutants over LoraLayer's merge / unmerge (the
in-place path, the offloaded-weight bookkeeping, DoRA's norm product), the merge guard's
fingerprints, dora_caching, read_json_object, check_fits, the Trainer load hook, the missing-weight
refusal and load_checkpoint's checks; 94 mutants: 54 caught, 10 equivalent, one GPU-only left
unrun, 29 gaps): one test per gap, each checked to fail on its mutant; no bug found."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import tiny_llama
from test_inject import tied_pair
from test_variants_dora import _counting_norms
from test_variants_dora import _dora_embedding_and_linear as _dora_model


def _fc_with(specs: dict[str, dict], dtype=torch.float64, head: bool = False) -> nn.Module:
    """``fc`` (6 -> 5) with the adapters of ``specs`` (name: LoraConfig fields) on it, and with
    ``head`` a second layer (5 -> 3) after it, for modules_to_save."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(6, 5).to(dtype))
    if head:
        m.add_module("head", nn.Linear(5, 3).to(dtype))
    for name, kw in specs.items():
        lk.get_lora_model(m, lk.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["fc"],
                                              "init_lora_weights": False, **kw}), adapter_name=name)
    with torch.no_grad():  # (DoRA magnitudes away from the weight's norms, so the order of merges matters)
        for store in (m.fc.__dict__.get("_modules", {}).get("lora_magnitude_vector") or {}).values():
            store.mul_(1.5)
    return m.eval()


# ---- merge / unmerge (layers/base.py) -------------------------------------------------------

def test_dora_caching_sees_another_adapter_merged_into_the_weight():  # b5
    m = _fc_with({"d": {"use_dora": True}, "p": {}}, dtype=torch.float32)
    lk.set_adapter(m, ["d"])
    x = torch.randn(3, 6)
    with lk.dora_caching(), torch.no_grad():
        m(x)
        m.fc.merge(["p"])  # (in place: W + ΔW_p, which d's column norm reads)
        got = m(x)
    with torch.no_grad():
        assert torch.equal(got, m(x))  # (as computed without the cache)


def test_unmerging_a_float64_adapter_from_a_float32_weight_subtracts_in_float64():  # b11
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(64, 48))
    lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"], init_lora_weights=False))
    m.fc.lora_A.double()
    m.fc.lora_B.double()
    delta = m.fc.delta_weight("default")
    assert delta.dtype == torch.float64
    m.fc.merge()
    merged = m.fc.base_layer.weight.detach().clone()
    m.fc.unmerge()
    assert torch.equal(m.fc.base_layer.weight, (merged.double() - delta).float())  # (rounded once)


def test_a_dora_merge_made_after_a_plain_unmerge_goes_back_in_as_its_own_merge():  # b20
    """merge(x); merge(q); merge(p); unmerge(q); merge(d); unmerge(x): p and d go back in as the two
    merges they were (d's norm reading the weight with p folded in)."""
    m = _fc_with({"x": {}, "q": {}, "p": {}, "d": {"use_dora": True}})
    ref = copy.deepcopy(m)
    for name in ("x", "q", "p"):
        m.fc.merge([name])
    m.fc.unmerge(["q"])
    m.fc.merge(["d"])
    m.fc.unmerge(["x"])
    ref.fc.merge(["p"])
    ref.fc.merge(["d"])
    assert m.fc.merged_adapters == ["p", "d"]
    torch.testing.assert_close(m.fc.base_layer.weight, ref.fc.base_layer.weight, rtol=1e-12, atol=1e-12)


def test_a_tie_split_by_a_merge_comes_back_after_a_delete_and_an_unmerge():  # b21
    """A merge records the bits it wrote into an untied weight: the tie's check on a holder still
    merged (here at delete_adapter) must not take it for edited and drop the tie."""
    m = tied_pair("lm_head", "embed_tokens", r=4)  # (tiny_llama seeds itself)
    with pytest.warns(UserWarning, match="tied"):
        lk.merge(m)
    assert m.lm_head.base_layer.weight is not m.model.embed_tokens.base_layer.weight
    lk.delete_adapter(m, "b")
    lk.unmerge(m)
    assert m.lm_head.base_layer.weight is m.model.embed_tokens.weight


# b23, b24 (an Embedding's merge and DoRA norm against PEFT where (B A)ᵀ and Aᵀ Bᵀ differ): a case of
# test_layer_edge_cases's test_an_embedding_s_merge_and_dora_norm_are_peft_s_to_the_bit


# ---- offloaded weights (accelerate) -----------------------------------------------------------

def _offloaded_tied(targets, names=("default",)):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(tie=True)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    torch.manual_seed(0)
    for name in names:
        lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=targets, init_lora_weights=False), adapter_name=name)
    lk.set_adapter(model, list(names))
    return model


def test_a_layer_level_merge_and_unmerge_of_an_offloaded_tied_head_ties_it_again():  # b13
    from lorakit.layers.offload import stored_tensor

    model = _offloaded_tied(["lm_head"])
    head, embed = model.lm_head.base_layer, model.model.embed_tokens
    assert stored_tensor(head).data_ptr() == stored_tensor(embed).data_ptr()
    model.lm_head.merge()
    assert stored_tensor(head).data_ptr() != stored_tensor(embed).data_ptr()
    model.lm_head.unmerge()
    assert stored_tensor(head).data_ptr() == stored_tensor(embed).data_ptr()  # (as lorakit.unmerge does)


def test_unmerging_one_of_two_adapters_from_an_offloaded_tied_head_keeps_the_other():  # b16
    from lorakit.layers.offload import stored_tensor

    model = _offloaded_tied(["lm_head"], names=("a", "b"))
    head, embed = model.lm_head, model.model.embed_tokens
    lk.merge(model)
    head.unmerge(["a"])
    assert head.merged_adapters == ["b"]
    B, A, s = head.lora_B["b"], head.lora_A["b"], head.scaling["b"]
    torch.testing.assert_close(stored_tensor(head.base_layer), stored_tensor(embed) + s * (B @ A).detach())
    lk.unmerge(model)
    assert stored_tensor(head.base_layer).data_ptr() == stored_tensor(embed).data_ptr()


def test_a_safe_model_merge_of_an_offloaded_model_checks_and_merges():  # b25
    accelerate = pytest.importorskip("accelerate")
    ids = torch.randint(3, 100, (2, 6))
    reference = tiny_llama()
    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    for m in (reference, model):
        torch.manual_seed(0)
        lk.get_lora_model(m, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        lk.merge(m, safe=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ---- fingerprints (layers/guard.py) -----------------------------------------------------------

def test_an_adapter_whose_first_two_entries_traded_places_while_merged_is_not_unmerged():  # g4
    torch.manual_seed(0)
    m = tiny_llama().eval()
    lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    lk.merge(m)
    with torch.no_grad():
        A = m.model.layers[0].self_attn.q_proj.lora_A["default"]
        A[0, :2] = A[0, :2].flip(0).clone()
    with pytest.raises(ValueError, match="changed"):
        lk.unmerge(m)


# ---- dora_caching (variants/dora.py) --------------------------------------------------------

def test_a_nested_dora_caching_block_leaves_the_outer_one_caching(monkeypatch):  # d3
    model = _dora_model()
    ids = torch.randint(3, 100, (2, 6))
    calls = _counting_norms(monkeypatch)
    with lk.dora_caching(), torch.no_grad():
        model(ids)
        formed = len(calls)
        with lk.dora_caching():
            model(ids)
        model(ids)
    assert formed == 3 and len(calls) == formed  # (formed once, then reused in and after the inner block)


def test_an_error_inside_dora_caching_ends_the_caching_too(monkeypatch):  # d5
    model = _dora_model()
    ids = torch.randint(3, 100, (2, 6))
    calls = _counting_norms(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"), lk.dora_caching(), torch.no_grad():
        model(ids)
        raise RuntimeError("boom")
    formed = len(calls)
    with torch.no_grad():
        model(ids)
    assert len(calls) == 2 * formed  # (outside the block: formed at every forward)


def test_dora_caching_sees_a_tensor_swapped_for_another_of_the_same_version():  # d7
    model = _dora_model()
    ids = torch.randint(3, 100, (2, 6))
    q = model.model.layers[0].self_attn.q_proj
    first = nn.Parameter(torch.randn(q.lora_B["default"].shape) * 0.1)
    second = nn.Parameter(torch.randn(q.lora_B["default"].shape) * 0.1)
    assert first._version == second._version
    q.lora_B["default"] = first
    with lk.dora_caching(), torch.no_grad():
        model(ids)
        q.lora_B["default"] = second  # (``first`` still alive: kept by the caller)
        got = model(ids).logits
    with torch.no_grad():
        assert torch.equal(got, model(ids).logits)  # (as computed without the cache)
    assert first is not None


def test_dora_caching_runs_a_model_made_under_inference_mode():  # d9
    ids = torch.randint(3, 100, (2, 6))
    with torch.inference_mode():
        model = _dora_model()
        expected = model(ids).logits
        with lk.dora_caching():  # (inference tensors track no version: nothing cached, no error)
            assert torch.equal(model(ids).logits, expected)


def test_dora_caching_keeps_an_offloaded_layer_s_norm_and_sees_a_merge_into_its_weight(monkeypatch):  # d12
    """cpu_offload keeps the weight in memory: the norm is kept across forwards (accelerate puts a new
    meta placeholder in the layer at each forward: the key is the stored weight, not the placeholder)."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    torch.manual_seed(0)
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
                      adapter_name="d")
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), adapter_name="p")
    lk.set_adapter(model, ["d"])
    model.eval()
    ids = torch.randint(3, 100, (2, 6))
    q = model.model.layers[0].self_attn.q_proj
    calls = _counting_norms(monkeypatch)
    with lk.dora_caching(), torch.no_grad():
        model(ids)
        formed = len(calls)
        model(ids)
        assert formed == 2 and len(calls) == formed  # (two q_proj layers: formed once, then reused)
        q.merge(["p"])  # (the offload map's weight replaced)
        got = model(ids).logits
    with torch.no_grad():
        assert torch.equal(got, model(ids).logits)  # (as computed without the cache)


def test_dora_on_offloaded_layers_with_biases_computes_as_on_a_plain_model():  # d14
    accelerate = pytest.importorskip("accelerate")
    ids = torch.randint(3, 100, (2, 6))
    reference = tiny_llama(bias=True)
    model = tiny_llama(bias=True)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    for m in (reference, model):
        torch.manual_seed(0)
        lk.get_lora_model(m, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                           init_lora_weights=False))
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ---- the Trainer load hook (hf_methods.py) --------------------------------------------------

def test_a_load_of_the_trainable_tensors_of_a_shared_module_under_both_its_names_is_quiet():  # h4
    """A module registered under two names (a block shared by two layers, as Zamba2's): its LoRA
    tensors are trainable under both, and a load of exactly the trainable tensors holds both."""
    model = tiny_llama()
    model.model.layers[1].mlp = model.model.layers[0].mlp
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert "model.layers.1.mlp.up_proj.lora_A.default" in trainable
    state = model.state_dict()
    assert model.load_state_dict({k: state[k].clone() for k in trainable}, strict=False).missing_keys == []


def test_after_unload_a_strict_load_lacking_keys_raises_as_torch_does():  # h5, h6
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.get_lora_model(model, lk.LoraConfig(r=4, target_modules=["v_proj"]), adapter_name="b")  # (install again)
    lk.unload(model)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # (what is trainable now: the norm alone)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"model.norm.weight": torch.ones(32)})


# ---- weights missing from a model's files (models.py) --------------------------------------

def test_a_model_directory_lacking_one_tensor_is_refused_naming_it(tmp_path):  # m3
    from safetensors.torch import load_file, save_file
    from tiny_lm import save_tiny_model

    from lorakit import models

    path = save_tiny_model(tmp_path / "llama")
    (weights_file,) = path.glob("*.safetensors")
    tensors = load_file(weights_file)
    del tensors["model.norm.weight"]
    save_file(tensors, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"its weight files lack 1 of the model's tensors \(model.norm.weight\), "
                                         r"which would be initialised at random"):
        models.load_model_and_tokenizer(path)


def test_three_missing_tensors_are_named_without_a_count_of_more():  # m2
    from lorakit.models import _refuse_missing_weights

    with pytest.raises(ValueError) as three:
        _refuse_missing_weights({"missing_keys": ["c", "a", "b"]})
    assert "3 of the model's tensors (a, b, c), which" in str(three.value)
    with pytest.raises(ValueError, match=r"4 of the model's tensors \(a, b, c and 1 more\)"):
        _refuse_missing_weights({"missing_keys": ["c", "a", "b", "d"]})


# ---- load_checkpoint (train/loop.py) -------------------------------------------------------

# l5 (moments transposed, as many values): a case of test_coverage_subprocess_gaps's
# test_an_optimizer_state_of_another_rank_is_refused_before_anything_changes

def test_an_optimizer_state_for_a_parameter_the_optimizer_lacks_is_refused_naming_it(tmp_path):  # l3
    from test_coverage_subprocess_gaps import _resumable, _saved

    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    count = len(state["param_groups"][0]["params"])
    state["state"][count] = copy.deepcopy(state["state"][0])
    torch.save(state, ckpt / "optimizer.pt")
    model, opt, sched = _resumable(4)
    with pytest.raises(ValueError, match=rf"optimizer.pt: state for parameter {count}, the optimizer has {count}"):
        load_checkpoint(ckpt, model, opt, sched)
    assert not opt.state


@pytest.mark.parametrize("rng", [torch.zeros(torch.get_rng_state().shape, dtype=torch.float32),  # l8
                                 torch.zeros(3, dtype=torch.uint8)], ids=["float", "short"])  # l9
def test_an_rng_state_that_torch_would_refuse_is_refused_before_anything_changes(tmp_path, rng):
    from test_coverage_subprocess_gaps import _resumable, _saved, _trainable

    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    torch.save({"torch": rng}, ckpt / "rng.pt")
    model, opt, sched = _resumable(4)
    before, state = _trainable(model), torch.get_rng_state()
    with pytest.raises(ValueError, match="is unreadable: rng.pt: not a torch RNG state"):
        load_checkpoint(ckpt, model, opt, sched)
    after = _trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before) and not opt.state
    assert torch.equal(torch.get_rng_state(), state)


def test_a_scheduler_state_refused_half_way_leaves_the_scheduler_as_it_was(tmp_path):  # l11
    """LambdaLR takes the saved attributes, then fails on a function entry it has no function for."""
    from test_coverage_subprocess_gaps import _resumable, _saved

    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    state = torch.load(ckpt / "scheduler.pt", weights_only=True)
    state["lr_lambdas"] = [None, {}]  # (two functions' state; the scheduler has one)
    torch.save(state, ckpt / "scheduler.pt")
    model, opt, sched = _resumable(4)
    lr, epoch = sched.get_last_lr(), sched.last_epoch
    with pytest.raises(ValueError, match="is unreadable: scheduler.pt"):
        load_checkpoint(ckpt, model, opt, sched)
    assert sched.get_last_lr() == lr and sched.last_epoch == epoch and opt.param_groups[0]["lr"] == lr[0]


def test_a_checkpoint_written_before_the_first_step_is_at_step_0(tmp_path):  # l14
    """A Ctrl-C during the first step writes a checkpoint at step 0."""
    import json

    from lorakit.train.loop import CHECKPOINT, ckpt_step

    (tmp_path / CHECKPOINT).mkdir()
    (tmp_path / CHECKPOINT / "trainer_state.json").write_text(json.dumps({"step": 0}))
    assert ckpt_step(tmp_path) == 0


def test_a_trainer_state_that_cannot_be_read_gives_no_step(tmp_path, monkeypatch):  # l15
    """An I/O error reading trainer_state.json (simulated: root reads any file) is "no step", as a
    damaged file is, not an error at the end of a finished run."""
    import pathlib

    from lorakit.train.loop import CHECKPOINT, ckpt_step

    (tmp_path / CHECKPOINT).mkdir()
    (tmp_path / CHECKPOINT / "trainer_state.json").write_text('{"step": 3}')
    assert ckpt_step(tmp_path) == 3
    real = pathlib.Path.read_text

    def failing(self, *args, **kwargs):
        if self.name == "trainer_state.json":
            raise OSError(5, "Input/output error")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "read_text", failing)
    assert ckpt_step(tmp_path) is None


def test_an_unmerge_gives_an_offloaded_tied_head_the_weights_of_its_merge_not_of_a_refused_one():  # b14
    """A refused merge forgets what it remembered: here the stored weights are replaced (shared again)
    between the refused merge and the next one, whose unmerge must tie the head to the new ones."""
    from lorakit.layers.offload import offload_hook, stored_tensor

    model = _offloaded_tied(["lm_head"])
    head, embed = model.lm_head, model.model.embed_tokens
    with torch.no_grad():
        head.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        head.merge(safe=True)
    state = offload_hook(head.base_layer).weights_map.dataset  # (cpu_offload's state dict of the model)
    new = torch.randn(stored_tensor(embed).shape)
    state["lm_head.weight"], state["model.embed_tokens.weight"] = new, new.detach()  # (two tensors, one storage)
    with torch.no_grad():
        head.lora_B["default"][0, 0] = 0.5
    lk.merge(model)
    lk.unmerge(model)
    assert stored_tensor(head.base_layer).data_ptr() == stored_tensor(embed).data_ptr() == new.data_ptr()
