"""inspect / extract / resize and the data-driven rank mode, checked against PEFT itself."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.analysis import adapter_tools as at
from lorakit.analysis import recommend
from lorakit.cli import main

peft = pytest.importorskip("peft")


def _llama(seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _save_model(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save_model(_llama(0), tmp_path_factory.mktemp("base"))


def _peft_adapter(tmp_path, **cfg):
    model = _llama(0)
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **cfg))
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return out, peft_model


def _zero_b(path, module):
    """Zero the B factor of ``module`` in the adapter file at ``path`` (its ΔW becomes 0)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    for k in sd:
        if f"{module}.lora_B" in k:
            sd[k].zero_()
    save_file(sd, str(path / "adapter_model.safetensors"))


def _peft_deltas(peft_model):
    """name -> ΔW in the base weight's layout, as PEFT computes it."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in (getattr(module, "r", None) or {}):
            out[name] = module.get_delta_weight("default").detach().double()
    return out


def test_inspect_matches_peft(tmp_path, base_dir):
    path, pm = _peft_adapter(tmp_path, r=8, lora_alpha=16, use_rslora=True,
                             rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"v_proj": 5})
    rep = at.inspect_adapter(path, base=base_dir)
    rows = {r["module"]: r for r in rep["modules"]}
    deltas = _peft_deltas(pm)
    assert set(rows) == set(deltas) and len(rows) == 4
    for name, module in pm.base_model.model.named_modules():
        if name in rows:
            assert rows[name]["r"] == module.r["default"]
            assert rows[name]["scaling"] == pytest.approx(module.scaling["default"])
            assert rows[name]["delta_norm"] == pytest.approx(float(deltas[name].norm()), rel=1e-6)
            true_rank = int(torch.linalg.matrix_rank(deltas[name], rtol=1e-5))
            assert rows[name]["rank99"] <= true_rank == rows[name]["r"]
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert rep["totals"]["params"] == trainable
    assert rep["totals"]["size_on_disk"] > 4 * trainable
    assert rep["loads"] == {"ok": True, "problems": []}


def test_inspect_flags_mismatched_base(tmp_path):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    other = _save_model(_llama(1, hidden=48), tmp_path / "other")
    loads = at.inspect_adapter(path, base=other)["loads"]
    assert not loads["ok"]
    assert any("q_proj" in p and "(48, 48)" in p and "expects (32, 32)" in p for p in loads["problems"])


@pytest.mark.parametrize("extra", [
    {},
    {"use_rslora": True, "alpha_pattern": {"v_proj": 3}, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
], ids=["plain", "rslora-alpha_pattern-embedding"])
def test_resize_is_the_best_low_rank_approximation_and_loads_in_peft(tmp_path, extra):
    cfg = {"r": 8, "lora_alpha": 16, **extra}
    path, pm = _peft_adapter(tmp_path, **cfg)
    before = _peft_deltas(pm)
    out = tmp_path / "small"
    rep = at.resize_adapter(path, 3, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 16
    assert len(rep["modules"]) == len(before)
    loaded = peft.PeftModel.from_pretrained(_llama(0), out)
    after = _peft_deltas(loaded)
    for row in rep["modules"]:
        d0, d1 = before[row["module"]], after[row["module"]]
        u, s, vh = torch.linalg.svd(d0, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(d1, best, atol=1e-5)
        assert row["rel_error"] == pytest.approx(float((d0 - d1).norm() / d0.norm()), abs=1e-5)
        assert row["rel_error"] > 0.01
    assert rep["new_params"] < rep["old_params"]


def test_resize_to_full_rank_keeps_outputs(tmp_path):
    path, pm = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "same"
    rep = at.resize_adapter(path, 4, out)
    assert rep["max_rel_error"] < 1e-6
    ids = torch.randint(0, 101, (2, 7))
    loaded = peft.PeftModel.from_pretrained(_llama(0), out)
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def _tuned_copy(base_model, ranks: dict[str, int], seed: int = 3):
    """A 'fully fine-tuned' model: base + an exact rank-k update on the named modules."""
    import copy

    tuned = copy.deepcopy(base_model)
    g = torch.Generator().manual_seed(seed)
    for name, k in ranks.items():
        w = tuned.get_submodule(name).weight
        with torch.no_grad():
            w += 0.05 * torch.randn(w.shape[0], k, generator=g) @ torch.randn(k, w.shape[1], generator=g)
    return tuned


def test_extract_recovers_a_low_rank_finetune(tmp_path, base_dir):
    base_model = _llama(0)
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2,
             "model.layers.0.mlp.up_proj": 3}
    tuned = _tuned_copy(base_model, ranks)
    tuned_dir = _save_model(tuned, tmp_path / "tuned")
    out = tmp_path / "extracted"
    rep = at.extract_adapter(base_dir, tuned_dir, rank=3, out=out)
    assert {r["module"] for r in rep["modules"]} == set(ranks)
    for row in rep["modules"]:
        assert row["rank99"] == ranks[row["module"]]
        assert row["rel_error"] < 1e-6
    loaded = peft.PeftModel.from_pretrained(_llama(0), out)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)

    # rank 1 cannot hold a rank-2/3 update: the reported error is the true one
    rep1 = at.extract_adapter(base_dir, tuned_dir, rank=1, out=tmp_path / "r1")
    sd_b, sd_t = base_model.state_dict(), tuned.state_dict()
    for row in rep1["modules"]:
        d = (sd_t[row["module"] + ".weight"] - sd_b[row["module"] + ".weight"]).double()
        s = torch.linalg.svdvals(d)
        assert row["rel_error"] == pytest.approx(math.sqrt(float((s[1:] ** 2).sum() / (s**2).sum())), rel=1e-6)
        assert row["rel_error"] > 0.1


def test_data_driven_ranks_from_tuned_model_and_adapter(tmp_path, base_dir):
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 5}
    tuned_dir = _save_model(_tuned_copy(_llama(0), ranks), tmp_path / "tuned")
    dd = recommend.data_driven_ranks(base=base_dir, tuned=tuned_dir)
    got = {r["module"]: r for r in dd["modules"]}
    assert set(got) == set(ranks)
    assert {m: got[m]["rank99"] for m in ranks} == ranks
    assert got["model.layers.1.mlp.down_proj"]["suggested"] == 8  # 5 rounded up to a power of two
    assert set(dd["rank_pattern"].values()) | {dd["r"]} == {2, 8}

    # adapter mode: an r=8 adapter whose q_proj updates really have rank 1
    path, pm = _peft_adapter(tmp_path, r=8, lora_alpha=16)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    for k in sd:
        if "q_proj.lora_A" in k:
            sd[k][1:] = 0
    save_file(sd, str(path / "adapter_model.safetensors"))
    dd = recommend.data_driven_ranks(adapter=path)
    for row in dd["modules"]:
        assert (row["rank99"] == 1) == ("q_proj" in row["module"])


def test_model_cost_counts_what_peft_trains(tmp_path, base_dir):
    cost = recommend.model_cost(base_dir, 8, ("q_proj", "v_proj", "down_proj"), batch_size=2, seq_len=16,
                                precision="fp32")
    path, pm = _peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert cost["trainable_params"] == trainable
    size = (path / "adapter_model.safetensors").stat().st_size
    assert abs(cost["adapter_bytes"] - size) / size < 0.05
    assert cost["memory"]["peak"] > cost["memory"]["weights"] > 0


def test_cli_inspect_extract_resize(tmp_path, base_dir, capsys):
    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16)
    assert main(["inspect", str(path), "--base", str(base_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["loads"]["ok"] and len(rep["modules"]) == 4
    assert main(["resize", str(path), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    text = capsys.readouterr().out
    assert "mean relative error" in text and (tmp_path / "r2" / "resize_error.png").read_bytes()[:4] == b"\x89PNG"
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.v_proj": 1}), tmp_path / "t")
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tuned_dir), "--rank", "4",
                 "--out", str(tmp_path / "ex"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [m["module"] for m in rep["modules"]] == ["model.layers.0.self_attn.v_proj"]
    assert main(["recommend", "--task", "medium", "--data-size", "500", "--model", str(base_dir),
                 "--targets", "q_proj,v_proj,down_proj", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["recommendation"]["rank"] == 4 and rec["cost"]["modules"] == 6
    assert main(["recommend", "--adapter", str(path), "--out", str(tmp_path / "rec")]) == 0
    assert "rank_pattern" in capsys.readouterr().out
    assert (tmp_path / "rec" / "recommend_ranks.png").is_file()
    assert main(["resize", str(tmp_path / "nope"), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a file (the adapter's own config) was "does not exist" too
    assert main(["inspect", str(path / "adapter_config.json")]) == 2
    assert "is a file; give the adapter's directory" in capsys.readouterr().err
    # a batch size the memory estimate cannot take: exit 0 and "no memory estimate" on stdout before
    assert main(["recommend", "--task", "medium", "--data-size", "500", "--model", str(base_dir),
                 "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["resize", str(path), "--rank", "0", "--out", str(tmp_path / "x")]) == 2


def test_read_adapter_rejects_bad_input(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'r'"):
        at.read_adapter(tmp_path)
    with pytest.raises(FileNotFoundError):
        at.read_adapter(tmp_path / "missing")


def test_extract_from_gpt2_conv1d_layout(tmp_path):
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64)
    base = GPT2LMHeadModel(cfg).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # Conv1D weights are (in, out)
        tuned.transformer.h[0].attn.c_attn.weight += 0.05 * torch.randn(32, 2) @ torch.randn(2, 96)
    base.save_pretrained(tmp_path / "b")
    tuned.save_pretrained(tmp_path / "t")
    rep = at.extract_adapter(tmp_path / "b", tmp_path / "t", rank=2, out=tmp_path / "ex")
    assert [m["module"] for m in rep["modules"]] == ["transformer.h.0.attn.c_attn"]
    assert json.loads((tmp_path / "ex" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.manual_seed(0)  # the same initialisation as `base`
    loaded = peft.PeftModel.from_pretrained(GPT2LMHeadModel(cfg).eval(), tmp_path / "ex").eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)
    assert at.inspect_adapter(tmp_path / "ex", base=tmp_path / "b")["loads"]["ok"]


# ---- bad input: every refusal is one clear error, and nothing on disk is overwritten or half-written ----

def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_resize_and_extract_refuse_an_existing_out(tmp_path, base_dir, capsys):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    before = _files(path)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        at.resize_adapter(path, 2, path)  # in place
    run = tmp_path / "run"  # a training run directory holding an adapter
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "log.jsonl").write_text("keep me\n")
    kept = _files(run)
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.v_proj": 1}), tmp_path / "t")
    with pytest.raises(FileExistsError, match="'.*run'"):
        at.extract_adapter(base_dir, tuned_dir, 2, run)
    assert main(["resize", str(path), "--rank", "2", "--out", str(run)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["extract", "--base", str(base_dir), "--tuned", str(tuned_dir), "--rank", "2", "--out", str(path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert _files(path) == before and _files(run) == kept
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    at.resize_adapter(path, 2, tmp_path / "empty")
    assert json.loads((tmp_path / "empty" / "adapter_config.json").read_text())["r"] == 2


def test_a_failed_write_leaves_no_adapter(tmp_path, monkeypatch):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(at, "save_file", broken_save)
    out = tmp_path / "out" / "small"
    with pytest.raises(OSError, match="disk full"):
        at.resize_adapter(path, 2, out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("alpha", [0.0, -2.0, float("nan"), float("inf")])
def test_extract_refuses_alpha_that_is_not_finite_and_positive(tmp_path, base_dir, alpha):
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.v_proj": 1}), tmp_path / "t")
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        at.extract_adapter(base_dir, tuned_dir, 2, tmp_path / "ex", alpha=alpha)
    assert not (tmp_path / "ex").exists()


@pytest.mark.parametrize("rank", [2.5, 2.0, float("nan"), "2", True])
def test_resize_and_extract_take_integer_ranks_only(tmp_path, base_dir, rank):
    # 2.5 reached a slice (a bare TypeError), "2" a comparison; True was taken as rank 1
    path, _ = _peft_adapter(tmp_path / "a", r=4, lora_alpha=8)
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.v_proj": 1}), tmp_path / "t")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        at.resize_adapter(path, rank, tmp_path / "small")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        at.extract_adapter(base_dir, tuned_dir, rank, tmp_path / "ex")
    with pytest.raises(ValueError, match="energy must be a number in"):
        at.resize_adapter(path, 2, tmp_path / "small", energy="0.5")
    assert not (tmp_path / "small").exists() and not (tmp_path / "ex").exists()


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_resize_refuses_zero_scaling_and_handles_negative_alpha(tmp_path):
    path, _ = _peft_adapter(tmp_path / "zero", r=4, lora_alpha=8)
    _edit_config(path, lora_alpha=0)
    with pytest.raises(ValueError, match="scaling 0"):
        at.resize_adapter(path, 2, tmp_path / "z2")
    assert not (tmp_path / "z2").exists()
    # a negative alpha is a valid (sign-flipped) scaling: the resized factors must stay finite and exact
    path, pm = _peft_adapter(tmp_path / "neg", r=4, lora_alpha=-8)
    at.resize_adapter(path, 4, tmp_path / "n4")
    loaded = _peft_deltas(peft.PeftModel.from_pretrained(_llama(0), tmp_path / "n4"))
    for name, d in _peft_deltas(pm).items():
        assert torch.allclose(loaded[name], d, atol=1e-5)


def test_write_refuses_non_finite_tensors(tmp_path):
    with pytest.raises(ValueError, match="NaN or inf.*lora_A"):
        at._write_adapter(tmp_path / "out", {"r": 1}, {"m.lora_A.weight": torch.tensor([[float("nan")]]),
                                                       "m.lora_B.weight": torch.ones(1, 1)})
    assert not (tmp_path / "out").exists()


def test_non_finite_alpha_or_tensors_are_clear_errors(tmp_path, capsys):
    path, _ = _peft_adapter(tmp_path / "a", r=4, lora_alpha=8)
    _edit_config(path, lora_alpha=float("nan"))  # json writes NaN, which json reads back
    for argv in (["inspect", str(path)], ["resize", str(path), "--rank", "2", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "lora_alpha" in err and "Traceback" not in err
    path, _ = _peft_adapter(tmp_path / "b", r=4, lora_alpha=8)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(sd)[0]
    sd[key][0, 0] = float("inf")
    save_file(sd, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=f"{key}.*NaN or inf"):
        at.inspect_adapter(path)


def test_resize_refuses_a_rank_above_the_adapters(tmp_path, capsys):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    assert main(["resize", str(path), "--rank", "64", "--out", str(tmp_path / "big")]) == 2
    assert "above the adapter's largest rank (4)" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_inspect_loads_verdict_is_the_loaders(tmp_path, base_dir, capsys):
    # config says r=8, tensors are rank 4: lorakit's loader refuses it, so inspect must say NO
    path, _ = _peft_adapter(tmp_path / "r", r=4, lora_alpha=8)
    _edit_config(path, r=8)
    rep = at.inspect_adapter(path, base=base_dir)
    assert not rep["loads"]["ok"] and "shape mismatch" in rep["loads"]["problems"][0]
    assert any("r=8" in w and "rank 4" in w for w in rep["warnings"])
    assert main(["inspect", str(path), "--base", str(base_dir)]) == 1
    out = capsys.readouterr().out
    assert f"loads against {base_dir}: NO" in out and "warning:" in out and "r=8" in out
    # lora_alpha as a string: the loader's own message
    path, _ = _peft_adapter(tmp_path / "s", r=4, lora_alpha=8)
    _edit_config(path, lora_alpha="16")
    assert main(["inspect", str(path), "--base", str(base_dir)]) == 2
    assert "lora_alpha must be a number" in capsys.readouterr().err


def test_mismatched_factor_ranks_are_refused(tmp_path):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in sorted(sd) if "lora_A" in k)
    sd[key] = sd[key][:2]
    save_file(sd, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="ranks .* must agree"):
        at.read_adapter(path)


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "expected a JSON object"),
    (b"{not json", "not valid JSON"),
    (b'{"r": 4, "lora_alpha": "\xff"}', "not UTF-8 text (invalid start byte at byte 24)"),
], ids=["list", "bad-json", "not-utf8"])
def test_unreadable_adapter_config_names_the_file(tmp_path, capsys, content, message):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    (path / "adapter_config.json").write_bytes(content)
    for argv in (["inspect", str(path)], ["resize", str(path), "--rank", "2", "--out", str(tmp_path / "o")],
                 ["recommend", "--adapter", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and str(path / "adapter_config.json") in err


def test_truncated_weights_are_one_line_errors(tmp_path, base_dir, capsys):
    path, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for argv in (["inspect", str(path)], ["resize", str(path), "--rank", "2", "--out", str(tmp_path / "o")],
                 ["recommend", "--adapter", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "truncated or corrupt" in err and str(weights) in err
    tuned = _save_model(_llama(1), tmp_path / "m_trunc")
    model_file = tuned / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:5000])
    for argv in (["extract", "--base", str(base_dir), "--tuned", str(tuned), "--rank", "2", "--out", str(tmp_path / "x")],
                 ["lowrank", "--model", str(tuned), "--no-plot"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "truncated or corrupt" in err and str(model_file) in err
    assert not (tmp_path / "x").exists()


# ---- audit fixes: each test fails without its fix ----

def _loaded_deltas(adapter_dir, names):
    """name -> ΔW (base weight layout) of the adapter merged by lorakit's loader and by PEFT."""
    import lorakit

    base = dict(_llama(0).named_modules())
    model = _llama(0)
    lorakit.load_adapter(model, adapter_dir)
    lorakit.merge_and_unload(model)
    merged = dict(model.named_modules())
    out = {"lorakit": {n: (merged[n].weight - base[n].weight).detach().double() for n in names}}
    peft_merged = dict(peft.PeftModel.from_pretrained(_llama(0), adapter_dir).merge_and_unload().named_modules())
    out["peft"] = {n: (peft_merged[n].weight - base[n].weight).detach().double() for n in names}
    return out


