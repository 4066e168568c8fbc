"""PiSSA / OLoRA: init equal to PEFT's, training then convert_to_lora loads into the original base (lorakit + PEFT)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import TinyConvNet, Wrap, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _x_llama():
    return torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def _x_gpt2():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("make,targets,fan", [(tiny_llama, ["q_proj", "v_proj", "down_proj"], False), (tiny_gpt2, ["c_attn"], True)])
def test_init_matches_peft(init, make, targets, fan):
    if fan and init == "olora":
        pytest.skip("PEFT 0.21's olora_init ignores fan_in_fan_out (QR of the (in, out) Conv1D weight gives "
                    "A, B of swapped shapes); lorakit factors Wᵀ, see test_trained_adapter_converts...[gpt2]")
    base = make()
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(fan_in_fan_out=fan, **cfg))
    ours = lk.get_lora_model(copy.deepcopy(base), lk.LoraConfig(**cfg))
    theirs = {k.replace("base_model.model.", "").replace(".default.weight", "").replace(".default", ""): v
              for k, v in pm.state_dict().items()}
    mine = {k.replace(".default", ""): v for k, v in ours.state_dict().items() if "lora_init" not in k}
    assert set(mine) == set(theirs)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-5, msg=k)


def _train(model, x, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().logsumexp(-1).mean().backward()  # any loss that moves the adapter
        opt.step()


CASES = {
    "llama_pissa": (tiny_llama, _x_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights="pissa")),
    "llama_pissa_niter_rslora_patterns": (tiny_llama, _x_llama, dict(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa_niter_2", use_rslora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama_olora_embedding": (tiny_llama, _x_llama, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"], init_lora_weights="olora")),
    "gpt2_pissa": (tiny_gpt2, _x_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights="pissa")),
    "gpt2_olora": (tiny_gpt2, _x_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_adapter_converts_to_lora_on_original_base(case, tmp_path):
    make, make_x, kw = CASES[case]
    torch.manual_seed(0)
    original = make().eval()
    model = lk.get_lora_model(copy.deepcopy(original), lk.LoraConfig(**kw))
    x = make_x()
    torch.testing.assert_close(_logits(model, x), _logits(original, x), rtol=1e-4, atol=1e-4)  # init keeps the output
    _train(model, x)
    expected = _logits(model, x)
    assert (expected - _logits(original, x)).abs().max() > 1e-3  # training moved it
    lk.save_adapter(model, tmp_path, convert_to_lora=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * kw["r"] and cfg["init_lora_weights"] is True
    # lorakit, into an untouched copy of the original base
    ours = lk.load_adapter(copy.deepcopy(original), tmp_path)
    torch.testing.assert_close(_logits(ours, x), expected, rtol=1e-4, atol=1e-4)
    # PEFT, likewise
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, x), expected, rtol=1e-4, atol=1e-4)
    # and beside another adapter: the converted one is an ordinary LoRA
    lk.load_adapter(ours, tmp_path, adapter_name="second")
    lk.set_adapter(ours, "second")
    torch.testing.assert_close(_logits(ours, x), expected, rtol=1e-4, atol=1e-4)


def test_conversion_equals_peft_conversion(tmp_path):
    """PEFT's path_initial_model_for_weight_conversion and ours write the same tensors."""
    torch.manual_seed(0)
    original = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    pm = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(**kw))
    pm.save_pretrained(tmp_path / "init")  # the initial adapter, as PEFT's recipe wants
    ours = lk.get_lora_model(copy.deepcopy(original), lk.LoraConfig(**kw))
    with torch.no_grad():  # the same "trained" weights in both
        for (n1, p1), (n2, p2) in zip(sorted((n, p) for n, p in pm.named_parameters() if p.requires_grad),
                                      sorted((n, p) for n, p in ours.named_parameters() if p.requires_grad)):
            p1.add_(0.1 * torch.randn_like(p1))
            p2.copy_(p1)
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lk.save_adapter(ours, tmp_path / "ours", convert_to_lora=True)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    assert (ca["r"], ca["lora_alpha"], ca["init_lora_weights"]) == (cb["r"], cb["lora_alpha"], cb["init_lora_weights"])


