"""`lorakit sweep`: the lesson's exercise "compare the effect of different ranks", run for real.

Trains the same task at several ranks for the same number of steps (same seed, data, learning rate,
alpha = 2·r) and reports, per rank: trainable parameters, final held-out loss, task metric and the
median training-step time. Each rank is an ordinary ``lorakit train`` run in its own directory, so
every adapter can be inspected, evaluated or resumed afterwards.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

from lorakit.train.config import TrainConfig

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


def run_sweep(base: TrainConfig, ranks: list[int], out_dir: str | Path,
              load: Callable[[], tuple[Any, Any]] | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train ``base`` once per rank (alpha = 2·r) and collect one result row per rank.

    Args:
        base: The training configuration shared by every run (its ``rank``/``alpha``/``output`` are replaced).
        ranks: Ranks to try, each >= 1.
        out_dir: Parent directory; run ``r<rank>`` goes in ``out_dir/r<rank>``.
        load: Optional ``() -> (model, tokenizer)`` giving a fresh base model per run (tests);
            default: load ``base.model``.
        progress: Show each run's progress bar.
        log: Where human-readable messages go.

    Returns:
        Rows ``{"rank", "alpha", "trainable", "eval_loss", "accuracy", "step_seconds", "run_dir"}``.

    Raises:
        ValueError: no ranks, a rank < 1, a rank given twice, or a method other than lora / qlora
            (checked before any training starts).
        FileExistsError: a run directory ``out_dir/r<rank>`` already holds files (checked for every
            rank before any training starts).
    """
    from lorakit.train.data import BUILTIN_TASK, load_examples

    if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {ranks!r}")
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise ValueError(f"ranks {ranks!r} repeat {', '.join(map(str, repeated))}: each rank is trained once, "
                         f"into its own run directory r<rank>; list every rank once")
    if base.method == "full":
        raise ValueError("sweep compares LoRA ranks; --method full has no rank")
    out_dir = Path(out_dir)
    if (out_dir / "sweep.json").exists():  # (a later sweep there replaced the earlier one's summary)
        raise FileExistsError(f"{str(out_dir)!r} already holds a sweep (sweep.json); choose another --output")
    for r in ranks:
        run_dir = out_dir / f"r{r}"
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise FileExistsError(f"run directory {str(run_dir)!r} already holds files; sweep starts every run "
                                  f"afresh, so choose another --output")
    # the data once, up front: a bad line is reported before the first run, not after a rank's banner
    load_examples(base.data, "train")
    if base.eval_data:
        load_examples(base.eval_data, "test")
    if not base.eval_data and base.data not in (None, BUILTIN_TASK):
        log("note: no --eval-data, so the runs are not evaluated (held-out loss and accuracy stay empty)")
    created = not out_dir.exists()
    rows: list[dict[str, Any]] = []
    try:
        _train_each(base, ranks, out_dir, load, progress, log, rows)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # (a failed first run removes its own directory; the sweep's parent goes too)
        elif rows:  # the finished ranks' summary is kept (it was lost with a later rank's failure)
            _write_summary(out_dir, rows)
            log(f"the sweep stopped; the finished ranks are summarised in {str(out_dir / 'sweep.json')!r}")
        left = [r for r in ranks if r not in {row["rank"] for row in rows}]
        if left and out_dir.is_dir():  # (this --output now holds a sweep or runs: a rerun there is refused)
            log(f"to train the ranks not finished, run the sweep again with --ranks {','.join(map(str, left))} "
                f"and another --output")
        raise
    _write_summary(out_dir, rows)
    return rows


def _write_summary(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    from lorakit.io import atomic_write_bytes

    atomic_write_bytes(out_dir / "sweep.json", json.dumps(rows, indent=1).encode("utf-8"))


def _train_each(base: TrainConfig, ranks: list[int], out_dir: Path, load: Callable[[], tuple[Any, Any]] | None,
                progress: bool, log: Callable[[str], None], rows: list[dict[str, Any]]) -> None:
    """One ``lorakit train`` run per rank (alpha = 2·r), each summarised as a row appended to ``rows``.

    Raises:
        KeyboardInterrupt: a run was stopped by Ctrl-C (it kept its checkpoint); the sweep stops there
            instead of training the other ranks and reporting the stopped one as finished.
    """
    from lorakit.train.loop import resume_command, train

    before = None  # the untrained model's evaluation: the same for every rank (B = 0), so run once
    for r in ranks:
        cfg = TrainConfig.from_dict({**base.to_dict(), "rank": r, "alpha": 2.0 * r, "output": str(out_dir / f"r{r}")})
        model, tokenizer = load() if load is not None else (None, None)
        log(f"== rank {r}: {cfg.output}")
        result = train(cfg, model=model, tokenizer=tokenizer, progress=progress, log=log, before_eval=before)
        before = result.before or None
        if result.interrupted:
            log(f"rank {r} was interrupted at step {result.steps}/{result.total_steps}; the sweep stops here (finish "
                f"that run with: {resume_command(result.run_dir)})")
            raise KeyboardInterrupt
        steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        # each step's own duration (elapsed_s is rounded to 10 ms, more than a tiny model's step);
        # the first step is left out (warm-up)
        times = [s["step_s"] for s in steps[1:]]
        rows.append({"rank": r, "alpha": 2.0 * r, "trainable": result.trainable_params,
                     "eval_loss": result.after.get("loss"), "accuracy": result.after.get("accuracy"),
                     "step_seconds": statistics.median(times) if times else result.train_seconds,
                     "run_dir": str(result.run_dir)})


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``run_sweep`` rows."""
    lines = [f"{'rank':>5} {'alpha':>6} {'trainable':>12} {'eval loss':>10} {'accuracy':>9} {'step s':>8}"]
    for row in rows:
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        loss = "-" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        lines.append(f"{row['rank']:>5} {row['alpha']:>6g} {row['trainable']:>12,} {loss:>10} {acc:>9} {row['step_seconds']:>8.2f}")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Eval loss, accuracy and step time against rank (log-2 axis), as a PNG."""
    from lorakit.analysis.plots import pyplot, _save

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rows = sorted(rows, key=lambda row: row["rank"])  # (in the order given, the lines zigzagged)
    ranks = [row["rank"] for row in rows]
    series = (("eval_loss", "held-out loss"), ("accuracy", "held-out accuracy"), ("step_seconds", "seconds per step"))
    for ax, (key, label) in zip(axes, series):
        pairs = [(r, row[key]) for r, row in zip(ranks, rows) if row[key] is not None]
        if pairs:
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle("LoRA rank sweep (alpha = 2r, same steps, seed and data)")
    return _save(fig, path)