@pytest.mark.parametrize("case", ["energy", "rank-above-weight"])
def test_extract_scales_each_module_for_its_own_rank(tmp_path, base_dir, case):
    # A module written with rank k != --rank goes into rank_pattern, so loaders scale it by alpha / k:
    # its factors must be split for that scaling (they were split for alpha / --rank: ΔW 4x / 2x too large).
    base_model = _llama(0)
    if case == "energy":  # rank-2 updates; --energy gives those modules k = 2 < --rank 8
        ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2}
        tuned = _tuned_copy(base_model, ranks)
        kwargs = {"rank": 8, "alpha": 16.0, "energy": 0.999, "targets": ["q_proj"]}
        want_k = 2
    else:  # full-rank updates of the (16, 32) v_proj weights; --rank 32 is capped at k = 16
        import copy

        tuned = copy.deepcopy(base_model)
        g = torch.Generator().manual_seed(5)
        ranks = {f"model.layers.{i}.self_attn.v_proj": 16 for i in range(2)}
        with torch.no_grad():
            for name in ranks:
                w = tuned.get_submodule(name).weight
                w += 0.02 * torch.randn(w.shape, generator=g)
        kwargs = {"rank": 32, "targets": ["v_proj"]}
        want_k = 16
    tuned_dir = _save_model(tuned, tmp_path / "tuned")
    out = tmp_path / "ex"
    rep = at.extract_adapter(base_dir, tuned_dir, out=out, **kwargs)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {name: want_k for name in ranks}
    assert [r["r"] for r in rep["modules"]] == [want_k] * len(ranks)
    true = {n: (tuned.get_submodule(n).weight - base_model.get_submodule(n).weight).detach().double() for n in ranks}
    for loader, deltas in _loaded_deltas(out, list(ranks)).items():
        for name in ranks:
            assert torch.allclose(deltas[name], true[name], atol=1e-5), (loader, name)
    for row in rep["modules"]:
        assert row["rel_error"] < 1e-6


