"""The low-rank demo: the lesson's parameter table and truncated-SVD reconstruction."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.analysis import lowrank
from lorakit.analysis.lowrank import parameter_table, spectrum_report
from lorakit.cli import main


def test_parameter_table_matches_the_lesson():
    rows = {r["rank"]: r for r in lowrank.parameter_table()}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64]
    r8 = rows[8]
    assert (r8["params_A"], r8["params_B"], r8["lora_params"]) == (8_000, 8_000, 16_000)
    assert f"{r8['compression']:.1f}x" == "62.5x" and f"{r8['removed_pct']:.2f}%" == "98.40%"
    for r, row in rows.items():  # a rectangular check of the arithmetic
        assert row["lora_params"] == r * 2000 and row["full_params"] == 1_000_000
    rect = lowrank.parameter_table(300, 50, [5])[0]
    assert (rect["params_A"], rect["params_B"]) == (5 * 50, 300 * 5)
    with pytest.raises(ValueError, match="0"):
        lowrank.parameter_table(0, 10)


def test_error_drops_to_zero_at_the_true_rank():
    W = lowrank.synthetic_low_rank(100, 100, 5, seed=1)
    assert int(torch.linalg.matrix_rank(W)) == 5
    rows = {r["rank"]: r for r in lowrank.reconstruction_errors(W, [1, 2, 5, 10, 20, 50])}
    assert rows[1]["rel_error"] > rows[2]["rel_error"] > 0.05
    for r in (5, 10, 20, 50):
        assert rows[r]["rel_error"] < 1e-10 and rows[r]["energy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="true_rank"):
        lowrank.synthetic_low_rank(10, 10, 11)


def test_reconstruction_error_is_eckart_young():
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(W.double())
    for row in lowrank.reconstruction_errors(W, [1, 7, 30]):
        k = row["rank"]
        assert row["rel_error"] == pytest.approx(math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum())), abs=1e-9)


def _model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # make one matrix exactly rank 3 so its spectrum is known
        q = model.model.layers[0].self_attn.q_proj.weight
        q.copy_(torch.randn(32, 3) @ torch.randn(3, 32))
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    return tmp_path / "m"


def test_model_spectrum_and_cli_plots(tmp_path, capsys):
    path = _model_dir(tmp_path)
    weights = lowrank.select_weights(str(path), r"layers\.0\.self_attn\.(q|k)_proj")
    rep = lowrank.spectrum_report(weights, [1, 3, 8])
    q = rep["model.layers.0.self_attn.q_proj"]
    assert q["energy"][3] == pytest.approx(1.0) and q["rank99"] <= 3 and q["energy"][1] < 1
    k = rep["model.layers.0.self_attn.k_proj"]
    assert k["shape"] == [16, 32] and k["rank90"] > 3 and k["energy"][8] < 1
    out = tmp_path / "lab"
    assert main(["lowrank", "--model", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "62.5x" in text and "98.40%" in text and "model.layers.0.mlp.down_proj" in text
    for png in ("lowrank_params.png", "lowrank_error.png", "lowrank_spectrum.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "lowrank.json").read_text())
    assert saved["synthetic"]["true_rank"] == 5
    assert main(["lowrank", "--model", str(path), "--module", "nothing_like_this", "--no-plot"]) == 2
    assert "nothing_like_this" in capsys.readouterr().err


def test_ranks_out_of_range_are_refused(capsys):
    with pytest.raises(ValueError, match=r"\[5000\] exceed min\(d, k\) = 100"):
        lowrank.parameter_table(100, 100, [4, 5000])
    assert main(["lowrank", "--ranks", "5000", "--d", "100", "--k", "100", "--no-plot"]) == 2
    assert "5000" in capsys.readouterr().err
    W = lowrank.synthetic_low_rank(10, 10, 2)
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        lowrank.reconstruction_errors(W, [2, -3])
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        lowrank.spectrum_report({"w": W}, [0])
    assert main(["lowrank", "--svd-ranks=-3", "--no-plot"]) == 2
    assert "-3" in capsys.readouterr().err


def test_non_finite_and_zero_matrices():
    with pytest.raises(ValueError, match="NaN or inf"):
        lowrank.reconstruction_errors(torch.full((3, 3), float("nan")), [1])
    with pytest.raises(ValueError, match="'w'.*NaN or inf"):
        lowrank.spectrum_report({"w": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, [1])
    # a zero matrix loses nothing at any rank, as reconstruction_errors and truncation_error say
    z = lowrank.spectrum_report({"z": torch.zeros(4, 4)}, [1, 4])["z"]
    assert z["rel_error"] == {1: 0.0, 4: 0.0}
    assert [r["rel_error"] for r in lowrank.reconstruction_errors(torch.zeros(4, 4), [1, 4])] == [0.0, 0.0]


def test_synthetic_demo_flags_out_of_range(capsys):
    with pytest.raises(ValueError, match=r"\[500\] exceed min\(rows, cols\) = 100"):
        lowrank.reconstruction_errors(lowrank.synthetic_low_rank(100, 100, 5), [5, 500])
    assert main(["lowrank", "--svd-ranks", "5,500", "--size", "100", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "--svd-ranks [500] exceed --size 100" in err
    with pytest.raises(ValueError, match="matrix dimensions must be >= 1, got 0 x 0"):
        lowrank.synthetic_low_rank(0, 0, 5)
    assert main(["lowrank", "--size", "0", "--no-plot"]) == 2
    assert "--size must be >= 1" in capsys.readouterr().err
    assert main(["lowrank", "--seed", "-1", "--no-plot"]) == 2
    assert "--seed must be >= 0" in capsys.readouterr().err


def test_lowrank_says_when_it_shows_only_some_matching_matrices(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m3")  # 3 layers x 7 projections = 21 matrices
    from lorakit.analysis.weights import LazyWeights

    read, get = [], LazyWeights.__getitem__

    def counted(self, key):
        read.append(key)
        return get(self, key)

    with pytest.MonkeyPatch.context() as mp:  # only the matrices shown are read (headers give the rest)
        mp.setattr(LazyWeights, "__getitem__", counted)
        weights, matched = lowrank.select_weights_counted(str(tmp_path / "m3"), r"_proj")
    assert (len(weights), matched) == (lowrank.MAX_MATRICES, 21)
    assert sorted(read) == sorted(f"{name}.weight" for name in weights)
    capsys.readouterr()
    assert main(["lowrank", "--model", str(tmp_path / "m3"), "--module", "_proj", "--no-plot"]) == 0
    assert f"showing {lowrank.MAX_MATRICES} of 21 matching matrices" in capsys.readouterr().out
    assert main(["lowrank", "--model", str(tmp_path / "m3"), "--module", r"layers\.0\.", "--no-plot"]) == 0
    assert "showing" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lowrank", "--help"])
    assert f"the first {lowrank.MAX_MATRICES} matching matrices" in " ".join(capsys.readouterr().out.split())


def test_ranks_must_be_integers_and_module_needs_a_model(capsys):
    # a float rank made fractional parameter counts, or was truncated to another rank silently
    import torch

    from lorakit.analysis import lowrank
    from lorakit.cli import main

    with pytest.raises(ValueError, match="ranks must be integers, got \\[2.5\\]"):
        lowrank.parameter_table(10, 10, [2.5])
    with pytest.raises(ValueError, match="ranks must be integers"):
        lowrank.reconstruction_errors(torch.randn(6, 6), [2.7])
    with pytest.raises(ValueError, match="ranks must be integers"):
        lowrank.spectrum_report({"w": torch.randn(6, 6)}, [2.7])
    assert main(["lowrank", "--no-plot", "--module", "("]) == 2  # was ignored without --model
    assert "--module selects the matrices of --model" in capsys.readouterr().err


def test_parameter_table_takes_a_rank_equal_to_the_smaller_dimension():
    """r = min(d, k) is the matrix's own rank limit: tabulated, not refused."""
    (row,) = parameter_table(d=6, k=4, ranks=[4])
    assert row["lora_params"] == 4 * (6 + 4) and row["full_params"] == 24