def test_bad_input():
    with pytest.raises(ValueError, match="convert_to_lora needs a PiSSA/OLoRA adapter"):
        m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
        lk.save_adapter(m, "/tmp/never-written", convert_to_lora=True)
    with pytest.raises(ValueError, match="expected 'pissa_niter_' and a number, e.g. 'pissa_niter_4'"):
        lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_x"))
    with pytest.raises(ValueError, match="exceeds"):
        lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="unknown init_lora_weights"):
        lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pisa"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_adapter_loads_like_peft(init, tmp_path):
    """Saved as is (residual-relative), PEFT re-runs the init on load; lorakit does the same."""
    torch.manual_seed(0)
    original = tiny_llama()
    x = _x_llama()
    pm = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=init))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    expected = _logits(pm, x)
    ours = lk.load_adapter(copy.deepcopy(original), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, x), expected, rtol=1e-5, atol=1e-5)
    # and back: PEFT reads lorakit's unconverted file the same way. Serving engines do not (vLLM refuses
    # it, llama.cpp adds A, B to the original base): the save says so
    with pytest.warns(UserWarning, match="vLLM refuses it and llama.cpp adds it to the original base.*convert_to_lora=True"):
        lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["PiSSA", "Pissa_Niter_2"])
def test_an_init_name_in_another_case_is_saved_as_peft_reads_it(spelling, tmp_path):
    # lorakit matched the name in any case but saved it as typed: PEFT then refused the file
    # ("Unknown initialization"), reading "pissa..." in lower case only
    torch.manual_seed(0)
    original = tiny_llama()
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=spelling)
    assert cfg.init_lora_weights == spelling.lower()
    ours = lk.get_lora_model(copy.deepcopy(original), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the unconverted residual adapter's warning)
        lk.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == spelling.lower()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    if "niter" not in spelling.lower():  # (PEFT re-runs the randomized SVD on load: other factors)
        torch.testing.assert_close(_logits(theirs, _x_llama()), _logits(ours, _x_llama()), rtol=1e-5, atol=1e-5)


# ---- audit findings: checks before any change, PEFT's layer types, tied weights -----------------------

def test_conv2d_target_is_refused_with_the_model_untouched():
    """PEFT refuses PiSSA / OLoRA on convolutions; lorakit says so before changing anything."""
    model = TinyConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="conv1 is a Conv2d"):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["head", "conv1"], init_lora_weights="pissa"))
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_failed_injection_leaves_the_base_weights_as_they_were(init):
    """A rank too large for a later target was found after earlier targets had their residual written."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exceeds the weight's smallest dimension"):
        lk.get_lora_model(model, lk.LoraConfig(r=20, lora_alpha=20, target_modules=["q_proj", "k_proj"],
                                               init_lora_weights=init))
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_embedding_target_gets_peft_s_standard_init_and_interoperates(init, tmp_path):
    torch.manual_seed(0)
    original = tiny_llama()
    x = _x_llama()
    kw = dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init)
    with pytest.warns(UserWarning, match="Embedding layer gets the standard initialisation"):
        model = lk.get_lora_model(copy.deepcopy(original), lk.LoraConfig(**kw))
    emb = model.model.embed_tokens
    assert torch.equal(emb.base_layer.weight, original.model.embed_tokens.weight)  # no residual written
    _train(model, x)
    expected = _logits(model, x)
    lk.save_adapter(model, tmp_path / "as_is")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "as_is").eval()
    torch.testing.assert_close(_logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="standard initialisation"):
        ours = lk.load_adapter(copy.deepcopy(original), tmp_path / "as_is")
    torch.testing.assert_close(_logits(ours, x), expected, rtol=1e-5, atol=1e-5)
    lk.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
    plain = lk.load_adapter(copy.deepcopy(original), tmp_path / "converted")
    torch.testing.assert_close(_logits(plain, x), expected, rtol=1e-5, atol=1e-5)


def test_tied_output_head_is_untied_before_the_residual_is_written():
    torch.manual_seed(0)
    original = tiny_llama(tie=True)
    x = _x_llama()
    model = copy.deepcopy(original)
    with pytest.warns(UserWarning, match="tied to another module"):
        lk.get_lora_model(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights="pissa"))
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    torch.testing.assert_close(_logits(model, x), _logits(original, x), rtol=1e-4, atol=1e-4)


def test_saving_a_pissa_niter_adapter_unconverted_warns(tmp_path):
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_1"))
    with pytest.warns(UserWarning, match="convert_to_lora=True"):
        lk.save_adapter(model, tmp_path / "as_is")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.save_adapter(model, tmp_path / "converted", convert_to_lora=True)
        lk.load_adapter(tiny_llama(), tmp_path / "converted")  # (a plain LoRA: loads as it was saved)
    # loading the unconverted one redoes the randomised SVD: said so (it was silent)
    with pytest.warns(UserWarning, match="randomised SVD.*convert_to_lora=True"):
        lk.load_adapter(tiny_llama(), tmp_path / "as_is")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_residual_adapter_on_a_tied_head_is_refused_both_ways(init, tmp_path):
    # PEFT writes the residual into the shared weight (its embedding changes too), lorakit into a
    # copy: an unconverted file computed 0.47-0.49 off PEFT in lorakit and 0.8 off in PEFT
    import warnings

    torch.manual_seed(0)
    cfg = dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=init)
    theirs = peft.get_peft_model(tiny_llama(tie=True), peft.LoraConfig(**cfg))
    theirs.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama(tie=True)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="unconverted .* targets lm_head, whose weight is tied"):
        lk.load_adapter(fresh, tmp_path / "peft")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lk.get_lora_model(tiny_llama(tie=True), lk.LoraConfig(**cfg))
    with torch.no_grad():
        for _, layer in lk.iter_lora_layers(ours):
            layer.lora_B["default"].add_(0.1)
    with pytest.raises(ValueError, match=r"\['lm_head'\], whose weight was tied .* convert_to_lora=True"):
        lk.save_adapter(ours, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    lk.save_adapter(ours, tmp_path / "ours", convert_to_lora=True)  # the converted file loads the same everywhere
    x = _x_llama()
    want = _logits(ours, x)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path / "ours"), x), want,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(tie=True), tmp_path / "ours"), x), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_equal_to_the_smaller_dimension_is_allowed(init):
    """r = min(out, in) is the largest rank the weight has: allowed (only r above it is refused),
    and the output is unchanged at the start (the bug this catches: r >= smallest refused)."""
    torch.manual_seed(0)
    m = Wrap(nn.Linear(6, 4)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    before = m(x).detach()
    lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=4, target_modules=["layer"], init_lora_weights=init))
    torch.testing.assert_close(m(x).detach(), before, rtol=1e-10, atol=1e-10)
    if init == "pissa":  # full rank: the principal part is all of W, the residual ~0
        assert m.layer.base_layer.weight.abs().max() < 1e-6  # (the SVD runs in fp32)


def test_pissa_niter_runs_the_requested_subspace_iterations(monkeypatch):
    """'pissa_niter_K' is torch.svd_lowrank with K iterations (module docstring, Halko et al.),
    not the default iteration count."""
    seen = []
    real = torch.svd_lowrank

    def spy(A, q=6, niter=2, M=None):
        seen.append((q, niter))
        return real(A, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_5"))
    assert seen and all(s == (2, 5) for s in seen)


def test_convert_to_lora_refuses_a_dora_adapter(tmp_path):
    """A PiSSA adapter with DoRA cannot be written as plain LoRA (the magnitude rescales W): refused
    by name, nothing written (the bug this catches: the check removed)."""
    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa",
                                                      use_dora=True))
    with pytest.raises(ValueError, match="cannot express a DoRA adapter"):
        lk.save_adapter(m, tmp_path / "out", convert_to_lora=True)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


@pytest.mark.parametrize("init", ["pissa_niter_1", "pissa"])
def test_only_a_randomised_init_warns_on_load_and_the_warning_points_at_the_caller(tmp_path, init):  # O02, O03
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.load_adapter(tiny_llama(), tmp_path)
    svd = [w for w in caught if "randomised SVD" in str(w.message)]
    if init == "pissa":  # (deterministic: loading recomputes exactly what was trained against)
        assert not svd
    else:
        assert len(svd) == 1 and svd[0].filename == __file__


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_on_a_layer_with_a_merged_adapter_is_refused_with_the_model_untouched(init):
    """The init would decompose W + the merged update, and a load redoes it on W alone (the saved file
    was 0.13 off on load, with no warning)."""
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    lk.merge(model, ["a"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter\(s\) \['a'\] are merged into it"):
        lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
                          adapter_name="p")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lk.unmerge(model)  # then it is allowed
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init), adapter_name="p")


def _residual_and_plain(init="pissa"):
    """PiSSA adapter a on q_proj (its A, B then randomised, so it matters), plain adapter b on q and v."""
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init), adapter_name="a")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, lk.LoraLayer) and "a" in layer.lora_A:
                for p in (layer.lora_A["a"], layer.lora_B["a"]):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                      adapter_name="b")
    return model


def test_an_adapter_on_another_adapter_s_residual_base_warns_on_save_and_loads_right_with_it(tmp_path):
    """Adapter b shares q_proj with the PiSSA adapter a, whose init changed that weight: b's file fits
    the residual base. Saving says so (it said nothing, and b loaded alone was off); loaded together
    with a, it is right; a itself saves without that warning."""
    model = _residual_and_plain()
    x = _x_llama()
    lk.set_adapter(model, ["a", "b"])
    want = _logits(model, x)
    with pytest.warns(UserWarning, match=r"adapter 'b' shares base weights with the PiSSA/OLoRA adapter\(s\) \['a'\]"):
        lk.save_adapter(model, tmp_path / "b", "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.save_adapter(model, tmp_path / "a", "a", convert_to_lora=True)
    alone = lk.load_adapter(tiny_llama(), tmp_path / "b", adapter_name="b")
    lk.set_adapter(model, "b")
    assert (_logits(alone, x) - _logits(model, x)).abs().max() > 1e-3  # (off by a's initial update)
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "a", adapter_name="a")
    lk.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    lk.set_adapter(fresh, ["a", "b"])
    torch.testing.assert_close(_logits(fresh, x), want)


def test_a_combination_including_a_residual_adapter_warns_on_save_and_convert_to_lora_says_why_not(tmp_path):
    """combine_adapters({a: PiSSA, b}) is right in memory but sits on a's residual base; its file was
    off on the original base with no warning, and convert_to_lora claimed it 'already fits the
    original base'."""
    model = _residual_and_plain()
    lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "mix", method="cat")
    with pytest.warns(UserWarning, match=r"adapter 'mix' shares base weights .* \['a'\]"):
        lk.save_adapter(model, tmp_path / "mix", "mix")
    with pytest.raises(ValueError, match=r"residual initialisation of adapter\(s\) \['a'\] changed") as err:
        lk.save_adapter(model, tmp_path / "mix2", "mix", convert_to_lora=True)
    assert "already" not in str(err.value)
    assert not (tmp_path / "mix2").exists()


