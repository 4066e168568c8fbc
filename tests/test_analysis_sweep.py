"""`lorakit sweep` trains one run per rank and reports comparable rows."""
from __future__ import annotations

import json

import pytest

from lorakit.analysis.sweep import plot_sweep, run_sweep, sweep_table
from lorakit.cli import main
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


def test_sweep_refuses_existing_runs_before_training(tmp_path):
    (tmp_path / "sweep" / "r4").mkdir(parents=True)
    (tmp_path / "sweep" / "r4" / "log.jsonl").write_text("old run\n")

    def load():
        raise AssertionError("nothing may be trained")

    with pytest.raises(FileExistsError, match=r"r4'.*choose another --output") as info:
        run_sweep(TrainConfig(save_steps=0), [1, 4], tmp_path / "sweep", load=load, log=lambda s: None)
    assert "--resume" not in str(info.value)
    assert not (tmp_path / "sweep" / "r1").exists()


def test_sweep_without_eval_data_says_so(tmp_path):
    tok = tiny_tokenizer()
    train_file = write_jsonl(toy_records(16), tmp_path / "train.jsonl")
    base = TrainConfig(data=str(train_file), max_steps=1, batch_size=8, precision="fp32", save_steps=0)
    logged = []
    rows = run_sweep(base, [1], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok), progress=False,
                     log=logged.append)
    assert rows[0]["eval_loss"] is None
    assert any("no --eval-data" in line for line in logged)


def test_sweep_help_says_what_the_flags_do(capsys):
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 = one full epoch" in text
    assert "no evaluation unless this is given" in text
    assert "write no sweep.png (each run still writes its own loss.png" in text


def test_sweep_rejects_repeated_ranks_before_training(tmp_path):
    def load():
        raise AssertionError("nothing may be trained")

    with pytest.raises(ValueError, match=r"repeat 2\b.*list every rank once") as info:
        run_sweep(TrainConfig(save_steps=0), [2, 4, 2], tmp_path / "sweep", load=load, log=lambda s: None)
    assert "--resume" not in str(info.value)
    assert not (tmp_path / "sweep").exists()


def test_sweep_checks_the_data_first_and_leaves_no_empty_directory(tmp_path):
    tok = tiny_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    logged = []

    def load():
        raise AssertionError("no model before the data is checked")

    with pytest.raises(ValueError, match="bad.jsonl:2"):
        run_sweep(TrainConfig(data=str(bad), save_steps=0), [1, 2], tmp_path / "sw", load=load, log=logged.append)
    assert not logged and not (tmp_path / "sw").exists()
    # answers cut away by --max-length fail in the first run, after the model loads: its folder goes too
    train_file = write_jsonl(toy_records(16), tmp_path / "train.jsonl")
    base = TrainConfig(data=str(train_file), max_steps=1, batch_size=8, precision="fp32", save_steps=0, max_length=2)
    with pytest.raises(ValueError, match="no example has answer tokens"):
        run_sweep(base, [1], tmp_path / "sw", load=lambda: (tiny_llama_lm(tok), tok), progress=False,
                  log=lambda s: None)
    assert not (tmp_path / "sw").exists()


def _base(tmp_path, **kw):
    train_file = write_jsonl(toy_records(48), tmp_path / "train.jsonl")
    eval_file = write_jsonl(toy_records(12, seed=1), tmp_path / "eval.jsonl")
    return TrainConfig(data=str(train_file), eval_data=str(eval_file), batch_size=8, lr=1e-2, precision="fp32",
                       save_steps=0, **kw)


def test_a_ctrl_c_stops_the_sweep_and_keeps_the_finished_ranks_summary(tmp_path):
    # the interrupted rank was summarised as finished (no loss, no mark), and the sweep went on
    import os
    import signal

    import lorakit.train.loop as loop

    tok = tiny_tokenizer()
    real_train = loop.train
    calls = []

    def train(cfg, **kw):
        calls.append(cfg.rank)
        if cfg.rank == 2:
            kw["on_step"] = lambda step, _loss: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None
        return real_train(cfg, **kw)
    loop.train = train
    logged = []
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(_base(tmp_path, max_steps=4), [1, 2, 4], tmp_path / "sweep",
                      load=lambda: (tiny_llama_lm(tok), tok), progress=False, log=logged.append)
    finally:
        loop.train = real_train
    assert calls == [1, 2]  # rank 4 never started
    assert [r["rank"] for r in json.loads((tmp_path / "sweep" / "sweep.json").read_text())] == [1]
    assert any("rank 2 was interrupted at step 2/4" in line and "--resume" in line for line in logged)
    # and what to run for the rest: the same command is refused there now (sweep.json exists)
    assert "run the sweep again with --ranks 2,4 and another --output" in logged[-1]


