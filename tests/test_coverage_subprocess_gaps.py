"""Gaps left by the suite even counting its subprocesses (coverage with subprocess measurement:
96.0% of lorakit, 93.2% of its branches): user-facing refusals of the CLI and of TrainConfig, the
resume helpers, a checkpoint of another rank, Ctrl-C inside a command, and what a later torchrun
process does when the first one refuses --output (a coverage audit, /tmp/cov18). It found one flaw,
fixed: ``load_checkpoint`` copied the tensors before the first that did not fit, and all of them
before an unreadable optimizer state; now every file is read and checked before anything changes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lorakit.cli import main


# ------------------------------------------------------------------ lorakit train (loop.py 524)
def test_resume_from_a_directory_that_is_no_run_is_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lorakit train: error: cannot resume" in err and "train_config.yaml" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written into it


# ------------------------------------------------------------------ --config (config.py 338)
@pytest.mark.parametrize("text", ["- lr: 0.001\n- rank: 4\n", "just a string\n"])
def test_a_config_file_that_is_no_mapping_is_refused(tmp_path, capsys, text):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "must hold a mapping of option: value" in err and str(cfg) in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ TrainConfig (config.py 172, 186, 198)
@pytest.mark.parametrize("kw, message", [
    (dict(precision="fp16"), "precision must be 'auto', 'fp32' or 'bf16'"),
    (dict(threads=-1), "threads must be a non-negative integer, got -1"),
    (dict(seed=True), "seed must be a non-negative integer, got True"),
    (dict(max_grad_norm=-0.5), "max_grad_norm must be >= 0"),
])
def test_train_config_refuses_out_of_range_values(kw, message):
    from lorakit.train.config import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**kw)
    ok = {"precision": "bf16", "threads": 0, "seed": 0, "max_grad_norm": 0.0}
    TrainConfig(**{k: ok[k] for k in kw})  # the edge of the range is accepted


def test_a_negative_seed_on_the_command_line_is_one_error_line(tmp_path, capsys):
    assert main(["train", "--seed", "-3", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "lorakit train: error: seed must be a non-negative integer, got -3" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ generate (train/cli.py 230, generate.py 578)
def test_generate_use_needs_named_adapters(capsys):
    assert main(["generate", "--use", "a", "hello"]) == 2
    assert "--use NAME needs adapters loaded with --adapter NAME=DIR" in capsys.readouterr().err


def test_generate_with_a_missing_adapter_directory(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["generate", "--adapter", str(missing), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"adapter directory {str(missing)!r} not found" in err and "Traceback" not in err


# ------------------------------------------------------------------ data (data.py 169)
def test_a_message_whose_content_is_not_a_string_names_its_line(tmp_path):
    from lorakit.train.data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": ["hi"]},
                                                      {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: messages\[0\]\.content must be a string"):
        read_jsonl(path)


# ------------------------------------------------------------------ resume helpers (loop.py 1255, 1292)
def test_truncating_the_log_on_resume_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path):
    from lorakit.train.loop import _truncate_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(lines[:4]) + "\n" + json.dumps({"eval": 1}) + "\n" + lines[4][:7] + "\n")
    _truncate_log(log, 3)
    kept = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("step") for r in kept] == [1, 2, 3, None]  # (a record without a step is step 0: kept)
    assert not (tmp_path / "log.jsonl.tmp").exists()


def test_ckpt_step_of_a_checkpoint_with_a_bad_step_is_none(tmp_path):
    from lorakit.train.loop import CHECKPOINT, ckpt_step

    assert ckpt_step(tmp_path) is None  # no checkpoint
    ckpt = tmp_path / CHECKPOINT
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 7}))
    assert ckpt_step(tmp_path) == 7
    for bad in ({"step": "seven"}, {"step": None}, {}, {"step": "12"}, {"step": 3.9}, {"step": True}, {"step": -1}):
        (ckpt / "trainer_state.json").write_text(json.dumps(bad))
        assert ckpt_step(tmp_path) is None
    (ckpt / "trainer_state.json").write_text('{"step": Infinity}')  # (int() raised OverflowError, uncaught)
    assert ckpt_step(tmp_path) is None


# ------------------------------------------------------------------ checkpoint of another rank (loop.py 374)
def _resumable(r, v_rank=None):
    from conftest import tiny_llama

    import lorakit as lk

    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=r, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": v_rank or r}))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved(tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import save_checkpoint

    model, opt, sched = _resumable(4)
    for p in opt.param_groups[0]["params"]:  # (one step: other values than a fresh model of the same seed
        p.grad = torch.ones_like(p)           # has, an optimizer state and a later learning rate)
    opt.step()
    sched.step()
    return save_checkpoint(tmp_path, model, opt, sched, {"step": 1, "world_size": 1, "tokens": 10, "train_seconds": 1.0,
                                                        "epoch": 0, "micro_batch": 1}, TrainConfig(rank=4))


@pytest.mark.parametrize("v_rank", [None, 2], ids=["every-tensor", "a-later-tensor"])
def test_resuming_into_a_model_of_another_rank_names_the_tensor_and_changes_nothing(tmp_path, v_rank):
    """Before, the tensors before the first that did not fit were copied in already."""
    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    other, opt, sched = _resumable(2 if v_rank is None else 4, v_rank)
    before, lr = _trainable(other), sched.get_last_lr()
    with pytest.raises(ValueError, match=r"lora_A.*has shape \[4, 32\], the model expects \[2, 32\]"):
        load_checkpoint(ckpt, other, opt, sched)
    after = _trainable(other)
    assert all(torch.equal(after[n], before[n]) for n in before) and not opt.state and sched.get_last_lr() == lr


@pytest.mark.parametrize("name, content", [
    ("optimizer.pt", b"not a torch file"),
    ("scheduler.pt", "not a scheduler state"),  # (read, then refused by the scheduler after the optimizer took its own)
    ("rng.pt", {"cpu": "no 'torch' key"}),
    ("rng.pt", {"torch": torch.zeros(3)}),  # (refused by set_rng_state, which came last)
])
def test_a_checkpoint_with_an_unusable_file_changes_nothing(tmp_path, name, content):
    """Found by a review (/tmp/review19): the RNG state was checked only as it was set, after the
    parameters and optimizer were restored, and a scheduler refusal came after the optimizer's load."""
    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    if isinstance(content, bytes):
        (ckpt / name).write_bytes(content)
    else:
        torch.save(content, ckpt / name)
    model, opt, sched = _resumable(4)
    before, lr, rng = _trainable(model), sched.get_last_lr(), torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"is unreadable: {name}"):
        load_checkpoint(ckpt, model, opt, sched)
    after = _trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before) and not opt.state
    assert sched.get_last_lr() == lr and opt.param_groups[0]["lr"] == lr[0] and torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------ Ctrl-C in a command (cli.py 63)