def test_spectrum_report_full_rank_is_the_smaller_dimension():
    """A 6 x 4 matrix has at most rank 4 (the bug this catches: max(W.shape))."""
    report = spectrum_report({"w": torch.randn(6, 4, generator=torch.Generator().manual_seed(0))}, ranks=[1, 4])
    assert report["w"]["full_rank"] == 4 == len(report["w"]["singular_values"])


def test_spectrum_energy_at_rank_r_is_the_top_r_squared_singular_values():
    """energy[r] = Σ_{i≤r} σᵢ² / Σ σᵢ², from an independent float64 SVD (the bug this catches: cum[r] read,
    the energy of rank r + 1)."""
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s2 = torch.linalg.svdvals(w) ** 2
    report = spectrum_report({"w": w}, ranks=[1, 2, 5, 9])
    for r in (1, 2, 5, 9):
        want = float(s2[:min(r, 5)].sum() / s2.sum())
        assert abs(report["w"]["energy"][r] - want) < 1e-12, r


def test_synthetic_true_rank_above_the_smaller_dimension_is_refused():
    """A 3 x 5 matrix cannot have rank 4 (the bug this catches: max(rows, cols) as the bound)."""
    from lorakit.analysis.lowrank import synthetic_low_rank

    with pytest.raises(ValueError, match="true_rank"):
        synthetic_low_rank(3, 5, true_rank=4)


