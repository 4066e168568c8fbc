"""Tests from mutation round 15 (/tmp/mutants15: mutants over modules no earlier round had touched
or barely: layers/linear.py's lean and batched paths, adapters.py, train/config.py,
analysis/weights.py, sweep.py, measure.py, analysis/cli.py, variants/__init__.py, LoraConfig and
the top-level CLI; 95 mutants: 75 caught, 3 equivalent, 17 gaps): one test per gap, each checked
to fail on its mutant; no bug found."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk


def _fc_with(specs: dict[str, dict]) -> nn.Module:
    from test_mutation_round14 import _fc_with as fc_with

    return fc_with(specs, head=True)


# ---- adapters.py ---------------------------------------------------------------------------------

def test_activating_a_plain_adapter_before_a_merged_dora_one_computes_them_unmerged():  # a3
    """DoRA merged alone, then set_adapter([plain, dora]): DoRA now comes after the plain update (it
    rescales it), which the merged weight cannot express; the output is that of the unmerged pair."""
    m = _fc_with({"d": {"use_dora": True}, "p": {}})
    ref = copy.deepcopy(m)
    lk.set_adapter(m, "d")
    lk.merge(m)
    lk.set_adapter(m, ["p", "d"])
    lk.set_adapter(ref, ["p", "d"])
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-10)


def test_set_adapter_runs_the_saved_module_copy_of_whichever_active_adapter_has_one():  # a4
    """Two adapters active, only the second with a modules_to_save copy of the head: the head runs
    that copy (not the original because the first name has none)."""
    m = _fc_with({"a": {}, "b": {"modules_to_save": ["head"]}})
    with torch.no_grad():
        m.head.modules_to_save["b"].weight.add_(1.0)
    lk.set_adapter(m, ["a", "b"])
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m.head(x), m.head.modules_to_save["b"](x))


def test_unload_puts_back_the_original_of_a_saved_module_not_the_trained_copy():  # a13
    m = _fc_with({"a": {"modules_to_save": ["head"]}})
    original = copy.deepcopy(m.head.original_module)
    with torch.no_grad():
        m.head.modules_to_save["a"].weight.add_(1.0)
    lk.unload(m)
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(m.head(x), original(x))


def test_set_trainable_refuses_an_unknown_adapter_name():  # a14
    m = _fc_with({"a": {}, "b": {}})
    with pytest.raises(ValueError, match="unknown adapter"):
        lk.set_trainable(m, ["a", "typo"])


# ---- train/config.py -----------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_train_config_refuses_an_adapter_init_with_method_full(init):  # t3
    from lorakit.train.config import TrainConfig

    with pytest.raises(ValueError, match="not full"):
        TrainConfig(method="full", init=init)


def test_a_config_file_of_only_comments_gives_the_defaults(tmp_path):  # t15
    from lorakit.train.config import TrainConfig

    y = tmp_path / "c.yaml"
    y.write_text("# nothing set yet\n")
    assert TrainConfig.from_yaml(y) == TrainConfig()


# ---- analysis/weights.py -------------------------------------------------------------------------

def test_an_adapter_file_beside_a_models_one_weights_file_is_not_read_as_the_model(tmp_path):  # w2
    from safetensors.torch import save_file

    from lorakit.analysis.weights import load_state_dict

    save_file({"layer.weight": torch.ones(2, 3)}, str(tmp_path / "consolidated.safetensors"))
    save_file({"base_model.model.layer.lora_A.weight": torch.zeros(1, 3)}, str(tmp_path / "adapter_model.safetensors"))
    assert list(load_state_dict(tmp_path)) == ["layer.weight"]


def test_shards_of_two_saves_without_an_index_are_refused_not_read_over_each_other(tmp_path):  # w4
    from safetensors.torch import save_file

    from lorakit.analysis.weights import load_state_dict

    for name in ("model-00001-of-00002", "model-00002-of-00002", "model_ema-00001-of-00001"):
        save_file({f"{name}.weight": torch.ones(2)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ValueError, match="several safetensors files"):
        load_state_dict(tmp_path)


def test_target_names_match_a_module_name_only_at_a_dot_boundary():  # w8
    """PEFT's suffix rule: "proj" names a module called proj, not every q_proj / up_proj."""
    from lorakit.analysis.adapter_tools import target_filter
    from lorakit.analysis.weights import module_matches

    assert module_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not module_matches("model.layers.0.self_attn.q_proj", ["proj"])
    assert not target_filter(["proj"])("model.layers.0.mlp.up_proj")