def test_ctrl_c_during_a_command_prints_interrupted_and_exits_130(monkeypatch, capsys):
    import lorakit.train.cli as train_cli

    def pressed(args):
        print("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "cmd_cache", pressed)  # (the parser is built by main, after this)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["cache"]) == 130
        assert torch.get_num_threads() == 1  # the caller's thread count is given back
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert out == "partial\n" and err == "\ninterrupted\n"


# ------------------------------------------------------------------ a later torchrun process (loop.py 1177)
class _LaterProcess:
    """Rank 1 of 2; ``broadcast_object`` hands it what rank 0 sent."""

    def __init__(self, sent):
        self.world, self.rank, self.main, self.sent = 2, 1, False, sent

    def broadcast_object(self, obj):
        assert obj is None  # a later process sends nothing
        return self.sent


def test_a_later_process_raises_the_first_ones_refusal_and_creates_nothing(tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import _claim_run_dir_once

    cfg = TrainConfig(output=str(tmp_path / "taken"))
    message = f"output directory {str(tmp_path / 'taken')!r} already holds files"
    with pytest.raises(FileExistsError) as info:
        _claim_run_dir_once(tmp_path / "taken", cfg, _LaterProcess((True, message)))
    assert str(info.value) == message
    where = str(tmp_path / "runs" / "x-1")
    assert _claim_run_dir_once(tmp_path / "taken", cfg, _LaterProcess((False, where))) == (Path(where), False)
    assert list(tmp_path.iterdir()) == []  # only the first process writes


# ------------------------------------------------------------------ analysis weights (weights.py 90-112, 231)
def test_model_weights_lookup_refuses_what_it_cannot_read(tmp_path):
    from safetensors.torch import save_file

    from lorakit.analysis.weights import load_config, safetensors_files

    with pytest.raises(FileNotFoundError, match="does not exist"):
        safetensors_files(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no safetensors weights in"):
        safetensors_files(empty)
    with pytest.raises(FileNotFoundError, match="no config.json next to model"):
        load_config(empty)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": 3}}))
    with pytest.raises(ValueError, match="'weight_map' must map tensor names to file names"):
        safetensors_files(sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "b.safetensors",
                                                                                    "c": "a.safetensors"}}))
    for name in ("a", "b"):
        save_file({name: torch.zeros(1)}, str(sharded / f"{name}.safetensors"))
    save_file({"x": torch.zeros(1)}, str(sharded / "adapter_model.safetensors"))  # not one of the model's files
    assert safetensors_files(sharded) == [sharded / "a.safetensors", sharded / "b.safetensors"]
    one = tmp_path / "one.safetensors"
    save_file({"w": torch.zeros(2)}, str(one))
    assert safetensors_files(one) == [one]  # a single file given directly
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_config(one) == {"model_type": "llama"}  # the config beside a file


# ------------------------------------------------------------------ generate on a full fine-tune run (generate.py 581-585)
@pytest.mark.parametrize("extra, message", [
    (["--merge"], "is a full fine-tune (its model/ holds every weight), there is no adapter to merge"),
    (["--model", "some/base"], "is a full fine-tune (its model/ holds the whole model), so it takes no --model"),
])
def test_generate_refuses_merge_or_a_base_for_a_full_fine_tune_run(tmp_path, capsys, extra, message):
    run = tmp_path / "full-run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["generate", "--adapter", str(run), *extra, "hello"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------ chat: Ctrl-C during a reply (generate.py 659, 681-683)