def test_resize_an_adapter_whose_rank_exceeds_a_weights_size(tmp_path):
    # v_proj is (16, 32): an r = 32 adapter's ΔW has rank <= 16; resizing to 24 gives those modules rank 16
    path, pm = _peft_adapter(tmp_path, r=32, lora_alpha=32, target_modules=["v_proj", "q_proj"])
    before = _peft_deltas(pm)
    out = tmp_path / "small"
    rep = at.resize_adapter(path, 24, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    v_names = [n for n in before if n.endswith("v_proj")]
    assert cfg["r"] == 24 and cfg["rank_pattern"] == {n: 16 for n in v_names}
    assert {r["module"]: r["r"] for r in rep["modules"]} == {n: 16 if n in v_names else 24 for n in before}
    from safetensors.torch import load_file

    for key, t in load_file(str(out / "adapter_model.safetensors")).items():
        if "v_proj.lora_A" in key:
            assert t.shape == (16, 32)
    for loader, deltas in _loaded_deltas(out, v_names).items():
        for name in v_names:  # rank 16 holds all of a (16, 32) ΔW
            assert torch.allclose(deltas[name], before[name], atol=1e-5), (loader, name)
    assert at.inspect_adapter(out)["warnings"] == []


def test_nan_in_model_weights_is_a_one_line_error(tmp_path, base_dir, capsys):
    bad_model = _llama(0)
    with torch.no_grad():
        bad_model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    bad = _save_model(bad_model, tmp_path / "nanmodel")
    key = "model.layers.0.self_attn.q_proj.weight"
    capsys.readouterr()  # save_pretrained's progress bar
    commands = [
        ["lowrank", "--no-plot", "--model", str(bad)],
        ["extract", "--base", str(base_dir), "--tuned", str(bad), "--rank", "2", "--out", str(tmp_path / "ex")],
        ["extract", "--base", str(bad), "--tuned", str(base_dir), "--rank", "2", "--out", str(tmp_path / "ex")],
        ["recommend", "--tuned", str(bad), "--base", str(base_dir)],
        ["recommend", "--tuned", str(base_dir), "--base", str(bad)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, (argv, err)
        assert str(bad) in err and key in err and "NaN or inf" in err, (argv, err)
    assert not (tmp_path / "ex").exists()


def test_untrained_adapter_has_no_update_to_recommend_from(tmp_path, capsys):
    fresh = tmp_path / "fresh"  # PEFT's default init: B = 0, so every ΔW is zero
    peft.get_peft_model(_llama(0), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(fresh)
    with pytest.raises(ValueError, match="no module has a non-zero weight update"):
        recommend.data_driven_ranks(adapter=fresh)
    assert main(["recommend", "--adapter", str(fresh)]) == 2
    assert "non-zero" in capsys.readouterr().err

    # a module with ΔW = 0 is skipped, the others are analysed
    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16)
    _zero_b(path, "layers.0.self_attn.q_proj")
    dd = recommend.data_driven_ranks(adapter=path)
    assert "model.layers.0.self_attn.q_proj" not in {r["module"] for r in dd["modules"]}
    assert len(dd["modules"]) == 3 and all(r["norm"] > 0 for r in dd["modules"])


def test_data_driven_suggestion_never_exceeds_the_adapters_rank(tmp_path):
    path, _ = _peft_adapter(tmp_path, r=6, lora_alpha=12)  # random factors: every ΔW has rank 6
    dd = recommend.data_driven_ranks(adapter=path)
    assert [r["suggested"] for r in dd["modules"]] == [6] * 4 and dd["r"] == 6
    at.resize_adapter(path, dd["r"], tmp_path / "out")  # the suggestion is usable as is


def test_extract_between_unrelated_models_says_they_share_no_weights(tmp_path, base_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97, n_positions=16)).save_pretrained(other)
    assert main(["extract", "--base", str(base_dir), "--tuned", str(other), "--rank", "2",
                 "--out", str(tmp_path / "ex")]) == 2
    err = capsys.readouterr().err
    assert "share no weights" in err and str(other) in err and str(base_dir) in err
    assert not (tmp_path / "ex").exists()


def test_every_base_flag_takes_no_value_for_the_embedded_model():
    """lab.md: `--model` (and `--base`) with no value means the embedded model; extract's --base
    needed a value."""
    from lorakit.cli import build_parser

    parser = build_parser()
    for argv in (["extract", "--base", "--tuned", "t", "--rank", "2", "--out", "o"],
                 ["inspect", "a", "--base"], ["recommend", "--base", "--tuned", "t"]):
        assert parser.parse_args(argv).base == "default", argv
    assert parser.parse_args(["extract", "--tuned", "t", "--rank", "2", "--out", "o"]).base == "default"


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, 3)
        self.c3 = torch.nn.Conv3d(2, 3, 2)

    def forward(self, x1, x3):
        return self.c1(x1), self.c3(x3)


def test_resize_keeps_conv1d_and_conv3d_factor_shapes(tmp_path):
    # a PEFT adapter on nn.Conv1d / nn.Conv3d: resize wrote 2-D factors (PEFT refused the file) and
    # inspect called the modules "linear"
    torch.manual_seed(0)
    model = peft.get_peft_model(_Convs(), peft.LoraConfig(r=4, target_modules=["c1", "c3"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "src")
    kinds = {m["module"]: m["kind"] for m in at.inspect_adapter(tmp_path / "src")["modules"]}
    assert kinds == {"c1": "conv1d", "c3": "conv3d"}
    at.resize_adapter(tmp_path / "src", 2, tmp_path / "out")
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "out" / "adapter_model.safetensors").items()}
    assert shapes == {"base_model.model.c1.lora_A.weight": (2, 4, 3), "base_model.model.c1.lora_B.weight": (6, 2, 1),
                      "base_model.model.c3.lora_A.weight": (2, 2, 2, 2, 2),
                      "base_model.model.c3.lora_B.weight": (3, 2, 1, 1, 1)}
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(_Convs(), tmp_path / "out")
    for name in ("c1", "c3"):
        old = model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        new = loaded.base_model.model.get_submodule(name).get_delta_weight("default").double()
        s = torch.linalg.svdvals(old.reshape(old.shape[0], -1))
        err = float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old))
        assert err == pytest.approx(float(torch.sqrt((s[2:] ** 2).sum() / (s ** 2).sum())), rel=1e-4)


