"""Data-parallel training on torch.distributed (gloo, CPU): two processes train the single-process run
with twice the batch, stop together, resume exactly, and ``lorakit train`` runs under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lorakit.train.config import TrainConfig
from lorakit.train.distributed import BUCKET_NUMEL, Dist, _buckets, setup
from lorakit.train.loop import train
from tiny_lm import one_thread, save_tiny_model, tiny_llama_lm, tiny_tokenizer, toy_records, write_jsonl

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
TESTS = Path(__file__).resolve().parent


def _worker(rank: int, world: int, store: str, cfg: dict, resume: bool, stop_at: tuple[int, int] | None,
            out: str, bucket: int | None) -> None:
    """One process of a run: train the tiny Llama, keep the result and the trained tensors."""
    import torch.distributed as dist

    import lorakit.train.distributed as d

    if bucket is not None:
        d.BUCKET_NUMEL = bucket  # several exchanges per step
    torch.set_num_threads(1)
    # as in a terminal: a test run started in the background by a script passes SIGINT on ignored,
    # and a run keeps ignoring a signal it was started ignoring
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # a file rendezvous: no port is picked in advance (a port found free can be taken before it is bound)
    d.init_gloo(init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tok = tiny_tokenizer()

        def on_step(step: int, loss: float) -> None:
            if stop_at is not None and (rank, step) == stop_at:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C in this process only (to this thread, the main one)

        model = tiny_llama_lm(tok)
        res = train(TrainConfig(**cfg), resume=resume, model=model, tokenizer=tok, progress=False,
                    on_step=on_step, log=lambda *_: None)
        torch.save({"losses": res.losses, "steps": res.steps, "interrupted": res.interrupted,
                    "after": res.after, "state": _trained(model, cfg.get("method", "lora"))}, Path(out) / f"rank{rank}.pt")
        # both processes done before either tears the group down: a process whose peer closed the
        # connections while it was still saving aborted in gloo ("terminate called without an
        # active exception", SIGABRT, ~1 suite run in 10)
        dist.barrier()
    finally:
        d.close_group()
    # destroyed means gone: the group's threads (pt_gloo_*) left running into interpreter shutdown
    # aborted the process now and then (a tensor freed there; see init_gloo), as they did while
    # transformers' import of torch.distributed.nn after the group started kept the group alive.
    # gloo's transport thread (gloo_tcp_loop, which holds no tensors) belongs to its network device,
    # which a pending connection of the transport can keep a while after the group has gone (a suite
    # run on a fresh machine once found it alone still running here): it gets up to 10 s.
    assert [n for n in _gloo_threads() if n.startswith("pt_gloo")] == [], _gloo_threads()
    left = _gloo_threads_after(10)
    if left:
        print(f"rank {rank}: gloo's transport thread still running 10 s after close_group: {left}", file=sys.stderr)


def _gloo_threads_after(seconds: float) -> list[str]:
    """This process's gloo threads once none is left, or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while (left := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux; none elsewhere)."""
    tasks = Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # (a thread that ended meanwhile)
            continue
    return [n for n in names if n.startswith(("pt_gloo", "gloo"))]


