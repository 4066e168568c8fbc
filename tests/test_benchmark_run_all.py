"""benchmarks/run_all.py: its plans of repeats and the choice between them (``--plan auto``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402


def test_auto_plan_is_the_first_whose_projection_fits_85_percent_of_the_budget():
    ref = run_all.CALIBRATION_REF_S
    full, lean = run_all.plan_seconds("full"), run_all.plan_seconds("lean")
    assert run_all.plan_seconds("leaner") < lean < full
    fits = ref * 0.85 * 900 / full  # the calibration time at which the full plan just fits 900 s
    assert run_all.choose_plan(fits * 0.99, 900)[0] == "full"
    plan, why = run_all.choose_plan(fits * 1.01, 900)
    assert plan == "lean"
    assert "900 s budget" in why and f"{fits * 1.01:.3f} s" in why and "s for leaner" in why
    # a larger budget lets the same machine run the full plan
    assert run_all.choose_plan(fits * 1.01, 1200)[0] == "full"
    lean_fits = ref * 0.85 * 900 / lean
    assert run_all.choose_plan(lean_fits * 0.99, 900)[0] == "lean"
    assert run_all.choose_plan(lean_fits * 1.01, 900)[0] == "leaner"
    # far too slow for any plan: the leanest still runs (the budget then stops what does not fit)
    assert run_all.choose_plan(ref * 10, 900)[0] == "leaner"
    # the machine the plans were timed on: the full plan does not fit 15 minutes there
    assert run_all.choose_plan(ref, 900)[0] != "full"


def test_replan_keeps_a_plan_that_fits_and_otherwise_takes_the_first_leaner_one_that_does():
    rest = ["time_to_quality.py", "inference.py"]
    lean, leaner = run_all.plan_seconds("lean", rest), run_all.plan_seconds("leaner", rest)
    assert leaner < lean
    left = lean / 0.85 * 1.01  # lean just fits at speed 1
    assert run_all.replan("lean", 1.0, rest, left) == ("lean", lean)
    assert run_all.replan("lean", 1.02, rest, left)[0] == "leaner"
    assert run_all.replan("leaner", 1.0, rest, left)[0] == "leaner"  # never back to more repeats
    assert run_all.replan("full", 1.0, rest, left)[0] == "lean"
    plan, need = run_all.replan("lean", 100.0, rest, left)  # nothing fits: the leanest
    assert plan == "leaner" and need == pytest.approx(100 * leaner)


def test_the_suite_goes_on_with_a_leaner_plan_when_its_benchmarks_run_slower_than_planned(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name in ("one.py", "two.py"):  # each prints the arguments it got
        (bench / name).write_text("import sys; print(' '.join(sys.argv[1:]))\n")
    args = {"full": ["--full"], "lean": ["--lean"], "leaner": ["--leaner"], "quick": []}
    # planned seconds: "one" a millisecond; "two" 10 s unless leaner
    suite = [("T0", "one.py", args, {"full": 1e-3, "lean": 1e-3, "leaner": 1e-3}),
             ("T1", "two.py", args, {"full": 10, "lean": 10, "leaner": 1e-3})]
    monkeypatch.setattr(run_all, "SUITE", suite)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "CALIBRATION_SECONDS", 0)
    monkeypatch.setattr(run_all, "calibrate", lambda: 1e-9)  # projects almost nothing: full
    out = tmp_path / "bench.md"
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--budget", "5", "--out", str(out)])
    assert run_all.main() == 0
    text = out.read_text()
    # "one" ran under full, far slower than its planned millisecond (a fresh Python takes tens of them):
    # "two" projected at 10 s x that speed under full or lean, so it ran under leaner
    assert "--full\n" in text and "--leaner\n" in text and "--lean\n" not in text
    assert 'from "T1" on, plan **leaner**' in text and "plan full, then leaner" in text
    assert "s, plan leaner)" in text
    # an explicit plan is kept whatever the times
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--plan", "full", "--budget", "5", "--out", str(out)])
    assert run_all.main() == 0
    assert out.read_text().count("--full\n") == 2 and "Re-planned" not in out.read_text()


@pytest.mark.parametrize("entry", run_all.SUITE, ids=[e[1] for e in run_all.SUITE])
def test_every_benchmark_has_each_plan_and_a_leaner_one_does_no_more(entry):
    _title, script, plans, seconds = entry
    assert set(plans) == {*run_all.PLANS, "quick"} and set(seconds) == set(run_all.PLANS)
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
    for more, less in zip(run_all.PLANS, run_all.PLANS[1:]):
        a, b = parse(plans[more]), parse(plans[less])
        assert {f for f, v in a.items() if v is not True} == {f for f, v in b.items() if v is not True}, script
        for flag, value in b.items():
            if value is not True:  # (evaluating less often is less work)
                assert value >= a[flag] if flag == "--eval-every" else value <= a[flag], (script, flag)
        assert {f for f, v in a.items() if v is True} <= {f for f, v in b.items() if v is True}, script
        assert seconds[less] <= seconds[more], script