def test_two_residual_adapters_on_one_layer_say_to_save_both_converted_which_loads_right(tmp_path):
    """Each of two PiSSA adapters on q_proj sits on the other's residual too: the warning asks for both
    files converted (its advice was to load the other one unconverted first, 1e-3 off), which is exact."""
    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), adapter_name="a")
    lk.get_lora_model(model, lk.LoraConfig(r=3, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights="pissa"), adapter_name="b")
    x = _x_llama()
    lk.set_adapter(model, ["a", "b"])
    want = _logits(model, x)
    for name, other in (("a", "b"), ("b", "a")):
        with pytest.warns(UserWarning, match=rf"adapter '{name}' shares .*\['{other}'\] .*all saved with convert_to_lora=True"):
            lk.save_adapter(model, tmp_path / name, name, convert_to_lora=True)
    fresh = lk.load_adapter(tiny_llama(), tmp_path / "b", adapter_name="b")
    lk.load_adapter(fresh, tmp_path / "a", adapter_name="a")
    lk.set_adapter(fresh, ["a", "b"])
    torch.testing.assert_close(_logits(fresh, x), want)


def test_deleting_a_residual_adapter_drops_its_initial_factors_so_a_reused_name_is_not_taken_for_it(tmp_path):
    """A deleted PiSSA adapter's A0, B0 stayed on the layer: a plain adapter given its name later was
    then taken for a residual owner (named in other adapters' warnings, and excluded from its own)."""
    model = _residual_and_plain()
    lk.delete_adapter(model, "a")
    assert not any("a" in getattr(m, "lora_init_A", {}) for m in model.modules() if isinstance(m, lk.LoraLayer))
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.save_adapter(model, tmp_path / "b", "b")
    with pytest.raises(ValueError, match="saved as is, it is already a plain LoRA"):
        lk.save_adapter(model, tmp_path / "a", "a", convert_to_lora=True)
