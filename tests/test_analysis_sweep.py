"""`lorakit sweep` trains one run per rank and reports comparable rows."""
from __future__ import annotations

import json

import pytest

from lorakit.analysis.sweep import plot_sweep, run_sweep, sweep_table
from lorakit.train.config import TrainConfig
from tiny_lm import tiny_llama_lm, tiny_tokenizer, toy_records, write_jsonl


def test_sweep_rows_per_rank(tmp_path):
    tok = tiny_tokenizer()
    train_file = write_jsonl(toy_records(48), tmp_path / "train.jsonl")
    eval_file = write_jsonl(toy_records(12, seed=1), tmp_path / "eval.jsonl")
    base = TrainConfig(data=str(train_file), eval_data=str(eval_file), max_steps=6, batch_size=8, lr=1e-2,
                       precision="fp32", save_steps=0)
    rows = run_sweep(base, [1, 4], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok), progress=False,
                     log=lambda s: None)
    assert [r["rank"] for r in rows] == [1, 4] and [r["alpha"] for r in rows] == [2.0, 8.0]
    assert rows[1]["trainable"] == 4 * rows[0]["trainable"]  # r * (in + out) per layer
    for row in rows:
        assert row["eval_loss"] is not None and row["step_seconds"] > 0
        saved = json.loads((tmp_path / "sweep" / f"r{row['rank']}" / "adapter_config.json").read_text())
        assert saved["r"] == row["rank"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows
    assert "trainable" in sweep_table(rows)
    assert plot_sweep(rows, tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_rejects_bad_ranks(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        run_sweep(TrainConfig(), [0, 4], tmp_path)
    with pytest.raises(ValueError, match="full"):
        run_sweep(TrainConfig(method="full"), [4], tmp_path)
