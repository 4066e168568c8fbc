"""benchmarks/adapter_ops.py: its argument is checked, and a short run on a tiny model prints a row
per operation, and says whether the merged weights are PEFT's bits."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adapter_ops  # noqa: E402


def test_bad_rounds_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        adapter_ops.main(["--rounds", "0"])
    assert err.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_the_peft_model_holds_lorakit_s_adapter_numbers():
    ours, theirs = adapter_ops.build(tiny_llama())
    mine = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    peers = {n.removeprefix("base_model.model.").removesuffix(".weight"): p
             for n, p in theirs.named_parameters() if "lora_" in n}
    assert mine.keys() == peers.keys() and len(mine) > 0
    assert all(bool((mine[k] == peers[k]).all()) and bool(mine[k].abs().sum() > 0) for k in mine)


def test_a_short_run_prints_a_row_per_operation(capsys):
    result = adapter_ops.run(1, "python benchmarks/adapter_ops.py --rounds 1", tiny_llama())
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in adapter_ops.OPS]
    assert [r.split("|")[1].strip() for r in rows] == list(adapter_ops.OPS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].split()[0]) > 0 and float(cells[2]) >= 0 and float(cells[3]) >= 0
    assert result["same_bits"] is True and "the same bits as PEFT's: yes" in out
    assert all(len(v) == 1 for v in result["ratios"].values())  # (the warm-up round left out)