class _Suffixes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.block = torch.nn.Module()
        self.block.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.block.fc(self.fc(x))


def test_resize_anchors_a_rank_pattern_key_that_ends_another_modules_path(tmp_path):
    # "fc" (r 2) and "block.fc" (r 8) resized to 4: the written {"fc": 2} also matched block.fc, and
    # neither PEFT nor lorakit could load the result
    import lorakit as lk

    torch.manual_seed(0)
    src = peft.get_peft_model(_Suffixes(), peft.LoraConfig(r=8, target_modules=["fc"], rank_pattern={"^fc": 2},
                                                           init_lora_weights=False))
    src.save_pretrained(tmp_path / "src")
    at.resize_adapter(tmp_path / "src", 4, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"^fc": 2}
    torch.manual_seed(0)
    ours = lk.load_adapter(_Suffixes(), tmp_path / "out")
    assert ours.fc.r["default"] == 2 and ours.block.fc.r["default"] == 4
    torch.manual_seed(0)
    peft.PeftModel.from_pretrained(_Suffixes(), tmp_path / "out")


def test_extract_of_an_embedding_writes_peft_embedding_factors(tmp_path, base_dir):
    # an explicitly targeted embed_tokens got Linear-style lora_A / lora_B: PEFT loaded it with
    # ΔW = 0 (silently), lorakit refused it
    import lorakit as lk

    base_model = _llama(0)
    tuned = _tuned_copy(base_model, {"model.embed_tokens": 2, "model.layers.0.self_attn.q_proj": 2})
    tuned_dir = _save_model(tuned, tmp_path / "tuned")
    rep = at.extract_adapter(base_dir, tuned_dir, rank=4, out=tmp_path / "out", targets=["embed_tokens", "q_proj"])
    assert all(r["rel_error"] < 1e-6 for r in rep["modules"])
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "out" / "adapter_model.safetensors").items()
              if "embed" in k}
    assert shapes == {"base_model.model.model.embed_tokens.lora_embedding_A": (4, 101),
                      "base_model.model.model.embed_tokens.lora_embedding_B": (32, 4)}
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        for loaded in (peft.PeftModel.from_pretrained(_llama(0), tmp_path / "out"),
                       lk.load_adapter(_llama(0), tmp_path / "out")):
            torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_model_cost_counts_a_tied_lm_head(tmp_path):
    # the tied head is not in the weights file: "--targets q_proj,lm_head" left its LoRA out and
    # "--targets lm_head" found no weight; PEFT and lorakit both adapt it
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    path = _save_model(LlamaForCausalLM(cfg), tmp_path / "tied")
    for targets in (("q_proj", "lm_head"), ("lm_head",)):
        pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(path), peft.LoraConfig(r=4, target_modules=list(targets)))
        want = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert recommend.model_cost(path, 4, targets, batch_size=1, seq_len=8)["trainable_params"] == want


