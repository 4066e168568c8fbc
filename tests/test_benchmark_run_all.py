"""benchmarks/run_all.py: its plans of repeats and the choice between them (``--plan auto``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402


def test_auto_plan_is_full_where_its_projection_fits_85_percent_of_the_budget():
    ref, full = run_all.CALIBRATION_REF_S, run_all.PLAN_SECONDS["full"]
    fits = ref * 0.85 * 900 / full  # the calibration time at which the full plan just fits 900 s
    assert run_all.choose_plan(fits * 0.99, 900)[0] == "full"
    plan, why = run_all.choose_plan(fits * 1.01, 900)
    assert plan == "lean"
    assert "900 s budget" in why and f"{fits * 1.01:.3f} s" in why
    # a larger budget lets the same machine run the full plan
    assert run_all.choose_plan(fits * 1.01, 1200)[0] == "full"
    # the machine the plans were timed on: the full plan does not fit 15 minutes there
    assert run_all.choose_plan(ref, 900)[0] == "lean"


@pytest.mark.parametrize("entry", run_all.SUITE, ids=[e[1] for e in run_all.SUITE])
def test_every_benchmark_has_each_plan_and_lean_does_no_more_than_full(entry):
    _title, script, plans = entry
    assert set(plans) == {"full", "lean", "quick"}
    source = (BENCH / script).read_text()
    for args in plans.values():
        for flag in (a for a in args if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script} has no {flag} option"
    def parse(args):  # {flag: value}, a flag without a value as True
        out, i = {}, 0
        while i < len(args):
            valued = i + 1 < len(args) and not args[i + 1].startswith("--")
            out[args[i]] = int(args[i + 1]) if valued else True
            i += 2 if valued else 1
        return out
    full, lean = parse(plans["full"]), parse(plans["lean"])
    assert {f for f, v in full.items() if v is not True} == {f for f, v in lean.items() if v is not True}, script
    for flag, value in lean.items():
        if value is not True:
            assert value <= full[flag], (script, flag)