def test_the_config_of_a_single_weights_file_is_the_one_beside_it(tmp_path):  # w9
    import json

    from safetensors.torch import save_file

    from lorakit.analysis.weights import load_config

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert load_config(tmp_path / "model.safetensors")["hidden_size"] == 8


# ---- analysis/sweep.py ---------------------------------------------------------------------------

def _one_step_sweep(tmp_path, ranks, out):
    from lorakit.analysis.sweep import run_sweep
    from lorakit.train.config import TrainConfig
    from tiny_lm import tiny_llama_lm, tiny_tokenizer, toy_records, write_jsonl

    tok = tiny_tokenizer()
    train_file = write_jsonl(toy_records(16), tmp_path / "train.jsonl")
    base = TrainConfig(data=str(train_file), max_steps=1, batch_size=8, precision="fp32", save_steps=0)
    return run_sweep(base, ranks, out, load=lambda: (tiny_llama_lm(tok), tok), progress=False, log=lambda s: None)


def test_a_sweep_trains_each_rank_at_the_alpha_it_reports(tmp_path):  # s9
    import json

    rows = _one_step_sweep(tmp_path, [2], tmp_path / "sweep")
    saved = json.loads((tmp_path / "sweep" / "r2" / "adapter_config.json").read_text())
    assert rows[0]["alpha"] == saved["lora_alpha"] == 4.0


def test_a_sweep_trains_into_an_empty_run_directory_made_beforehand(tmp_path):  # s4
    (tmp_path / "sweep" / "r1").mkdir(parents=True)
    rows = _one_step_sweep(tmp_path, [1], tmp_path / "sweep")
    assert rows[0]["rank"] == 1 and (tmp_path / "sweep" / "r1" / "adapter_config.json").is_file()


# ---- config.py: LoraConfig -----------------------------------------------------------------------

def test_a_config_keeps_its_own_copy_of_the_lists_it_was_given():  # c3
    targets, saved = ["fc"], ["head"]
    cfg = lk.LoraConfig(target_modules=targets, modules_to_save=saved)
    targets.append("head")  # (the caller reuses its lists for the next config)
    saved.clear()
    assert cfg.target_modules == ["fc"] and cfg.modules_to_save == ["head"]


# ---- analysis/cli.py -----------------------------------------------------------------------------

def test_a_rank_list_of_only_commas_is_a_usage_error(capsys):  # ac1
    from lorakit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["lowrank", "--ranks", ",", "--no-plot"])
    assert info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_no_plot_writes_no_report_file_either(tmp_path, capsys):  # ac10
    from lorakit.cli import main

    out = tmp_path / "lab"
    assert main(["estimate", "--model", "7B", "--out", str(out), "--no-plot"]) == 0
    assert "peak" in capsys.readouterr().out
    assert not out.exists()  # "--no-plot: write no report or plot files"



# ---- cli.py --------------------------------------------------------------------------------------

def test_a_key_error_is_reported_by_its_message_not_its_repr(capsys, monkeypatch):  # cl1
    from lorakit.analysis import estimate
    from lorakit.cli import main

    def missing(model):
        raise KeyError("config.json of 'x' has no hidden_size")

    monkeypatch.setattr(estimate, "load_shape", missing)
    assert main(["estimate", "--model", "x", "--no-plot"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("error: config.json of 'x' has no hidden_size")


def test_a_command_run_in_process_gives_the_callers_thread_count_back(monkeypatch):  # cl3
    import lorakit.train.generate as generate
    from lorakit.cli import main

    monkeypatch.setattr(generate, "auto_threads", lambda *a, **k: torch.set_num_threads(1))  # (a command's own pick)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["estimate", "--model", "7B", "--no-plot"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