def _trained(model, method: str = "lora") -> dict:
    """The tensors ``train`` has trained in ``model`` (LoRA is injected in place)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if method == "full" or "lora_" in n}
    assert state
    return state


def _spawn(tmp_path: Path, cfg: dict, resume: bool = False, stop_at=None, world: int = 2,
           bucket: int | None = None) -> list[dict]:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix="out-", dir=tmp_path))
    mp.spawn(_worker, args=(world, str(out / "store"), cfg, resume, stop_at, str(out), bucket), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    # plain-text lines (a loss, no answer to check) among the questions: the predictions of the
    # shares must still come back in the examples' order
    texts = [{"text": "a good film and a dull plot"}, {"text": "the actor"}, {"text": "very boring scene"}]
    records = toy_records(11, seed=1)
    records = records[:1] + texts[:2] + records[1:3] + texts[2:] + records[3:]
    return str(write_jsonl(records, tmp_path_factory.mktemp("dist-eval") / "eval.jsonl"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-data")
    # 25 examples in global batches of 8: the last batch of each epoch holds one example, so the
    # second process's share of it is empty (it must still take part in the gradient sum)
    # plain-text lines of many lengths (every token a label) among the prompt/completion ones (one label
    # each): the processes' shares hold different label counts, which a per-process mean would weigh wrongly
    words = "a good film and a very dull plot the actor".split()
    texts = [{"text": " ".join(words[: 2 + i])} for i in range(8)]
    return str(write_jsonl(toy_records(17) + texts, d / "train.jsonl"))


def _cfg(data: str, out: Path, **kw) -> dict:
    cfg = dict(data=data, output=str(out), batch_size=4, lr=1e-2, precision="fp32", max_steps=9, save_steps=0,
               seed=0, threads=1, dropout=0.0)
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_train_the_single_process_run_with_twice_the_batch(tmp_path, data, eval_file, method):
    # full fine-tuning sends every weight's gradient: in buckets of at most 3000 numbers here
    # (the tiny Llama's tensors hold 32 to 2,048 numbers), so each step makes many exchanges;
    # 14 held-out examples: the processes evaluate 7 each
    evals = dict(method=method, eval_data=eval_file, eval_steps=4)
    ranks = _spawn(tmp_path, _cfg(data, tmp_path / "two", **evals), bucket=3000 if method == "full" else None)
    tok = tiny_tokenizer()
    model = tiny_llama_lm(tok)
    single = train(TrainConfig(**_cfg(data, tmp_path / "one", batch_size=8, **evals)), model=model,
                   tokenizer=tok, progress=False, log=lambda *_: None)
    assert ranks[0]["steps"] == ranks[1]["steps"] == single.steps == 9  # 4 batches an epoch: the short one ran twice
    for name, t in ranks[0]["state"].items():  # the processes hold one model, to the bit
        assert torch.equal(t, ranks[1]["state"][name]), name
    reference = _trained(model, method)
    assert set(reference) == set(ranks[0]["state"])
    for name, t in reference.items():  # the same model as one process with twice the batch (sums reordered)
        torch.testing.assert_close(ranks[0]["state"][name], t, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the summed loss, on every process
    # only the first process wrote the run: its log has each step once, with the summed tokens
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    log1 = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 10))
    assert [r["tokens"] for r in log] == [r["tokens"] for r in log1]
    # the shared evaluations give the single process's numbers, on every process
    assert [r["step"] for r in log if "eval_loss" in r] == [r["step"] for r in log1 if "eval_loss" in r] == [4, 8]
    assert ([r["eval_loss"] for r in log if "eval_loss" in r]
            == pytest.approx([r["eval_loss"] for r in log1 if "eval_loss" in r], rel=1e-5))
    for rank in ranks:
        for key in ("n", "n_labels", "n_accuracy", "accuracy"):
            assert rank["after"][key] == single.after[key], key
        assert rank["after"]["loss"] == pytest.approx(single.after["loss"], rel=1e-5)
    assert ranks[0]["after"]["samples"] == single.after["samples"]
    assert [s["example"] for s in single.after["samples"]] == [0, 3, 4, 6, 7]
    assert info_before(tmp_path / "two") == pytest.approx(info_before(tmp_path / "one"), rel=1e-6)
    info = json.loads((tmp_path / "two" / "lorakit_run.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 9
    assert (tmp_path / "two" / ("adapter_model.safetensors" if method == "lora" else "model/config.json")).is_file()


def info_before(run_dir: Path) -> float:
    return json.loads((run_dir / "lorakit_run.json").read_text())["before"]["loss"]


def test_ctrl_c_in_one_process_stops_both_after_the_same_step_and_the_resume_is_exact(tmp_path, data):
    cfg = _cfg(data, tmp_path / "whole", dropout=0.1, max_steps=6)  # dropout: each process's RNG must resume too
    whole = _spawn(tmp_path, cfg)
    cut = dict(cfg, output=str(tmp_path / "cut"))
    # Ctrl-C reaches the second process only, after step 3's gradient exchange: the request travels
    # with step 4's, and both stop after step 4
    stopped = _spawn(tmp_path, cut, stop_at=(1, 3))
    assert [r["interrupted"] for r in stopped] == [True, True] and [r["steps"] for r in stopped] == [4, 4]
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    # one process cannot take it over: the batches of each step depend on the number of processes
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="trained in 2.*--nproc-per-node 2"):
        train(TrainConfig(**cut), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
              log=lambda *_: None)
    resumed = _spawn(tmp_path, cut, resume=True)
    assert resumed[0]["steps"] == 6 and not resumed[0]["interrupted"]
    assert resumed[0]["losses"] == whole[0]["losses"]
    for name, t in whole[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], t), name


def _cycle_worker(rank: int, store: str, out: str) -> None:
    """A one-process group that a garbage cycle also holds; what is left of gloo after ``close_group``."""
    import gc

    import torch.distributed as dist

    import lorakit.train.distributed as d

    gc.disable()  # (only close_group's own collection may free the cycle)
    d.init_gloo(init_method=f"file://{store}", rank=rank, world_size=1)
    dist.all_reduce(torch.ones(3))
    cycle: list = [dist.group.WORLD]
    cycle.append(cycle)  # (freed only by the garbage collector)
    del cycle
    running = _gloo_threads()
    d.close_group()
    after = _gloo_threads()
    later = _gloo_threads_after(10)  # gloo's transport thread may take a moment (see _worker)
    Path(out).write_text(json.dumps({"before": running, "after": after, "later": later}))


def test_close_group_ends_gloo_even_when_a_garbage_cycle_holds_the_group(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "threads.json"
    mp.spawn(_cycle_worker, args=(str(tmp_path / "store"), str(out)), nprocs=1, join=True)
    threads = json.loads(out.read_text())
    assert threads["before"] and not [n for n in threads["after"] if n.startswith("pt_gloo")], threads
    assert threads["later"] == [], threads


def test_setup_outside_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert setup() == Dist()  # a plain process: one of one
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        setup()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        setup()


def test_gradient_buckets_keep_order_and_size(monkeypatch):
    import lorakit.train.distributed as d

    monkeypatch.setattr(d, "BUCKET_NUMEL", 10)
    params = [torch.zeros(n, requires_grad=True) for n in (4, 4, 4, 12, 3, 3)]
    for p in params:
        p.grad = torch.zeros_like(p)
    buckets = _buckets(params)
    assert [[p.numel() for p in b] for b in buckets] == [[4, 4], [4], [12], [3, 3]]
    assert [p for b in buckets for p in b] == params
    assert BUCKET_NUMEL >= 2 ** 20


def test_lorakit_train_under_torchrun(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    train_file = write_jsonl(toy_records(24), tmp_path / "train.jsonl")
    eval_file = write_jsonl(toy_records(8, seed=1), tmp_path / "eval.jsonl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "lorakit.cli", "train", "--model", str(model_dir), "--data", str(train_file), "--eval-data",
           str(eval_file), "--max-steps", "4", "--batch-size", "4", "--precision", "fp32", "--threads", "1",
           "--output", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training lora on 24 examples: 4 steps of 4x1 in each of 2 processes") == 1  # one voice
    assert proc.stdout.count("try it:") == 1 and proc.stdout.count("] held-out loss") == 2  # before and after
    info = json.loads((tmp_path / "run" / "lorakit_run.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 4 and info["after"]["n"] == 8
    assert "optimizer steps                   4 x 8 examples (2 processes)" in proc.stdout
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


TWICE = """
import sys
sys.path.insert(0, {tests!r})
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from tiny_lm import tiny_llama_lm, tiny_tokenizer