def test_a_second_sweep_into_the_same_output_is_refused(tmp_path):
    tok = tiny_tokenizer()
    run_sweep(_base(tmp_path, max_steps=1), [1], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok),
              progress=False, log=lambda s: None)
    before = (tmp_path / "sweep" / "sweep.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a sweep"):  # (it replaced the summary)
        run_sweep(_base(tmp_path, max_steps=1), [4], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok),
                  progress=False, log=lambda s: None)
    assert (tmp_path / "sweep" / "sweep.json").read_text() == before


def test_sweep_json_output_is_one_json_document(tmp_path, capsys, monkeypatch):
    from lorakit.analysis import sweep as sw
    from lorakit.cli import main

    rows = [{"rank": 4, "alpha": 8.0, "trainable": 10, "eval_loss": 1.0, "accuracy": 0.5, "step_seconds": 0.1,
             "run_dir": "x"}, {"rank": 1, "alpha": 2.0, "trainable": 3, "eval_loss": 1.2, "accuracy": 0.4,
                               "step_seconds": 0.1, "run_dir": "y"}]
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: rows)
    assert main(["sweep", "--ranks", "4,1", "--json", "--output", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out) == rows  # (a "plot:" line followed it)


def test_the_untrained_model_is_evaluated_once_for_every_rank(tmp_path, monkeypatch):
    import lorakit.train.loop as loop

    tok = tiny_tokenizer()
    train_file = write_jsonl(toy_records(24), tmp_path / "train.jsonl")
    eval_file = write_jsonl(toy_records(8, seed=1), tmp_path / "eval.jsonl")
    base = TrainConfig(data=str(train_file), eval_data=str(eval_file), max_steps=2, batch_size=8, precision="fp32",
                       save_steps=0)
    calls = []
    real = loop.evaluate_shared
    monkeypatch.setattr(loop, "evaluate_shared", lambda *a, **k: calls.append(1) or real(*a, **k))
    logged = []
    rows = run_sweep(base, [1, 2, 4], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok), progress=False,
                     log=logged.append)
    assert len(calls) == 3 + 1  # after each run, before the first only (6 before)
    befores = [json.loads((tmp_path / "sweep" / f"r{r}" / "lorakit_run.json").read_text())["before"] for r in (1, 2, 4)]
    assert befores[0]["loss"] > 0 and befores[1] == befores[0] == befores[2]
    assert sum("measured once for these runs" in line for line in logged) == 2
    assert [r["eval_loss"] for r in rows] == [
        json.loads((tmp_path / "sweep" / f"r{r}" / "lorakit_run.json").read_text())["after"]["loss"] for r in (1, 2, 4)]


# X1: sweep leaves the thread count to its training runs (as lorakit train): the wrapper does not set it
def test_sweep_does_not_pick_threads_itself(tmp_path, monkeypatch, capsys):
    import lorakit.train.generate as gen
    from lorakit.analysis import sweep as sw

    calls = []
    monkeypatch.setattr(gen, "auto_threads", lambda *a, **k: calls.append(a) or 1)
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: [])
    main(["sweep", "--ranks", "4,1", "--json", "--output", str(tmp_path / "s")])
    assert calls == []
    assert main(["recommend", "--task", "simple", "--model-size", "7B", "--data-size", "500"]) == 0
    assert len(calls) == 1  # (the other analysis commands do)


# ---- mutation round 6 (/tmp/mutants6)
def test_the_sweep_plot_draws_ranks_in_increasing_order(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    xs = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, *a, **k: (xs.append(list(x)), real(self, x, *a, **k))[1])
    rows = [dict(rank=r, eval_loss=1.0 / r, accuracy=None, step_seconds=0.1 * r) for r in (8, 2, 4)]
    plot_sweep(rows, tmp_path / "sweep.png")
    assert xs and all(x == sorted(x) for x in xs)


def test_a_sweep_row_reports_the_median_step_time_not_the_total(tmp_path):
    import statistics

    tok = tiny_tokenizer()
    train_file = write_jsonl(toy_records(48), tmp_path / "train.jsonl")
    base = TrainConfig(data=str(train_file), max_steps=5, batch_size=8, lr=1e-2, precision="fp32", save_steps=0)
    row, = run_sweep(base, [2], tmp_path / "sweep", load=lambda: (tiny_llama_lm(tok), tok), progress=False,
                     log=lambda s: None)
    steps = [json.loads(x)["step_s"] for x in (tmp_path / "sweep" / "r2" / "log.jsonl").read_text().splitlines()]
    assert row["step_seconds"] == statistics.median(steps[1:])
