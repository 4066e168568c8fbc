"""The lesson's rank / alpha guide, exactly, and the `lorakit recommend` command."""
from __future__ import annotations

import json

import pytest

from lorakit.analysis import recommend_rank
from lorakit.cli import main

# The lesson's table, restated here independently of the implementation.
LESSON = {
    "simple": {"7B": (4, 8), "13B": (4, 8), "70B": (8, 16)},
    "medium": {"7B": (8, 16), "13B": (8, 16), "70B": (16, 32)},
    "complex": {"7B": (16, 32), "13B": (16, 32), "70B": (32, 64)},
}


@pytest.mark.parametrize("task", LESSON)
@pytest.mark.parametrize("size", ["7B", "13B", "70B"])
def test_table_and_data_size_rules(task, size):
    rank, alpha = LESSON[task][size]
    for data, expect in ((5_000, rank), (1_000, rank), (10_000, rank), (999, max(4, rank // 2)),
                         (10_001, min(64, rank * 2)), (0, max(4, rank // 2)), (10**7, min(64, rank * 2))):
        rec = recommend_rank(task, data, size)
        assert set(rec) == {"rank", "alpha", "reasoning"}
        assert (rec["rank"], rec["alpha"]) == (expect, alpha), (task, size, data)
        assert str(rec["rank"]) in rec["reasoning"] and len(rec["reasoning"]) > 40


def test_other_sizes_and_bad_input():
    assert recommend_rank("medium", 5000, "135M")["rank"] == 8
    assert "7B column" in recommend_rank("medium", 5000, "135M")["reasoning"]
    assert recommend_rank("medium", 5000, "34B")["rank"] == 8
    assert recommend_rank("medium", 5000, 65e9)["rank"] == 16
    with pytest.raises(ValueError, match="'hard'"):
        recommend_rank("hard", 10, "7B")
    with pytest.raises(ValueError, match="-5"):
        recommend_rank("simple", -5, "7B")
    with pytest.raises(ValueError, match="'huge'"):
        recommend_rank("simple", 10, "huge")


def test_cli(capsys):
    assert main(["recommend", "--task", "complex", "--model-size", "70B", "--data-size", "50000", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert (rec["rank"], rec["alpha"]) == (64, 64)
    assert main(["recommend", "--task", "simple", "--model-size", "7B", "--data-size", "500"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rank 4, alpha 8") and "1,000" in out
    assert main(["recommend", "--task", "simple", "--data-size", "500"]) == 2
    assert "--model-size" in capsys.readouterr().err


def test_data_driven_flags_that_do_not_go_together(tmp_path, capsys):
    assert main(["recommend", "--adapter", str(tmp_path), "--base", str(tmp_path)]) == 2
    assert "--base needs --tuned" in capsys.readouterr().err
    assert main(["recommend", "--adapter", str(tmp_path), "--tuned", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_base_alone_asks_for_tuned(tmp_path, capsys):
    assert main(["recommend", "--base", str(tmp_path)]) == 2
    assert "--base needs --tuned" in capsys.readouterr().err


@pytest.mark.parametrize("size", [float("nan"), float("inf"), "nan", "inf"])
def test_model_size_must_be_finite(size):
    with pytest.raises(ValueError, match="model_size"):
        recommend_rank("simple", 10, size)


def test_tuned_model_of_another_shape_is_a_clear_error(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_lm import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    wide = LlamaForCausalLM(LlamaConfig(**{**LlamaConfig.from_pretrained(base).to_dict(), "hidden_size": 48}))
    wide.save_pretrained(tmp_path / "wide")
    assert main(["recommend", "--tuned", str(tmp_path / "wide"), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert "base shape" in err and "!= tuned shape" in err and "is not a fine-tune of" in err and "Traceback" not in err


def test_tuned_mode_analyses_every_changed_linear_unless_targets_are_given(tmp_path, capsys):
    """recommend --tuned took the cost report's q_proj,v_proj default and left out 10 of 14 changed
    linears (extract, on the same pair, takes them all)."""
    import sys
    from pathlib import Path

    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_lm import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    tuned = LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn_like(p) * 0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    linears = sum(1 for n, _ in tuned.named_parameters() if n.endswith("proj.weight"))
    capsys.readouterr()
    assert main(["recommend", "--tuned", str(tmp_path / "tuned"), "--base", str(base), "--json", "--no-plot"]) == 0
    assert len(json.loads(capsys.readouterr().out)["data_driven"]["modules"]) == linears == 14
    assert main(["recommend", "--tuned", str(tmp_path / "tuned"), "--base", str(base), "--targets", "q_proj",
                 "--json", "--no-plot"]) == 0
    assert len(json.loads(capsys.readouterr().out)["data_driven"]["modules"]) == 2


def test_a_bare_number_without_a_unit_is_refused_not_read_as_parameters():
    with pytest.raises(ValueError, match="'70' has no unit"):
        recommend_rank("simple", 5000, "70")
    assert recommend_rank("simple", 5000, "70B")["rank"] == 8  # the column a user typing 70 meant
    assert recommend_rank("simple", 5000, 134_515_008)["rank"] == 4  # a counted model: a number is fine
    assert "134,515,008 parameters" in recommend_rank("simple", 5000, 134_515_008)["reasoning"]


def test_the_reasoning_gives_the_scaling_standard_and_rslora():
    why = recommend_rank("complex", 50_000, "70B")["reasoning"]
    assert "alpha/r = 1 " in why and "alpha/sqrt(r) = 8" in why  # alpha 64, r 64


def test_flags_that_apply_to_another_mode_are_refused(tmp_path, capsys):
    table = ["recommend", "--task", "simple", "--model-size", "7B", "--data-size", "500"]
    assert main([*table, "--energy", "0.9"]) == 2
    assert "--energy applies to the data-driven mode" in capsys.readouterr().err
    assert main(["recommend", "--adapter", str(tmp_path), "--targets", "q_proj"]) == 2
    assert "an adapter's own modules are all analysed" in capsys.readouterr().err
    assert main([*table, "--targets", " , "]) == 2
    assert "--targets is empty" in capsys.readouterr().err


def test_analysis_commands_take_one_thread_per_free_core_and_give_them_back(monkeypatch, capsys):
    import torch

    import lorakit.analysis.recommend as rec_module
    import lorakit.train.generate as gen

    seen = []
    real = rec_module.recommend_rank

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(gen, "busy_cores", lambda *a, **k: 1.0)  # another process keeps a core busy
        monkeypatch.setattr(rec_module, "recommend_rank", spy)
        assert main(["recommend", "--task", "simple", "--model-size", "7B", "--data-size", "500"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# X2: --batch-size / --seq-len 0 are refused
@pytest.mark.parametrize("flag", ["--batch-size", "--seq-len"])
def test_recommend_refuses_a_zero_batch_size_or_sequence_length(flag, capsys):
    assert main(["recommend", "--task", "simple", "--model-size", "7B", "--data-size", "500", flag, "0"]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


# ---- mutation round 6 (/tmp/mutants6)
def test_recommend_from_an_adapter_defaults_to_99_percent_energy(tmp_path, capsys):
    import lorakit as lk
    from conftest import tiny_llama

    m = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path / "a")
    assert main(["recommend", "--adapter", str(tmp_path / "a"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_driven"]["energy"] == 0.99


def test_model_size_columns_include_their_upper_bound():
    from lorakit.analysis import recommend

    assert recommend.parse_model_size(10_000_000_000)[0] == "7B"
    assert recommend.parse_model_size(40_000_000_000)[0] == "13B"
    assert recommend.parse_model_size(40_000_000_001)[0] == "70B"


def test_a_grouped_convs_rounded_up_rank_respects_the_cap(tmp_path):
    import lorakit as lk
    from lorakit.analysis import recommend
    from test_grouped_conv import GROUPS, net

    m = lk.get_lora_model(net(), lk.LoraConfig(r=8, target_modules=["conv"], init_lora_weights=False))
    lk.save_adapter(m, tmp_path / "adapter")
    uncapped = recommend.data_driven_ranks(adapter=tmp_path / "adapter", energy=1.0)["modules"][0]
    assert uncapped["suggested"] == 2 * GROUPS  # full rank 8: two channels per group
    row = recommend.data_driven_ranks(adapter=tmp_path / "adapter", energy=1.0, cap=GROUPS + 1)["modules"][0]
    assert row["suggested"] == GROUPS and row["capped"]  # rounded down to a multiple under the cap


def test_a_fractional_data_size_is_refused():
    from lorakit.analysis import recommend

    with pytest.raises(ValueError, match="data_size"):
        recommend.recommend_rank("simple", 2500.5, "7B")
    assert recommend.recommend_rank("simple", 2500.0, "7B")["rank"] == 4