def test_ctrl_c_during_a_chat_reply_drops_that_message_and_keeps_the_session(monkeypatch):
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    import lorakit.train.generate as gen
    from lorakit.train.data import encode_prompt

    tok = tiny_tokenizer()
    model = tiny_llama_lm(tok)
    prompts = []

    def fake_generate(model, tokenizer, ids, max_new_tokens, precision, stop_ids=None):
        prompts.append(list(ids[0]))
        if len(prompts) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply is being generated
        return [" great "]

    monkeypatch.setattr(gen, "greedy_generate", fake_generate)
    lines = iter(["bad film", "   ", "good film", "/exit"])
    out = []
    assert gen.chat_loop(model, tok, 4, "fp32", read=lambda _: next(lines), write=out.append) == 0
    assert "\n(interrupted)" in out and out[-1] == "model> great"
    # the interrupted message left the history: the second prompt is the second message alone
    assert prompts[1] == encode_prompt(tok, [{"role": "user", "content": "good film"}])
    assert len(prompts) == 2  # the blank line was not sent


# ------------------------------------------------------------------ evaluation shared over processes (loop.py 234-242)
class _TwoProcesses:
    """Rank ``rank`` of 2: ``share`` deals out every 2nd example; ``gather_objects`` returns this
    process's part in its place and ``other`` in the other's."""

    def __init__(self, rank, other):
        self.world, self.rank, self.other = 2, rank, other

    def share(self, items):
        return items[self.rank::2]

    def gather_objects(self, part):
        return [part, self.other] if self.rank == 0 else [self.other, part]


def _part(examples, loss, correct):
    return {"loss": loss, "n_labels": 2 * len(examples), "n": len(examples), "n_generated": len(examples),
            "predictions": [{"example": i, "correct": c} for i, c in enumerate(correct)]}


def test_a_process_whose_share_has_nothing_to_score_takes_the_others_result(monkeypatch):
    from lorakit.train import loop
    from lorakit.train.generate import NothingToScore

    def evaluate(model, tokenizer, share, *args):
        raise NothingToScore("eval data: nothing to score")  # (this process's share: answers cut off)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    other = _part(["b", "d"], 0.5, [True, False])  # rank 1 scored examples 1 and 3
    result = loop.evaluate_shared(_TwoProcesses(0, other), None, None, ["a", "b", "c", "d"], 64, 2, "fp32")
    assert result["loss"] == 0.5 and result["n"] == 2 and result["n_dropped"] == 2
    assert [q["example"] for q in result["predictions"]] == [1, 3] and result["accuracy"] == 0.5


def test_shares_are_combined_weighted_by_their_labels_and_in_the_examples_order(monkeypatch):
    from lorakit.train import loop

    monkeypatch.setattr(loop, "evaluate", lambda model, tok, share, *a: _part(share, 1.0, [True] * len(share)))
    other = _part(["b"], 4.0, [False])  # rank 1: example 1 (2 labels, loss 4); rank 0: examples 0 and 2 (4 labels)
    result = loop.evaluate_shared(_TwoProcesses(0, other), None, None, ["a", "b", "c"], 64, 2, "fp32")
    assert result["loss"] == (1.0 * 4 + 4.0 * 2) / 6 and result["n_labels"] == 6
    assert [(q["example"], q["correct"]) for q in result["predictions"]] == [(0, True), (1, False), (2, True)]


def test_when_no_share_has_anything_to_score_every_process_raises(monkeypatch):
    from lorakit.train import loop
    from lorakit.train.generate import NothingToScore

    def evaluate(model, tokenizer, share, *args):
        raise NothingToScore("eval data: every answer was cut off")
    monkeypatch.setattr(loop, "evaluate", evaluate)
    for rank in (0, 1):
        with pytest.raises(NothingToScore, match="every answer was cut off"):
            loop.evaluate_shared(_TwoProcesses(rank, None), None, None, ["a", "b"], 64, 2, "fp32")


@pytest.mark.parametrize("moment, shape", [(lambda m: torch.zeros(8, 32), "8, 32"),
                                           (lambda m: m.T.contiguous(), "32, 4")])  # (as many values: round 14's l5)
def test_an_optimizer_state_of_another_rank_is_refused_before_anything_changes(tmp_path, moment, shape):
    """optimizer.load_state_dict takes moments of the wrong shape, and the first step failed on them
    (a review, /tmp/review20)."""
    from lorakit.train.loop import load_checkpoint

    ckpt = _saved(tmp_path)
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg"] = moment(state["state"][0]["exp_avg"])
    torch.save(state, ckpt / "optimizer.pt")
    model, opt, sched = _resumable(4)
    before = _trainable(model)
    with pytest.raises(ValueError, match=rf"optimizer.pt: exp_avg of parameter 0 has shape \[{shape}\], the parameter \[4, 32\]"):
        load_checkpoint(ckpt, model, opt, sched)
    after = _trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before) and not opt.state