tok = tiny_tokenizer()
for name in ("first", "second"):  # one process group serves both runs
    cfg = TrainConfig(data={data!r}, output={out!r} + "/" + name, batch_size=2, max_steps=2, precision="fp32",
                      threads=1)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=lambda *_: None)
"""


def test_two_runs_in_one_torchrun_script(tmp_path, data):
    script = tmp_path / "twice.py"
    script.write_text(TWICE.format(tests=str(TESTS), data=data, out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("first", "second"):
        info = json.loads((tmp_path / name / "lorakit_run.json").read_text())
        assert info["processes"] == 2 and info["steps"] == 2


def test_a_single_process_checkpoint_is_not_resumed_in_two(tmp_path, data):
    from lorakit.train.loop import SimulatedKill, find_checkpoint, load_checkpoint

    def kill(step, loss):
        if step == 2:
            raise SimulatedKill

    tok = tiny_tokenizer()
    with pytest.raises(SimulatedKill):
        train(TrainConfig(**_cfg(data, tmp_path / "one", save_steps=1)), model=tiny_llama_lm(tok), tokenizer=tok,
              progress=False, on_step=kill, log=lambda *_: None)
    ckpt = find_checkpoint(tmp_path / "one")
    # refused before anything is restored (so before any process waits for another)
    with pytest.raises(ValueError, match="in 2 process.*trained in 1 .*resume it with one process"):
        load_checkpoint(ckpt, None, None, None, Dist(world=2, rank=1))


def test_the_resume_command_names_the_process_count(monkeypatch):
    from lorakit.train.distributed import Dist
    from lorakit.train.loop import resume_command

    run = Path("runs/r")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resume_command(run) == f"lorakit train --resume {run}"
    assert resume_command(run, Dist(2, 0)) == f"torchrun --nproc-per-node 2 -m lorakit.cli train --resume {run}"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines of two processes
    assert resume_command(run, Dist(4, 0)).startswith("the same torchrun launch (4 processes) of: -m lorakit.cli")


def test_the_resume_command_can_be_pasted_into_a_shell():
    import shlex

    from lorakit.train.loop import resume_command

    run = Path("my runs/it's 😀")
    assert shlex.split(resume_command(run)) == ["lorakit", "train", "--resume", str(run)]



def test_processes_given_different_data_stop_with_one_clear_error(tmp_path, data, monkeypatch):
    """A process with another file (on another node: the same path, another file) planned another
    number of steps, and the run hung at the first step one process skipped. Here the first process of
    two sees the other report 16 examples (a stand-in for the other process: no gloo teardown race)."""
    import lorakit.train.loop as loop
    from lorakit.train.distributed import Dist

    class TwoProcesses(Dist):
        def broadcast_object(self, obj):
            return obj

        def gather_objects(self, obj):
            (n, *rest), settings = obj
            return [obj, ((16, *rest), settings)]

    monkeypatch.setattr(loop, "setup_distributed", lambda: TwoProcesses(world=2, rank=0))
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"read different data \(training examples per process: \[25, 16\]\)"):
        train(TrainConfig(**_cfg(data, run, max_steps=0, epochs=2)), model=tiny_llama_lm(tok), tokenizer=tok,
              progress=False, log=lambda *_: None)
    assert not run.exists()  # the failed new run removed what it wrote


@pytest.mark.parametrize("field, other", [("lr", 1e-3), ("max_steps", 4), ("rank", 4), ("seed", 1)])
def test_processes_given_different_settings_stop_with_one_clear_error(tmp_path, data, monkeypatch, field, other):
    """Processes started with their own TrainConfig (the Python API): another max_steps hung at the
    last collective, another rank died in gloo, another lr or seed trained on silently. A stand-in
    for the other process reports its settings."""
    import lorakit.train.loop as loop
    from lorakit.train.distributed import Dist

    class TwoProcesses(Dist):
        def broadcast_object(self, obj):
            return obj

        def gather_objects(self, obj):
            data_print, settings = obj
            return [obj, (data_print, {**settings, field: other})]

    monkeypatch.setattr(loop, "setup_distributed", lambda: TwoProcesses(world=2, rank=0))
    tok = tiny_tokenizer()
    run = tmp_path / "run"
    cfg = TrainConfig(**_cfg(data, run, max_steps=6))
    mine = getattr(cfg, field)
    with pytest.raises(ValueError, match=rf"given different settings \({field}: process 0: {mine!r}, process 1: "
                                         rf"{other!r}\)"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=lambda *_: None)
    assert not run.exists()
    # the output directory and the thread count may differ (the main process's directory is the run's)
    assert "output" not in loop._settings(cfg) and "threads" not in loop._settings(cfg)


def test_a_claim_the_other_process_never_saw_is_given_back(tmp_path):
    """The other process failed before the claim (bad data there): the first one's broadcast of the
    claimed directory failed, and the claimed train_config.yaml stayed, so the same command was refused."""
    from lorakit.train.distributed import Dist
    from lorakit.train.loop import _claim_run_dir_once

    class PeerGone(Dist):
        def broadcast_object(self, obj):
            raise RuntimeError("Connection closed by peer")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="closed by peer"):
        _claim_run_dir_once(run, TrainConfig(output=str(run)), PeerGone(world=2, rank=0))
    assert not run.exists()


def test_the_first_process_refuses_a_named_output_that_holds_files_and_tells_the_others(tmp_path):
    """Under torchrun the first process claims --output for all (the single-process check before
    the claim is not what stops it there): a directory that holds files must be refused, not trained
    into, and the refusal broadcast so every process raises it alike."""
    from lorakit.train.distributed import Dist
    from lorakit.train.loop import _claim_run_dir_once

    sent = []

    class Recording(Dist):
        def broadcast_object(self, obj):
            sent.append(obj)
            return obj

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt|holds|files"):
        _claim_run_dir_once(run, TrainConfig(output=str(run)), Recording(world=2, rank=0))
    assert sent and sent[0][0] is True  # the refusal, for the other processes to raise
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and (run / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _claim_run_dir_once(empty, TrainConfig(output=str(empty)), Recording(world=2, rank=0)) == (empty, False)
    assert sent[-1] == (False, str(empty)) and (empty / "train_config.yaml").is_file()


def test_a_lost_peer_is_one_line_naming_the_other_process(monkeypatch, capsys):
    import argparse

    import lorakit.cli as cli

    def fails(_args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:27857")

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train").set_defaults(func=fails)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("[rank 1] lorakit train: error: another process of this run stopped (the connection to "
                           "it was lost); its own error, if it had one, is printed above")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not under torchrun: a RuntimeError is a bug, with its traceback
    with pytest.raises(RuntimeError):
        cli.main(["train"])


def test_a_bucket_may_hold_exactly_bucket_numel_numbers(monkeypatch):
    # X2: "at most BUCKET_NUMEL numbers" per all-reduce: 4 + 6 == 10 fills one bucket of 10
    monkeypatch.setattr("lorakit.train.distributed.BUCKET_NUMEL", 10)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(2, 3, requires_grad=True), torch.zeros(1, requires_grad=True)]
    for p in params:
        p.grad = torch.zeros_like(p)
    buckets = _buckets(params)
    assert [[tuple(p.shape) for p in b] for b in buckets] == [[(4,), (2, 3)], [(1,)]]