def test_a_model_weight_holding_nan_is_refused_with_the_model_and_tensor_named(tmp_path):
    from safetensors.torch import save_file

    bad = torch.eye(4)
    bad[1, 2] = float("nan")
    save_file({"layers.0.q_proj.weight": torch.eye(4), "layers.0.k_proj.weight": bad}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"weight 'layers.0.k_proj.weight' holds NaN or inf"):
        lowrank.select_weights_counted(str(tmp_path), r"_proj")


# ---- mutation round 6 (/tmp/mutants6): lowrank's command line, weight files
def test_a_trailing_comma_in_an_int_list_is_ignored():
    from lorakit.analysis import cli as acli

    assert acli._ints("4,8,") == [4, 8]


def test_an_svd_rank_equal_to_the_size_is_taken(capsys):
    assert main(["lowrank", "--size", "8", "--svd-ranks", "2,8", "--json"]) == 0
    capsys.readouterr()
    assert main(["lowrank", "--size", "8", "--svd-ranks", "9", "--json"]) == 2


def test_the_names_default_and_embedded_mean_the_embedded_model():
    from lorakit.analysis import weights

    assert weights.resolve("default") == weights.resolve(None) == weights.resolve("embedded")


def test_load_state_dict_with_keys_loads_only_those(tmp_path):
    from safetensors.torch import save_file

    from lorakit.analysis import weights

    save_file({"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    assert set(weights.load_state_dict(tmp_path, keys=["a.weight"])) == {"a.weight"}


def test_a_pickled_weights_file_is_refused_by_name(tmp_path):
    from lorakit.analysis import weights

    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        weights.safetensors_files(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="has only pickled weights.*save_pretrained"):
        weights.safetensors_files(tmp_path)


def test_lowrank_refuses_a_seed_of_2_pow_63(capsys):
    assert main(["lowrank", "--seed", str(2**63), "--json"]) == 2
    assert "--seed" in capsys.readouterr().err


def test_plots_under_a_home_matplotlib_cannot_write_are_quiet(tmp_path):
    """matplotlib's first import logged two warnings about its config directory before every plot
    (a read-only HOME); the plot was written all the same."""
    import os
    import subprocess
    import sys

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 5)))
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME="/proc", LORAKIT_CACHE_DIR=str(tmp_path / "cache"))  # (/proc: not writable, even for root)
    code = ("from pathlib import Path; from lorakit.train.loop import plot_losses; "
            f"plot_losses(Path({str(log)!r}), Path({str(tmp_path / 'loss.png')!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "Matplotlib" not in out.stderr and "mkdir" not in out.stderr, out.stderr