def test_model_cost_understands_all_linear(tmp_path, base_dir):
    # "--targets all-linear" found "no 2-D weight"; estimate and train take it
    cost = recommend.model_cost(base_dir, 4, ("all-linear",), batch_size=1, seq_len=8)
    pm = peft.get_peft_model(_llama(0), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert cost["trainable_params"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert cost["modules"] == 14
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.q_proj": 2}), tmp_path / "tuned")
    default = at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "a")
    named = at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "b", targets=["all-linear"])
    assert [r["module"] for r in named["modules"]] == [r["module"] for r in default["modules"]] == [
        "model.layers.0.self_attn.q_proj"]


def test_all_linear_with_names_selects_the_same_modules_everywhere(tmp_path, base_dir):
    # "all-linear,embed_tokens": recommend --model read it as every linear plus the embedding, while
    # extract and the --tuned spectra took "all-linear" there for a module name and kept only embed_tokens
    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.q_proj": 2,
                                                    "model.layers.1.mlp.down_proj": 1,
                                                    "model.embed_tokens": 2}), tmp_path / "tuned")
    targets = ["all-linear", "embed_tokens"]
    got = at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "a", targets=targets)
    assert sorted(r["module"] for r in got["modules"]) == [
        "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(at.delta_spectra(base=base_dir, tuned=tuned_dir, targets=targets)) == sorted(
        r["module"] for r in got["modules"])
    assert sorted(at.delta_spectra(base=base_dir, tuned=tuned_dir, targets=["all-linear"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    cost = recommend.model_cost(base_dir, 4, tuple(targets), batch_size=1, seq_len=8)
    pm = peft.get_peft_model(_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj",
                                                                            "embed_tokens"]))
    assert cost["trainable_params"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    # the extracted file loads in PEFT and reproduces the tuned model (rank 2 holds every update)
    from transformers import LlamaForCausalLM

    loaded = peft.PeftModel.from_pretrained(_llama(0), tmp_path / "a").eval()
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, LlamaForCausalLM.from_pretrained(tuned_dir)(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)


def test_resize_of_a_bf16_adapter_reports_the_error_of_the_factors_it_wrote(tmp_path):
    # the bf16 factors are rounded when written: the report said 0.0 at the same rank (true: ~2e-3)
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16)).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False),
                                autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path / "a")
    for k in (4, 2):
        rep = at.resize_adapter(tmp_path / "a", k, tmp_path / f"r{k}")
        old, new = at.read_adapter(tmp_path / "a"), at.read_adapter(tmp_path / f"r{k}")
        for row in rep["modules"]:
            a, b = old.modules[row["module"]].delta_matrix(), new.modules[row["module"]].delta_matrix()
            true = float((a - b).norm() / a.norm())
            assert row["rel_error"] == pytest.approx(true, rel=1e-6, abs=1e-9)
            assert k == 2 or true > 1e-4  # (the rounding the report must count)


