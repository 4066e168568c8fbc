"""benchmarks/small_models.py: its arguments are checked, and a short run prints one row per shape
with the three ratios, and leaves the library's size rules as it found them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import small_models  # noqa: E402


@pytest.mark.parametrize("bad, message", [("32x2", "HIDDENxBATCHxSEQ"), ("32x0x4", "positive"),
                                          ("30x2x4", "multiple of 4"), ("axbxc", "HIDDENxBATCHxSEQ")])
def test_bad_shapes_are_refused_naming_them(capsys, bad, message):
    with pytest.raises(SystemExit) as err:
        small_models.main(["--shapes", bad])
    out = capsys.readouterr().err
    assert err.value.code == 2 and message in out and bad in out


def test_bad_rounds_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        small_models.main(["--rounds", "0"])
    assert err.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_a_short_run_prints_a_row_per_shape_and_restores_the_rules(capsys):
    from lorakit.layers import fused, gemm

    rules = (fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS, gemm.ONEDNN_PAYS)
    small_models.main(["--shapes", "16x1x4,32x2x8", "--rounds", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 16, ") or line.startswith("| 32, ")]
    assert [r.split("|")[1].strip() for r in rows] == ["16, 1 × 4", "32, 2 × 8"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and float(cells[1]) > 0
        assert all(float(c.split()[0]) > 0 for c in cells[2:])  # "median (min–max)" ratios
    assert "Command: `python benchmarks/small_models.py --shapes 16x1x4,32x2x8 --rounds 2`" in out
    assert (fused.KERNELS_MIN_NUMEL, gemm.ONEDNN_MIN_MACS, gemm.ONEDNN_PAYS) == rules