def test_extract_reads_an_untied_head_against_a_tied_base(tmp_path):
    """A tied base saves its shared weight once (no lm_head.weight); a merge that changed the head
    untied it: extract skipped the head as 'not in base' (and said no targeted weight differed)."""
    import lorakit as lk
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    base_dir = _save_model(base, tmp_path / "base")
    from safetensors.torch import load_file
    assert not any(k.endswith("lm_head.weight") for k in load_file(str(base_dir / "model.safetensors")))
    tuned = lk.get_lora_model(LlamaForCausalLM.from_pretrained(base_dir).eval(),
                              lk.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="tied"):
        tuned = lk.merge_and_unload(tuned)
    tuned_dir = _save_model(tuned, tmp_path / "tuned")
    rep = at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "ex", targets=["lm_head"])
    assert [r["module"] for r in rep["modules"]] == ["lm_head"] and rep["modules"][0]["rel_error"] < 1e-6
    ids = torch.randint(0, 101, (2, 7))
    loaded = lk.load_adapter(LlamaForCausalLM.from_pretrained(base_dir).eval(), tmp_path / "ex")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_extract_of_gpt2s_untied_head_is_written_as_a_linear(tmp_path):
    """GPT-2's base stores no lm_head (tied to wte); its head is an nn.Linear, not a Conv1D: the
    delta was transposed as the Conv1D layers' are, and PEFT refused the factors' shapes."""
    import lorakit as lk
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    base_dir = _save_model(base, tmp_path / "base")
    tuned = lk.get_lora_model(GPT2LMHeadModel.from_pretrained(base_dir).eval(),
                              lk.LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="tied"):
        tuned = lk.merge_and_unload(tuned)
    tuned_dir = _save_model(tuned, tmp_path / "tuned")
    at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "ex", targets=["lm_head"])
    loaded = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir).eval(), tmp_path / "ex")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_extract_compares_a_head_with_the_embedding_only_for_a_tied_base(tmp_path):
    """An untied base whose file lacks the head (or a new head of the vocabulary's shape) is not a tied
    one: comparing with the embedding wrote a made-up adapter (delta norm 1.29 for an unchanged head)."""
    from safetensors.torch import load_file, save_file

    base = _llama(0)
    assert not base.config.tie_word_embeddings
    base_dir = _save_model(base, tmp_path / "base")
    tuned_dir = _save_model(_llama(0), tmp_path / "tuned")
    weights = base_dir / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if k != "lm_head.weight"}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no targeted weight differs"):
        at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "ex", targets=["lm_head"])


def _save_weights(path, tensors):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_rounding_floor_bounds_the_rounding_and_is_not_loose():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for shape in ((16, 32), (96, 64), (384, 256)):
            for outliers in (False, True):
                ratios = []
                for _ in range(12):
                    w = torch.randn(*shape, dtype=torch.float64, generator=g) * 0.02
                    if outliers:
                        w[:, :2] *= 50  # a few large columns: larger ulps there
                    largest = float(torch.linalg.svdvals(w.to(dtype).double() - w)[0])
                    ratios.append(largest / at.rounding_floor(w.to(dtype)))
                assert max(ratios) < 1, (dtype, shape, outliers, max(ratios))
                if min(shape) >= 256:  # not loose at a layer's size: measured 0.65-0.70 (0.79 at 576 x 1536)
                    assert sum(ratios) / len(ratios) > 0.6, (dtype, shape, outliers, ratios)
    w = torch.randn(64, 64, dtype=torch.float64, generator=g)
    both = at.rounding_floor(w.to(torch.bfloat16), w.to(torch.bfloat16))  # two roundings: variances add
    assert at.rounding_floor(w.to(torch.bfloat16)) < both < 1.42 * at.rounding_floor(w.to(torch.bfloat16))
    assert at.rounding_floor(torch.zeros(4, 4, dtype=torch.bfloat16)) == 0.0


def test_modules_changed_only_by_rounding_do_not_set_the_suggestion(tmp_path, base_dir):
    """An fp32 base, its fine-tune saved in bf16 with a real rank-2 change in one module: every other
    module differs by the rounding alone, which read as rank-1 updates that set r = 1."""
    tuned = _tuned_copy(_llama(0), {"model.layers.0.self_attn.q_proj": 2}).to(torch.bfloat16)
    dd = recommend.data_driven_ranks(base=base_dir, tuned=_save_model(tuned, tmp_path / "tuned"))
    assert [r["module"] for r in dd["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert dd["r"] == 2 and dd["rank_pattern"] == {}
    assert len(dd["noise_only"]) == 13  # the other 2 x 7 projections less this one


def test_bf16_rounding_noise_does_not_inflate_the_suggested_rank(tmp_path):
    """A rank-4 update of 1% of ‖W‖ read from bf16 weights: the rounding adds ~5% of ‖ΔW‖² spread over
    every direction, which made r99 ~ 230 and the suggestion the cap (64); it is the update's 4 now."""
    torch.manual_seed(0)
    w0 = torch.randn(256, 256) * 0.02
    d = torch.randn(256, 4) @ torch.randn(4, 256)
    d = d / d.norm() * w0.norm() * 0.01
    key = "model.layers.0.self_attn.q_proj.weight"
    base = _save_weights(tmp_path / "base", {key: w0.bfloat16()})
    tuned = _save_weights(tmp_path / "tuned", {key: (w0 + d).bfloat16()})
    details = at.delta_spectra_details(base=base, tuned=tuned)
    s = details.spectra[key[:-len(".weight")]]
    assert at.energy_rank(s, 0.99) > 16  # the noise is there
    row = recommend.data_driven_ranks(base=base, tuned=tuned)["modules"][0]
    assert (row["rank90"], row["rank99"], row["suggested"]) == (4, 4, 4)
    assert row["kept"] == 1.0 and not row["capped"]
    # an update smaller than the rounding: nothing to tell from noise, said so
    tiny = _save_weights(tmp_path / "tiny", {key: (w0 + d * 1e-3).bfloat16()})
    with pytest.raises(ValueError, match="rounding noise"):
        recommend.data_driven_ranks(base=base, tuned=tiny)


def test_a_capped_rank_reports_the_energy_it_keeps_and_alphas_keep_the_scaling(tmp_path):
    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16)  # random factors: each ΔW has rank 8
    dd = recommend.data_driven_ranks(adapter=path, cap=2)
    spectra = at.delta_spectra(adapter=path)
    for row in dd["modules"]:
        s = spectra[row["module"]]
        assert row["suggested"] == 2 and row["capped"]
        assert row["kept"] == pytest.approx(float(s[:2].square().sum() / s.square().sum()))
        assert row["kept"] < 0.99
    assert dd["r"] == 2 and dd["alpha"] == 4 and dd["alpha_pattern"] == {}
    mixed = recommend.data_driven_ranks(adapter=path, energy=1.0, cap=4)
    assert mixed["alpha"] == 2 * mixed["r"]
    assert mixed["alpha_pattern"] == {m: 2 * k for m, k in mixed["rank_pattern"].items()}
    for cap in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cap must be a positive integer"):
            recommend.data_driven_ranks(adapter=path, cap=cap)


def test_nothing_to_analyse_says_why(tmp_path, base_dir):
    with pytest.raises(ValueError, match=r"targets \['qproj'\] match no 2-D weight"):
        recommend.data_driven_ranks(base=base_dir, tuned=base_dir, targets=["qproj"])
    changed = _llama(0)
    with torch.no_grad():
        changed.model.norm.weight.add_(0.5)  # a 1-D tensor: not analysed
    tuned = _save_model(changed, tmp_path / "norm_only")
    with pytest.raises(ValueError, match=r"are equal in both models; changed tensors that are not 2-D.*model\.norm\.weight"):
        recommend.data_driven_ranks(base=base_dir, tuned=tuned)


def test_recommend_cli_data_driven_output(tmp_path, capsys):
    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16)
    assert main(["recommend", "--adapter", str(path), "--energy", "1.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Effective rank of each ΔW")  # (a blank first line before)
    assert "kept" in out and "lora_alpha = 16" in out and "alpha_pattern" in out
    assert main(["recommend", "--adapter", str(path), "--energy", "0.99", "--json"]) == 0
    assert "capped" in json.loads(capsys.readouterr().out)["data_driven"]["modules"][0]


def test_rule_table_on_a_model_warns_of_modules_narrower_than_the_rank(base_dir, capsys):
    # tiny Llama: q_proj 32 x 32, v_proj 16 x 32: rank 32 (complex, > 10,000 examples) is above v_proj's 16
    assert main(["recommend", "--task", "complex", "--data-size", "50000", "--model", str(base_dir)]) == 0
    out = capsys.readouterr().out
    assert "rank 32" in out and "warning: rank 32 is above min(in, out) of 2 targeted module(s)" in out
    assert "v_proj (min 16)" in out and "q_proj (min" not in out
    assert main(["recommend", "--task", "medium", "--data-size", "5000", "--model", str(base_dir)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_dotted_targets_cost_and_memory_count_the_same_modules(base_dir):
    cost = recommend.model_cost(base_dir, 8, ("self_attn.q_proj", "v_proj"), batch_size=1, seq_len=8)
    assert cost["modules"] == 4
    assert cost["memory"]["trainable_params"] == cost["trainable_params"]


def test_a_layer_specific_target_notes_that_the_memory_estimate_counts_every_layer(base_dir):
    cost = recommend.model_cost(base_dir, 8, ("layers.0.self_attn.q_proj",), batch_size=1, seq_len=8)
    assert cost["modules"] == 1 and cost["trainable_params"] == 8 * (32 + 32)
    assert cost["memory"]["trainable_params"] == 2 * cost["trainable_params"]
    assert "counts each targeted projection on every layer" in cost["memory_note"]
    assert "memory_note" not in recommend.model_cost(base_dir, 8, ("self_attn.q_proj",), batch_size=1, seq_len=8)


def test_svds_on_the_tall_orientation_and_of_a_product_give_the_same_values():
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 30), (30, 7), (12, 12)):
        m = torch.randn(*shape, dtype=torch.float64, generator=g)
        torch.testing.assert_close(at.svdvals_tall(m), torch.linalg.svdvals(m), rtol=1e-12, atol=0)
        u, s, vh = at.svd_tall(m)
        k = min(shape)
        assert u.shape == (shape[0], k) and vh.shape == (k, shape[1])
        torch.testing.assert_close(u @ torch.diag(s) @ vh, m, rtol=0, atol=1e-12)
    for m_, r, n in ((40, 6, 25), (5, 6, 30)):  # (also fewer rows than the rank)
        left = torch.randn(m_, r, dtype=torch.float64, generator=g)
        right = torch.randn(r, n, dtype=torch.float64, generator=g)
        want = torch.linalg.svdvals(left @ right)[: min(m_, r, n)]
        torch.testing.assert_close(at.singular_values_of_product(left, right), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(at.spectrum_of_product(left, right)[1], want, rtol=1e-10, atol=1e-12)


def test_an_interrupted_plot_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lorakit.analysis import plots

    def broken(self, target, *args, **kwargs):
        (target.write if hasattr(target, "write") else open(target, "wb").write)(b"\x89PNG\r\n\x1a\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_module_bars(["a", "b"], {"r": [1, 2]}, tmp_path / "bars.png", "rank", "title")
    assert list(tmp_path.iterdir()) == []  # (a truncated bars.png before)
    monkeypatch.undo()
    assert plots.plot_module_bars(["a", "b"], {"r": [1, 2]}, tmp_path / "bars.png", "rank", "t").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]


def test_extract_and_spectra_read_the_models_one_tensor_at_a_time(tmp_path, base_dir, monkeypatch):
    import weakref

    from lorakit.analysis import weights

    tuned_dir = _save_model(_tuned_copy(_llama(0), {"model.layers.0.self_attn.q_proj": 2,
                                                    "model.layers.1.mlp.down_proj": 3}), tmp_path / "tuned")
    lazy = weights.LazyWeights(tuned_dir)
    full = weights.load_state_dict(tuned_dir)
    assert sorted(lazy) == sorted(full) and len(lazy) == len(full)
    assert all(torch.equal(lazy[k], v) for k, v in full.items())

    alive, most = [0], [0]
    real = weights.LazyWeights.__getitem__

    def counted(self, key):
        tensor = real(self, key)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(weights.LazyWeights, "__getitem__", counted)
    at.extract_adapter(base_dir, tuned_dir, rank=2, out=tmp_path / "ex")
    # a base and a tuned tensor at a time, and the last pair until the next is read (the whole model,
    # 2 x 21 tensors, before)
    assert 2 <= most[0] <= 4
    most[0] = 0
    assert len(at.delta_spectra(base=base_dir, tuned=tuned_dir)) == 2
    assert 2 <= most[0] <= 4


# A5: an adapter module whose ΔW is exactly zero is left out of the spectra (not counted as noise)
def test_a_zero_adapter_module_is_left_out_not_called_rounding_noise(tmp_path):
    fresh = tmp_path / "fresh"  # PEFT's default init: B = 0
    peft.get_peft_model(_llama(0), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(fresh)
    assert at.delta_spectra(adapter=fresh) == {}
    with pytest.raises(ValueError, match="untrained adapter") as info:
        recommend.data_driven_ranks(adapter=fresh)
    assert "rounding" not in str(info.value)

    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16)
    _zero_b(path, "layers.0.self_attn.q_proj")
    assert "model.layers.0.self_attn.q_proj" not in at.delta_spectra(adapter=path)
    assert recommend.data_driven_ranks(adapter=path)["noise_only"] == []


# A7: the floor of a tuned-vs-base comparison counts the rounding of both weights
def test_the_floor_counts_the_rounding_of_the_base_too(tmp_path):
    torch.manual_seed(0)
    w0 = torch.randn(64, 32) * 0.02
    key = "model.layers.0.self_attn.q_proj.weight"
    base = _save_weights(tmp_path / "base", {key: w0.bfloat16()})  # a bf16 base, a fp32 fine-tune of it
    tuned_w = w0.bfloat16().float() + torch.randn(64, 32) * 1e-3
    tuned = _save_weights(tmp_path / "tuned", {key: tuned_w})
    floor = at.delta_spectra_details(base=base, tuned=tuned).floors[key[:-len(".weight")]]
    assert floor == pytest.approx(at.rounding_floor(tuned_w, w0.bfloat16()))
    assert floor > 100 * at.rounding_floor(tuned_w)  # bf16's rounding dominates fp32's


# A8: the spread term of the floor grows with log min(m, n), as its docstring says
def test_rounding_floor_follows_its_documented_formula():
    w = torch.ones(2, 64)  # fp32: every element's ulp is eps, variance eps²/12
    v = torch.finfo(torch.float32).eps ** 2 / 12
    expected = math.sqrt(64 * v) + math.sqrt(2 * v) + math.sqrt(v * (math.log(2) + 1))
    assert at.rounding_floor(w) == pytest.approx(expected, rel=1e-9)
    assert at.rounding_floor(w.T) == pytest.approx(expected, rel=1e-9)


# R4: each rank_pattern entry gets alpha = 2 x its own rank (scaling 2 everywhere), not 2 x the global r
def test_alpha_pattern_follows_each_pattern_rank(tmp_path):
    # random factors: ΔW of rank 8 everywhere, rank 2 on layers.0 q_proj -> r = 8, that module at 2
    path, _ = _peft_adapter(tmp_path, r=8, lora_alpha=16, rank_pattern={"layers.0.self_attn.q_proj": 2})
    dd = recommend.data_driven_ranks(adapter=path, energy=1.0)
    assert dd["r"] == 8 and dd["alpha"] == 16
    assert dd["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2}
    assert dd["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 4}


# R6: when two ranks are equally common, the global r is the smaller one (whatever the module order)
def test_a_tie_between_ranks_picks_the_smaller_as_the_global_r(tmp_path):
    path, _ = _peft_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"],
                            rank_pattern={"layers.0.self_attn.q_proj": 4})  # the first module has the larger
    dd = recommend.data_driven_ranks(adapter=path, energy=1.0)
    assert [r["module"] for r in dd["modules"]][0] == "model.layers.0.self_attn.q_proj"
    assert dd["r"] == 2 and dd["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 4}


# W1: an adapter file saved beside a model's weights is not read as part of the model
def test_an_adapter_file_in_a_model_directory_is_not_a_weight_file(tmp_path):
    from safetensors.torch import save_file

    from lorakit.analysis import weights
    from test_analysis_adapter import _save_model

    d = _save_model(_llama(0), tmp_path / "model")
    before = set(weights.weight_shapes(d))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
              str(d / "adapter_model.safetensors"))
    assert set(weights.weight_shapes(d)) == before
    assert set(weights.open_weights(d)) == before
    assert set(weights.load_state_dict(d)) == before


# W2: open_weights reads a .gguf file through the GGUF loader (not as safetensors)
def test_open_weights_of_a_gguf_file_converts_it(tmp_path, monkeypatch):
    from lorakit.analysis import weights

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}
    monkeypatch.setattr(weights, "_gguf_state_dict", lambda path: sd if path == gguf else None)
    got = weights.open_weights(gguf)
    assert set(got) == set(sd) and torch.equal(got["model.layers.0.self_attn.q_proj.weight"], torch.ones(2, 2))


def test_extract_energy_never_goes_above_the_rank(tmp_path, base_dir):
    """--energy picks the smallest rank holding that energy, capped at --rank: rank-2 updates extracted at
    --rank 1 with --energy 0.999 are rank 1, not 2."""
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 2}
    tuned_dir = _save_model(_tuned_copy(_llama(0), ranks), tmp_path / "tuned")
    rep = at.extract_adapter(base_dir, tuned_dir, out=tmp_path / "ex", rank=1, alpha=2.0, energy=0.999,
                             targets=["q_proj"])
    assert [row["r"] for row in rep["modules"]] == [1, 1]
    assert json.loads((tmp_path / "ex" / "adapter_config.json").read_text())["rank_pattern"] == {}
