"""The training loop on tiny in-process models: learning, exact resume, divergence, Ctrl-C, formats."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit.train.loop as loop
from lorakit.train.config import TrainConfig
from lorakit.train.data import collate, parse_record, tokenize_example
from lorakit.train.generate import loss_sum
from lorakit.train.loop import (NonFiniteLossError, SimulatedKill, ckpt_step, find_checkpoint, lr_factor,
                                plan_steps, results_table, step_micro_batches, train)
from tiny_lm import one_thread, tiny_gpt2_lm, tiny_llama_lm, tiny_tokenizer, toy_records, write_jsonl


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(toy_records(96), d / "train.jsonl"), write_jsonl(toy_records(24, seed=1), d / "eval.jsonl")


def _cfg(tmp_path, data_files, name="run", **kw):
    base = dict(data=str(data_files[0]), output=str(tmp_path / name), batch_size=8, lr=1e-2, precision="fp32",
                max_steps=10, save_steps=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*_a):
    pass


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("factory", [tiny_llama_lm, tiny_gpt2_lm], ids=["llama", "gpt2"])
def test_label_positions_loss_equals_plain_path(tok, factory):
    model = factory(tok).eval()
    ex = [parse_record(r, "x") for r in toy_records(4)]
    ex.append(parse_record({"text": "a good film and a very dull plot"}, "x"))
    batch = collate([tokenize_example(tok, e, 64) for e in ex], tok.pad_token_id)
    with torch.no_grad():
        fast, n = loss_sum(model, batch)
        slow, n2 = loss_sum(model, batch, label_positions_only=False)
        hf = model(**batch).loss  # transformers' own mean over the shifted labels
    assert n == n2 == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast / n, hf, rtol=1e-5, atol=1e-5)


def test_a_model_that_scales_its_logits_is_trained_on_its_own_logits(tok):
    """Granite divides its logits by config.logits_scaling, which the label-position path (head on
    the backbone's hidden states) left out: loss 4.99 instead of 3.96, adapter gradients 3.4x off
    (a model-zoo audit). A probe forward now finds any post-processing of the logits; the plain
    Llama keeps the fast path, and the training step's mode is given back."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from lorakit.train.generate import _head_parts

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        initializer_range=0.2, logits_scaling=4.0, pad_token_id=tok.pad_token_id)
    granite = GraniteForCausalLM(cfg).train()
    batch = collate([tokenize_example(tok, parse_record(r, "x"), 64) for r in toy_records(4)], tok.pad_token_id)
    assert _head_parts(granite) is None and granite.training and all(m.training for m in granite.modules())
    granite.eval()
    with torch.no_grad():
        got, n = loss_sum(granite, batch)
        want = granite(**batch).loss
    torch.testing.assert_close(got / n, want, rtol=1e-5, atol=1e-5)
    assert _head_parts(tiny_llama_lm(tok)) is not None


def test_the_training_loss_keeps_float64_on_a_float64_model(tok):
    """loss_sum rounded a float64 model's loss to float32 (a ~1e-8 error in every float64 gradient)."""
    import torch.nn.functional as F

    model = tiny_llama_lm(tok).double().eval()
    batch = collate([tokenize_example(tok, parse_record(r, "x"), 64) for r in toy_records(4)], tok.pad_token_id)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        exact = F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum")
        for positions_only in (True, False):
            got, _ = loss_sum(model, batch, label_positions_only=positions_only)
            assert got.dtype == torch.float64
            assert abs(float(got) - float(exact)) <= 1e-12 * abs(float(exact)), positions_only


def test_weight_decay_spares_1d_tensors_with_and_without_loraplus(tmp_path, tok, data_files):
    """DoRA's magnitudes (column norms) were decayed by plain AdamW but not in the LoRA+ groups: a run
    with --weight-decay 0.5 gave other adapters with LoRA+ at ratio 1 (the same rates) than without."""
    def adapter(name, **kw):
        train(_cfg(tmp_path, data_files, name=name, max_steps=6, use_dora=True, weight_decay=0.5, **kw),
              model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        return load_file(tmp_path / name / "adapter_model.safetensors")

    plain, plus = adapter("plain"), adapter("plus", lora_plus_ratio=1.0)
    assert any("magnitude" in k for k in plain)
    assert plain.keys() == plus.keys() and all(torch.equal(plain[k], plus[k]) for k in plain)


def test_a_model_given_in_process_is_recorded_by_its_own_name(tmp_path, tok, data_files):
    """train(model=...) without cfg.model recorded the embedded SmolLM2 as the adapter's base."""
    model = tiny_llama_lm(tok)
    model.config._name_or_path = str(tmp_path / "my-base")
    train(_cfg(tmp_path, data_files, max_steps=1), model=model, tokenizer=tok, progress=False, log=_quiet)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "my-base")
    assert json.loads((tmp_path / "run" / "lorakit_run.json").read_text())["model"] == str(tmp_path / "my-base")


def test_a_run_of_a_nameless_in_process_model_asks_inference_for_the_base(tmp_path, tok, data_files):
    """With no name to record, inference loaded the embedded SmolLM2 under the adapter."""
    from lorakit.train.generate import load_for_inference

    model = tiny_llama_lm(tok)
    model.config._name_or_path = ""
    train(_cfg(tmp_path, data_files, max_steps=1), model=model, tokenizer=tok, progress=False, log=_quiet)
    assert json.loads((tmp_path / "run" / "lorakit_run.json").read_text())["model_in_process"] is True
    with pytest.raises(ValueError, match="given to train\\(\\) in-process.*give its base with --model"):
        load_for_inference(None, str(tmp_path / "run"))


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    # the first step already moves (1/11 of the peak), the peak comes at the first step after warm-up
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == 1.0
    assert lr_factor(0, 100, 0) == 1.0
    assert f[0] < f[5] < f[9] <= 1.0
    assert max(f) == pytest.approx(1.0, abs=0.02)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.01
    cfg = TrainConfig(batch_size=8, grad_accum=2, max_steps=0, epochs=2)
    assert plan_steps(cfg, 100) == (13, 13)


def test_an_epoch_run_ends_with_its_epochs_under_gradient_accumulation(tmp_path, tok, data_files):
    """--epochs 1 with --grad-accum 4 over 14 micro-batches: 4 steps, the last of 2 micro-batches, and
    every example seen once (the same tokens as without accumulation); --max-steps runs still wrap."""
    cfg = TrainConfig(batch_size=7, grad_accum=4, max_steps=0, epochs=1)
    assert plan_steps(cfg, 96) == (14, 4)
    assert [list(step_micro_batches(cfg, s, 14)) for s in range(4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert list(step_micro_batches(TrainConfig(batch_size=7, grad_accum=4, max_steps=4), 3, 14)) == [12, 13, 14, 15]
    assert list(step_micro_batches(TrainConfig(grad_accum=4, max_steps=0, epochs=0.5), 0, 3)) == [0, 1]

    def tokens(name, accum):
        train(_cfg(tmp_path, data_files, name=name, batch_size=7, grad_accum=accum, max_steps=0, epochs=1),
              model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert {r["epoch"] for r in rows} == {0}
        return len(rows), sum(r["tokens"] for r in rows)
    steps4, tokens4 = tokens("accum4", 4)
    steps1, tokens1 = tokens("accum1", 1)
    assert (steps4, steps1) == (4, 14) and tokens4 == tokens1


def test_the_results_table_counts_the_examples_a_step_really_takes(tmp_path, tok):
    """A 3-example training set with --batch-size 8 --grad-accum 2: each step takes the 3, not 16."""
    small = write_jsonl(toy_records(3), tmp_path / "three.jsonl")
    cfg = _cfg(tmp_path, (small,), batch_size=8, grad_accum=2, max_steps=2, eval_data=str(small))
    result = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert result.train_examples == 3
    assert "2 x 3 examples" in results_table(result, cfg)
    result.train_examples = 40
    assert "2 x 16 examples" in results_table(result, cfg)


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("factory", [tiny_llama_lm, tiny_gpt2_lm], ids=["llama", "gpt2"])
def test_lora_loss_goes_down_and_accuracy_rises(tmp_path, tok, data_files, factory):
    cfg = _cfg(tmp_path, data_files, eval_data=str(data_files[1]), max_steps=30)
    res = train(cfg, model=factory(tok), tokenizer=tok, progress=False, log=_quiet)
    assert len(res.losses) == 30
    assert sum(res.losses[-5:]) / 5 < 0.5 * sum(res.losses[:5]) / 5
    assert res.after["loss"] < 0.5 * res.before["loss"]
    assert res.after["accuracy"] > res.before["accuracy"]
    run = res.run_dir
    # PEFT-format adapter, step log, loss curve, run info; the checkpoint is gone after success.
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_s"} <= set(log[0]) and log[0]["step_s"] > 0
    assert (run / "loss.png").stat().st_size > 1000
    info = json.loads((run / "lorakit_run.json").read_text())
    assert info["finished"] and info["after"]["accuracy"] == res.after["accuracy"]
    assert not (run / "checkpoint").exists()
    trainable = sum(p.numel() for p in load_file(str(run / "adapter_model.safetensors")).values())
    assert res.trainable_params == trainable < res.total_params


@pytest.mark.parametrize("factory", [tiny_llama_lm, tiny_gpt2_lm], ids=["llama", "gpt2"])
def test_bf16_training_uses_lorakit_attention_and_restores_sdpa(tmp_path, tok, data_files, factory, monkeypatch):
    from lorakit.ops.attention import ShortAttention

    calls = []
    real = ShortAttention.apply
    monkeypatch.setattr(ShortAttention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    model = factory(tok)
    for module in model.modules():  # GPT-2's attention dropout (0.1) would send it to SDPA
        if hasattr(module, "attn_dropout"):
            module.attn_dropout.p = 0.0
    cfg = _cfg(tmp_path, data_files, eval_data=str(data_files[1]), max_steps=20, precision="bf16")
    res = train(cfg, model=model, tokenizer=tok, progress=False, log=_quiet)
    assert calls and set(calls) == {torch.bfloat16}  # the short-sequence path ran in training
    assert model.config._attn_implementation == "sdpa"  # and the model is handed back on SDPA
    assert sum(res.losses[-5:]) / 5 < 0.7 * sum(res.losses[:5]) / 5


def test_a_failing_run_still_hands_the_model_back_on_sdpa(tmp_path, tok, data_files):
    def boom(step, loss):
        raise RuntimeError("stop here")

    model = tiny_llama_lm(tok)
    cfg = _cfg(tmp_path, data_files, max_steps=3, precision="bf16")
    with pytest.raises(RuntimeError, match="stop here"):
        train(cfg, model=model, tokenizer=tok, progress=False, on_step=boom, log=_quiet)
    assert model.config._attn_implementation == "sdpa"


def test_a_failing_run_removes_its_lora_so_a_retry_on_the_same_model_trains(tmp_path, tok, data_files):
    # the model came back with the adapter, 9 patched forwards and use_cache off: a retry said
    # "adapter 'default' already exists"; a finished run also left the training kernels patched in
    import lorakit as lk

    def boom(step, loss):
        raise RuntimeError("stop here")

    def patched(m):
        return sum("forward" in mod.__dict__ for mod in m.modules())

    model = tiny_llama_lm(tok)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop here"):
        train(_cfg(tmp_path, data_files, max_steps=3, threads=1), model=model, tokenizer=tok, progress=False,
              on_step=boom, log=_quiet)
    assert not any(isinstance(m, lk.LoraLayer) for m in model.modules()) and "_lorakit" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.config.use_cache is True and patched(model) == 0
    assert torch.get_num_threads() == threads  # (threads=1 is the run's own)
    res = train(_cfg(tmp_path, data_files, name="retry", max_steps=2), model=model, tokenizer=tok, progress=False,
                log=_quiet)
    assert res.steps == 2 and patched(model) == 0
    assert any(isinstance(m, lk.LoraLayer) for m in model.modules())  # (a finished run keeps its trained adapter)


def test_training_leaves_a_model_already_on_lorakit_attention_as_it_was(tmp_path, tok, data_files):
    from lorakit.ops.attention import use_lorakit_attention

    model = tiny_llama_lm(tok)
    assert use_lorakit_attention(model)
    cfg = _cfg(tmp_path, data_files, max_steps=2, precision="bf16")
    train(cfg, model=model, tokenizer=tok, progress=False, log=_quiet)
    assert model.config._attn_implementation == "lorakit"


def test_full_finetune_baseline_saves_a_model(tmp_path, tok, data_files):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, data_files, method="full", lr=5e-3, max_steps=15)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.trainable_params == res.total_params
    assert res.losses[-1] < res.losses[0]
    loaded = AutoModelForCausalLM.from_pretrained(res.run_dir / "model")
    assert loaded.config.vocab_size == len(tok)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_and_accumulation_match(tmp_path, tok, data_files, dropout):
    """Checkpointing changes nothing (with dropout too: the recomputed forward draws the same masks);
    accumulation: the next test."""
    a = train(_cfg(tmp_path, data_files, "a", max_steps=3, dropout=dropout), model=tiny_llama_lm(tok), tokenizer=tok,
              progress=False, log=_quiet)
    b = train(_cfg(tmp_path, data_files, "b", max_steps=3, dropout=dropout, gradient_checkpointing=True),
              model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    wa = load_file(str(a.run_dir / "adapter_model.safetensors"))
    wb = load_file(str(b.run_dir / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_given_model_comes_back_with_its_cache_and_checkpointing_settings(tmp_path, tok, data_files,
                                                                            checkpointing):
    """The run turns the KV cache off (and checkpointing on, if asked) for training; the caller's
    model came back with checkpointing still on (an audit of what a run leaves on the model)."""
    from lorakit.models import checkpointing_on

    model = tiny_llama_lm(tok)
    assert model.config.use_cache and not checkpointing_on(model)
    train(_cfg(tmp_path, data_files, max_steps=2, gradient_checkpointing=checkpointing), model=model,
          tokenizer=tok, progress=False, log=_quiet)
    assert model.config.use_cache is True and not checkpointing_on(model)


@pytest.mark.parametrize("data_kind", ["prompt-completion", "text"])
def test_two_accumulated_micro_batches_of_4_equal_one_batch_of_8(tmp_path, tok, data_kind):
    # (the docs said "tested" of the test above, which compared checkpointing only): 8 examples, so
    # every step sees all of them either way; the loss is a mean over the whole step's labels
    records = toy_records(8) if data_kind == "prompt-completion" else [
        {"text": f"film {i} was {'a good' if i % 2 else 'a very dull'} one"} for i in range(8)]
    data = write_jsonl(records, tmp_path / "d.jsonl")
    runs = []
    for name, batch, accum in (("one", 8, 1), ("two", 4, 2)):
        cfg = TrainConfig(data=str(data), output=str(tmp_path / name), batch_size=batch, grad_accum=accum, lr=1e-2,
                          precision="fp32", max_steps=3, save_steps=0, seed=0)
        runs.append(train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet))
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    wa, wb = (load_file(str(r.run_dir / "adapter_model.safetensors")) for r in runs)
    for k in wa:
        # (the two sum their gradients in another order; AdamW's normalised step makes an element with
        # a near-zero gradient move by up to ~1e-5 of an lr-1e-2 step on some CPUs: 2.7e-6 was seen.
        # A missing or doubled division by the accumulation steps is ~1e-2 off)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- resume
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, tok, data_files):
    kw = dict(max_steps=9, save_steps=3, dropout=0.1, batch_size=16)  # 96/16 = 6 batches: crosses an epoch
    full = train(_cfg(tmp_path, data_files, "full", **kw), model=tiny_llama_lm(tok), tokenizer=tok,
                 progress=False, log=_quiet)

    def kill_at_5(step, _loss):
        if step == 5:
            raise SimulatedKill  # like SIGKILL: no cleanup, steps 4-5 are lost
    cfg = _cfg(tmp_path, data_files, "killed", **kw)
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=kill_at_5, log=_quiet)
    ckpt = find_checkpoint(cfg_dir := tmp_path / "killed")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    # Checkpoint files are plain tensors: they load without unpickling arbitrary objects.
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert (ckpt / "adapter" / "adapter_config.json").is_file()

    messages = []
    resumed = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=messages.append)
    assert any("resumed" in m and "step 3" in m for m in messages)
    assert resumed.steps == 9
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    wf = load_file(str(full.run_dir / "adapter_model.safetensors"))
    wr = load_file(str(cfg_dir / "adapter_model.safetensors"))
    assert wf.keys() == wr.keys()
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], rtol=1e-5, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (cfg_dir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # the lost steps 4-5 were dropped from the log, then redone


def test_resume_falls_back_to_previous_checkpoint(tmp_path, tok, data_files):
    """A kill between the checkpoint renames leaves only .checkpoint-old: still resumable."""
    cfg = _cfg(tmp_path, data_files, max_steps=4, save_steps=2)

    def kill(step, _loss):
        if step == 3:
            raise SimulatedKill
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=kill, log=_quiet)
    run = tmp_path / "run"
    os.rename(run / "checkpoint", run / ".checkpoint-old")
    assert find_checkpoint(run) == run / ".checkpoint-old"
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 4


def test_resume_and_output_errors(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    with pytest.raises(ValueError, match="already finished"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


# ----------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tok, data_files):
    model = tiny_llama_lm(tok)

    def poison(step, _loss):
        if step == 4:  # after the step-4 checkpoint is written
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    cfg = _cfg(tmp_path, data_files, max_steps=8, save_steps=2)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, model=model, tokenizer=tok, progress=False, on_step=poison, log=_quiet)
    msg = str(info.value)
    assert "non-finite loss at step 5" in msg and "step 4" in msg
    ckpt = find_checkpoint(tmp_path / "run")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_diverged_run_without_checkpoint_keeps_its_log(tmp_path, tok, data_files):
    """A failed new run removes what it wrote, except when it diverged: log.jsonl shows how."""
    model = tiny_llama_lm(tok)

    def poison(step, _loss):
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        train(_cfg(tmp_path, data_files, max_steps=4, save_steps=0), model=model, tokenizer=tok, progress=False,
              on_step=poison, log=_quiet)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]


def test_ctrl_c_saves_checkpoint_and_resumes(tmp_path, tok, data_files):
    def ctrl_c(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step finishes
    cfg = _cfg(tmp_path, data_files, max_steps=5)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    assert res.interrupted and res.steps == 2
    ckpt = find_checkpoint(tmp_path / "run")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 5 and not res.interrupted


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, tok, data_files):
    """A background job of a shell script starts with SIGINT ignored, so that a Ctrl-C at the terminal
    does not reach it: the run must not take the signal over (it stopped after the step instead)."""
    seen = []

    def ctrl_c(step, _loss):
        seen.append(signal.getsignal(signal.SIGINT))
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        res = train(_cfg(tmp_path, data_files, max_steps=4), model=tiny_llama_lm(tok), tokenizer=tok,
                    progress=False, on_step=ctrl_c, log=_quiet)
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old)
    assert not res.interrupted and res.steps == 4
    assert seen == [signal.SIG_IGN] * 4 and after is signal.SIG_IGN


def test_a_checkpoint_records_its_data_position_in_micro_batches(tmp_path, tok, data_files):
    # 96 examples in batches of 8: 12 micro-batches an epoch; 3 steps of 5 accumulated micro-batches
    # end in epoch 1 at micro-batch 3 (the record said epoch 0, micro-batch 3: steps, not micro-batches)
    def ctrl_c(step, _loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    cfg = _cfg(tmp_path, data_files, max_steps=4, grad_accum=5)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    state = json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["micro_batch"]) == (3, 1, 3)
    said = []
    train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=said.append)
    assert any("at step 3/4 (epoch 1, micro-batch 3)" in line for line in said)


def test_ctrl_c_while_the_last_steps_checkpoint_is_written_keeps_the_run(tmp_path, tok, data_files, monkeypatch):
    # the loop's handler was removed before the checkpoint after the last step: a Ctrl-C there raised
    # KeyboardInterrupt, and the clean-up of a run without a checkpoint deleted the finished run
    import lorakit.train.loop as loop

    real = loop.save_checkpoint

    def ctrl_c_during_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", ctrl_c_during_save)
    cfg = _cfg(tmp_path, data_files, max_steps=4)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.interrupted and res.steps == 4
    assert json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(loop, "save_checkpoint", real)
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 4 and not res.interrupted and (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_a_checkpoint_that_cannot_be_written_is_an_os_error_naming_the_run(tmp_path, tok, data_files, monkeypatch):
    # a full disk: torch.save's zip writer raises RuntimeError ("unexpected pos"), safetensors its
    # SafetensorError; the command line printed a traceback (it turns OSErrors into one line)
    cfg = _cfg(tmp_path, data_files, max_steps=4, save_steps=2)
    real, calls = torch.save, []

    def full_after_first_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # (one checkpoint writes three .pt files)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 512")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_first_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(OSError, match=f"could not write into {re.escape(repr(str(run)))} .*unexpected pos.*disk full"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    state = json.loads((find_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 2 and not list(run.glob(".checkpoint-tmp-*"))  # the last good one kept, no debris
    monkeypatch.setattr(torch, "save", real)
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 4 and not res.interrupted


@pytest.mark.parametrize("init", ["pissa_niter_2", "olora"])
def test_a_checkpoints_adapter_is_exported_like_the_final_one(tmp_path, tok, data_files, init):
    """A PiSSA / OLoRA run's checkpoint/adapter is the plain LoRA against the original base (as the final
    adapter is): it saves without the residual-base warning and loads onto a fresh base to the trained model."""
    import warnings

    import torch

    import lorakit as lk

    def ctrl_c(step, _loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    model = tiny_llama_lm(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unconverted save warned here at every checkpoint
        res = train(_cfg(tmp_path, data_files, max_steps=6, init=init), model=model, tokenizer=tok,
                    progress=False, on_step=ctrl_c, log=_quiet)
    assert res.interrupted and res.steps == 3
    adapter = find_checkpoint(tmp_path / "run") / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * 8
    ids = torch.randint(4, len(tok), (2, 9))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = lk.load_adapter(tiny_llama_lm(tok), adapter)(input_ids=ids).logits
        base = tiny_llama_lm(tok)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # training moved the model: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_data_fails_before_training(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\n')
    cfg = TrainConfig(data=str(bad), output=str(tmp_path / "run"), precision="fp32")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'prompt' must be a string"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert not (tmp_path / "run").exists()


def test_failed_new_run_removes_what_it_wrote_and_can_be_rerun(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, eval_data=str(data_files[1]), max_steps=2, target_modules="nosuchmod")
    with pytest.raises(ValueError, match="nosuchmod"):  # fails after train_config.yaml and eval.jsonl are written
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert not (tmp_path / "run").exists()
    res = train(cfg.updated(target_modules="q_proj"), model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
                log=_quiet)
    assert res.steps == 2
    # an empty directory made beforehand is kept, and left empty
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nosuchmod"):
        train(cfg.updated(output=str(tmp_path / "empty")), model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
              log=_quiet)
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def test_ctrl_c_during_the_first_evaluation_leaves_no_run_behind(tmp_path, tok, data_files, monkeypatch):
    import lorakit.train.loop as loop

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "evaluate", interrupted)
    cfg = _cfg(tmp_path, data_files, eval_data=str(data_files[1]), max_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert not (tmp_path / "run").exists()


def test_second_ctrl_c_before_any_checkpoint_does_not_point_to_resume(tmp_path, tok, data_files):
    def ctrl_c(step, _loss):
        raise KeyboardInterrupt  # what a second Ctrl-C raises mid-step
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, data_files, max_steps=4), model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
              on_step=ctrl_c, log=messages.append)
    assert any("before the first checkpoint" in m for m in messages)
    assert not any("--resume" in m for m in messages) and not (tmp_path / "run").exists()


def test_failure_after_a_checkpoint_keeps_the_run_resumable(tmp_path, tok, data_files):
    def boom(step, _loss):
        if step == 3:
            raise RuntimeError("stop here")
    cfg = _cfg(tmp_path, data_files, max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="stop here"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=boom, log=_quiet)
    assert json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["step"] == 2
    assert train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet).steps == 4


def test_killed_before_the_first_checkpoint_says_how_to_start_again(tmp_path, tok, data_files):
    def kill(step, _loss):
        raise SimulatedKill  # like SIGKILL: nothing can clean up
    cfg = _cfg(tmp_path, data_files, max_steps=4)
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=kill, log=_quiet)
    with pytest.raises(FileNotFoundError, match="delete .* start it again without --resume"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_output_that_is_a_file_is_a_clear_error(tmp_path, tok, data_files):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        train(_cfg(tmp_path, data_files), model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert (tmp_path / "run").read_text() == "not a directory"


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "trainer_state.json"])
def test_corrupt_checkpoint_file_is_a_clear_error_and_is_kept(tmp_path, tok, data_files, name):
    def kill(step, _loss):
        if step == 3:
            raise SimulatedKill
    cfg = _cfg(tmp_path, data_files, max_steps=4, save_steps=2)
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=kill, log=_quiet)
    broken = tmp_path / "run" / "checkpoint" / name
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError) as info:
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    msg = str(info.value)
    assert "is unreadable" in msg and name in msg and "start the run again" in msg
    assert broken.is_file() and find_checkpoint(tmp_path / "run") is not None  # nothing deleted


def test_corrupt_run_info_names_the_file(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=2)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    (tmp_path / "run" / "lorakit_run.json").write_text('{"finished": tru')
    with pytest.raises(ValueError, match=r"lorakit_run.json: not valid JSON"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, problem", [
    ("alpha", float("nan"), "alpha must be a finite number"),
    ("alpha", float("inf"), "alpha must be a finite number"),
    ("weight_decay", -5.0, "weight_decay must be >= 0"),
    ("lora_plus_ratio", float("nan"), "lora_plus_ratio must be a finite number"),
    ("epochs", float("inf"), "epochs must be a finite number"),
    ("lr", float("inf"), "lr must be a finite number"),
    ("max_grad_norm", float("nan"), "max_grad_norm must be a finite number"),
    ("init", "bogus", "init must be one of"),
    ("init", "pissa_niter_x", "init must be one of"),
    ("seed", 99999999999999999999, r"seed must be below 2\*\*63"),
    ("target_modules", "q_proj[", "target_modules 'q_proj\\[' is not a valid regex"),
    ("target_modules", " , ", "names no module"),
    ("data", 5, "data must be a string"),
])
def test_config_rejects_bad_values_up_front(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_config_refuses_a_residual_init_on_a_4_bit_base_up_front(init):
    # it was refused only after the model had loaded, pointing to a Python-only remedy
    with pytest.raises(ValueError, match=f"init '{init}' cannot be combined with method 'qlora'"):
        TrainConfig(method="qlora", init=init)
    assert TrainConfig(method="qlora", init="gaussian").init == "gaussian"


def test_config_accepts_every_documented_init_and_a_valid_regex():
    for init in ("default", "gaussian", "pissa", "pissa_niter_4", "olora"):
        assert TrainConfig(init=init).init == init
    assert TrainConfig(target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"


@pytest.mark.parametrize("text, problem", [
    (b"rank: [\n", "is not valid YAML"),
    (b"rank: 8\nlr: 0.001\nrank: 64\n", "is not valid YAML: option 'rank' is given twice at line 3"),  # took 64
    (b"rank: 4\ndata: 5\n", "data must be a string, got 5"),
    (b"data: caf\xe9.jsonl\n", "is not UTF-8 text"),
    (b"max_steps: true\n", "max_steps must be a int, got True"),  # it trained 1 step
    (b"lr: true\n", "lr must be a float, got True"),
    (b"use_rslora: 2\n", "use_rslora must be a bool, got 2"),
])
def test_bad_config_file_names_the_file(tmp_path, text, problem):
    y = tmp_path / "c.yaml"
    y.write_bytes(text)
    with pytest.raises(ValueError) as info:
        TrainConfig.from_yaml(y)
    assert str(y) in str(info.value) and problem in str(info.value)


def test_config_path_that_is_a_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        TrainConfig.from_yaml(tmp_path)


def test_config_yaml_validation_and_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("rank: 4\nlr: 1e-3\nbatch-size: 2\ntarget_modules: [q_proj, v_proj]\nepochs: 2\n")
    cfg = TrainConfig.from_yaml(y)
    assert (cfg.rank, cfg.lr, cfg.batch_size, cfg.target_modules) == (4, 1e-3, 2, "q_proj,v_proj")
    assert cfg.max_steps == 0  # epochs given without max_steps: train for the epochs
    assert TrainConfig().learning_rate == 1e-3 and TrainConfig(method="full").learning_rate == 5e-5
    y.write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="rnak"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="qdora")
    with pytest.raises(ValueError, match="not full"):
        TrainConfig(method="full", use_dora=True)
    with pytest.raises(ValueError, match="lora_plus_ratio"):
        TrainConfig(lora_plus_ratio=-1)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="rank must be a int"):
        TrainConfig.from_dict({"rank": "big"})
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_adapter_loads_in_peft_with_same_outputs(tmp_path, tok, data_files):
    peft = pytest.importorskip("peft")
    from lorakit import load_adapter

    res = train(_cfg(tmp_path, data_files, max_steps=5, target_modules="q_proj,v_proj,gate_proj"),
                model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    ours = load_adapter(tiny_llama_lm(tok), res.run_dir).eval()
    theirs = peft.PeftModel.from_pretrained(tiny_llama_lm(tok), str(res.run_dir)).eval()
    base = tiny_llama_lm(tok).eval()
    with torch.no_grad():
        out_ours, out_peft, out_base = ours(ids).logits, theirs(ids).logits, base(ids).logits
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_ours, out_base, atol=1e-4)  # the adapter learned something
    assert math.isfinite(float(out_ours.sum()))


@pytest.mark.parametrize("steps", [0, 25])
def test_eval_shortcut_gives_the_same_accuracy_as_generating_everything(tmp_path, tok, data_files, steps):
    from lorakit.train.data import read_jsonl
    from lorakit.train.generate import evaluate

    model = tiny_llama_lm(tok)
    if steps:
        train(_cfg(tmp_path, data_files, max_steps=steps), model=model, tokenizer=tok, progress=False, log=_quiet)
    examples = read_jsonl(data_files[1])
    fast = evaluate(model, tok, examples, batch_size=8)
    slow = evaluate(model, tok, examples, batch_size=8, shortcut=False)
    assert slow["n_generated"] == len(examples)
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-5)
    assert fast["accuracy"] == slow["accuracy"]
    assert [p["correct"] for p in fast["predictions"]] == [p["correct"] for p in slow["predictions"]]
    if steps:
        assert fast["accuracy"] > 0.5 and fast["n_generated"] < len(examples)


def test_eval_answers_do_not_depend_on_the_batch_they_are_generated_in(tok):
    # every row of a generation batch got the longest answer's budget: a short answer batched with a
    # long one was graded on extra tokens (accuracy 0.5 at --batch-size 1, 0.0 at 2)
    from lorakit.train.data import parse_record
    from lorakit.train.generate import evaluate

    model = tiny_llama_lm(tok)
    examples = [parse_record({"prompt": f"film {i} was good", "completion": " ".join(["positive"] * (1 + 3 * i))}, "x")
                for i in range(4)]
    alone = evaluate(model, tok, examples, batch_size=1, shortcut=False)
    together = evaluate(model, tok, examples, batch_size=4, shortcut=False)
    assert [p["generated"] for p in together["predictions"]] == [p["generated"] for p in alone["predictions"]]
    lengths = [len(tok(p["generated"], add_special_tokens=False)["input_ids"]) for p in alone["predictions"]]
    assert len(set(lengths)) > 1  # the budgets differ (an untrained model runs to its budget)


def test_eval_loss_of_text_examples_divides_by_the_predicted_tokens(tok):
    # a text example's first token carries a label but is never predicted: evaluate() counted it, so
    # its loss (the before/after table, lorakit eval) was 5-13% below eval_loss's and training's
    from lorakit.train.data import parse_record, tokenize_example
    from lorakit.train.generate import eval_loss, evaluate

    model = tiny_llama_lm(tok)
    examples = [parse_record({"text": "a good film and a very dull plot"}, "t"),
                parse_record({"prompt": "good film", "completion": "positive"}, "p"),
                parse_record({"text": "the acting was fine"}, "t2")]
    got = evaluate(model, tok, examples, batch_size=2)
    data = [tokenize_example(tok, ex, 512) for ex in examples]
    assert got["n_labels"] == sum(t.n_labels for t in data) - 2  # the two text examples' first tokens
    assert got["loss"] == pytest.approx(eval_loss(model, data, 2, tok.pad_token_id, "fp32"), rel=1e-5)


def test_eval_scores_long_prompts_that_fit_and_leaves_cut_answers_out_of_accuracy(tok):
    """(1) A batch whose longest prompt plus the answer slack runs past the model's 128 positions
    (each example fits on its own) stopped the whole evaluation with an error about --max-new-tokens.
    (2) A two-turn example whose last answer max_length cut short was still graded for accuracy."""
    from lorakit.train.data import parse_record
    from lorakit.train.generate import evaluate

    model = tiny_llama_lm(tok)
    long_prompt = " ".join(["good"] * 110)
    examples = [
        parse_record({"prompt": long_prompt, "completion": "positive"}, "long"),
        parse_record({"prompt": "good", "completion": " ".join(["positive"] * 20)}, "long answer"),
    ]
    out = evaluate(model, tok, examples, max_length=128, batch_size=8, shortcut=False)
    assert out["n_accuracy"] == 2 and out["n_generated"] == 2
    two_turns = parse_record({"messages": [
        {"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "and this ?"}, {"role": "assistant", "content": " ".join(["negative"] * 30)}]},
        "two turns")
    full = evaluate(model, tok, [two_turns], max_length=128, shortcut=False)
    cut = evaluate(model, tok, [two_turns], max_length=30, shortcut=False)
    assert full["n_accuracy"] == 1 and cut["n_accuracy"] == 0  # the loss still counts its answer tokens
    assert 0 < cut["n_labels"] < full["n_labels"]


@pytest.mark.parametrize("variant", [
    dict(method="qlora"), dict(use_dora=True), dict(use_rslora=True), dict(init="pissa"), dict(lora_plus_ratio=16.0),
], ids=["qlora", "dora", "rslora", "pissa", "loraplus"])
def test_variants_train_and_save_loadable_adapters(tmp_path, tok, data_files, variant):
    """Every variant flag of `lorakit train` trains (loss falls) and saves an adapter that loads on the original base."""
    import lorakit as lk

    cfg = _cfg(tmp_path, data_files, max_steps=20, **variant)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert sum(res.losses[-5:]) / 5 < 0.7 * sum(res.losses[:5]) / 5
    saved = json.loads((res.run_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] == bool(variant.get("use_dora")) and saved["use_rslora"] == bool(variant.get("use_rslora"))
    fresh = lk.load_adapter(tiny_llama_lm(tok), res.run_dir)
    assert any(isinstance(m, lk.LoraLayer) for m in fresh.modules())


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    import torch

    import lorakit.train.generate as gen

    before = torch.get_num_threads()
    try:
        for busy, expected in ((0.1, 2), (0.9, 1), (1.7, 1), (None, 2)):
            torch.set_num_threads(2)
            monkeypatch.setattr(gen, "busy_cores", lambda window=0.3, b=busy: b)
            assert gen.auto_threads() == expected, busy
        torch.set_num_threads(2)
        assert gen.auto_threads(requested=1) == 1
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_proc_stat():
    from lorakit.train.generate import busy_cores

    value = busy_cores(window=0.05)
    assert value is None or 0.0 <= value <= (__import__("os").cpu_count() or 1) + 1e-6


def test_head_split_used_for_plain_lm_and_not_for_peft_wrapper(tok):
    """The label-positions fast path applies to a plain LM, and falls back for a PEFT-wrapped one."""
    import peft
    import torch

    from lorakit.train.generate import _head_parts, loss_sum

    plain = tiny_llama_lm(tok)
    assert _head_parts(plain) is not None
    wrapped = peft.get_peft_model(tiny_llama_lm(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert _head_parts(wrapped) is None
    ids = torch.randint(4, len(tok), (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():
        a, n = loss_sum(plain, batch)
        b, m = loss_sum(wrapped, batch)  # fresh PEFT adapter: same function as the plain model
    assert n == m and torch.allclose(a, b, atol=1e-4)


def test_optimizer_is_fused_adamw_where_torch_has_it_and_plain_otherwise(tmp_path, tok, data_files, monkeypatch):
    import lorakit.train.loop as loop

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    fused = loop.fused_if_supported(lambda **kw: torch.optim.AdamW(params, lr=1e-3, **kw))
    assert fused.defaults["fused"] is True  # CPU, fp32: torch >= 2.4 has the fused kernel

    def refuses_fused(**kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return torch.optim.AdamW(params, lr=1e-3, **kw)

    assert not loop.fused_if_supported(refuses_fused).defaults.get("fused")
    # the same update as the plain implementation, to rounding
    a = [torch.nn.Parameter(torch.randn(5, 7)) for _ in range(4)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a, opt_b = torch.optim.AdamW(a, lr=1e-2), loop.fused_if_supported(lambda **kw: torch.optim.AdamW(b, lr=1e-2, **kw))
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # and `train` builds its optimizer through it
    made = []
    real = loop.fused_if_supported
    monkeypatch.setattr(loop, "fused_if_supported", lambda make: made.append(real(make)) or made[-1])
    train(_cfg(tmp_path, data_files, max_steps=2), model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert len(made) == 1 and made[0].defaults["fused"] is True


@pytest.mark.parametrize("spec,expected", [
    ("q_proj, v_proj", ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]),
    ("self_attn.q_proj", ["0.q_proj", "1.q_proj"]),           # a dotted name end is a name, not a regex
    ("model.layers.1.self_attn.q_proj", ["1.q_proj"]),
    (r".*\.1\.self_attn\.(q|k)_proj", ["1.k_proj", "1.q_proj"]),  # regex characters make it a regex
])
def test_target_modules_flag_names_and_regexes(tok, spec, expected):
    from lorakit.layers import LoraLayer
    from lorakit.train.loop import prepare_model

    model = prepare_model(tiny_llama_lm(tok), TrainConfig(target_modules=spec, rank=2), "tiny")
    hit = sorted(f"{n.split('.')[2]}.{n.rsplit('.', 1)[-1]}" for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert hit == expected


# ---- run directories: nothing the run did not write is ever removed (found by a loop review) --------

def test_output_with_dot_dot_is_the_directory_it_names(tmp_path, tok, data_files):
    """``sandbox/typo/..`` is ``sandbox``: a non-empty one is refused, not emptied by the clean-up."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "precious.txt").write_text("mine")
    cfg = _cfg(tmp_path, data_files, target_modules="nosuchmod").updated(output=str(sandbox / "typo" / ".."))
    with pytest.raises(FileExistsError, match="already holds files"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert sorted(p.name for p in sandbox.iterdir()) == ["precious.txt"]


def test_clean_up_removes_only_what_the_run_wrote(tmp_path, tok, data_files, monkeypatch):
    """Files that appear in the run directory while the model loads (another process, the user)
    stay when the run then fails; the run's own files go."""
    import lorakit.train.loop as loop

    real = loop.tokenize_all
    run_dir = tmp_path / "run"

    def tokenize_all(*a, **k):  # stands for: someone writes there during the (slow) model load
        (run_dir / "user_notes.txt").write_text("mine")
        return real(*a, **k)
    monkeypatch.setattr(loop, "tokenize_all", tokenize_all)
    with pytest.raises(ValueError, match="nosuchmod"):
        train(_cfg(tmp_path, data_files, eval_data=str(data_files[1]), target_modules="nosuchmod"),
              model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert sorted(p.name for p in run_dir.iterdir()) == ["user_notes.txt"]


def test_two_runs_never_share_a_default_directory(tmp_path, tok, data_files, monkeypatch):
    import lorakit.train.loop as loop

    monkeypatch.setattr(loop, "default_run_dir", lambda cfg: tmp_path / "runs" / "same-second")
    first = train(_cfg(tmp_path, data_files, max_steps=2).updated(output=None), model=tiny_llama_lm(tok),
                  tokenizer=tok, progress=False, log=_quiet)
    second = train(_cfg(tmp_path, data_files, max_steps=3).updated(output=None), model=tiny_llama_lm(tok),
                   tokenizer=tok, progress=False, log=_quiet)
    assert (first.run_dir.name, second.run_dir.name) == ("same-second", "same-second-2")
    assert json.loads((second.run_dir / "lorakit_run.json").read_text())["steps"] == 3
    assert json.loads((first.run_dir / "lorakit_run.json").read_text())["steps"] == 2


def test_a_stop_after_the_loop_leaves_a_resumable_run(tmp_path, tok, data_files, monkeypatch):
    """With no checkpoint during training (save_steps 0), an error in the final phase (here the loss
    plot) still leaves a checkpoint at the last step: --resume finishes the run without training."""
    import lorakit.train.loop as loop

    real = loop.plot_losses
    monkeypatch.setattr(loop, "plot_losses", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    cfg = _cfg(tmp_path, data_files, max_steps=3)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["step"] == 3
    monkeypatch.setattr(loop, "plot_losses", real)
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 3 and find_checkpoint(tmp_path / "run") is None
    with pytest.raises(ValueError, match="already finished"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_finished_run_with_a_leftover_old_checkpoint_is_not_retrained(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=4, save_steps=2)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    (tmp_path / "run" / ".checkpoint-old").mkdir()
    (tmp_path / "run" / ".checkpoint-old" / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(ValueError, match="already finished"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_failing_setup_hands_the_callers_model_back_on_sdpa(tmp_path, tok, data_files):
    model = tiny_llama_lm(tok)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="nosuchmod"):
        train(_cfg(tmp_path, data_files, target_modules="nosuchmod"), model=model, tokenizer=tok, progress=False,
              log=_quiet)
    assert model.config._attn_implementation == "sdpa"


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path, tok, data_files):
    """--max-steps given with --resume: the first resumed step already uses the new plan's rate."""
    cfg, _ = _stopped_at(tmp_path, tok, data_files, 3, warmup_ratio=0.0)
    longer = cfg.updated(max_steps=8)
    train(longer, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())}
    assert lrs[4] == pytest.approx(1e-2 * lr_factor(3, 8, 0))
    assert "max_steps: 8" in (tmp_path / "run" / "train_config.yaml").read_text()  # the run's config now


def test_ctrl_c_on_a_save_step_writes_its_checkpoint_once(tmp_path, tok, data_files, monkeypatch):
    """(It was written twice: by --save-steps, then again as the interrupted run's; for a full
    fine-tune that is the whole model and optimizer twice.)"""
    import lorakit.train.loop as loop

    written = []
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda *a, **k: written.append(1) or save(*a, **k))
    cfg, _ = _stopped_at(tmp_path, tok, data_files, 2, save_steps=2)
    assert len(written) == 1 and ckpt_step(tmp_path / "run") == 2
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 4 and not res.interrupted


@pytest.mark.parametrize("plus", [0.0, 4.0])
def test_resume_with_another_lr_uses_it_from_the_next_step(tmp_path, tok, data_files, plus):
    """--lr given with --resume: the resumed steps run at the new peak's schedule (they ran at the
    saved peak's while train_config.yaml recorded the new one); LoRA+'s B group at ratio x it."""
    cfg, _ = _stopped_at(tmp_path, tok, data_files, 2, warmup_ratio=0.0, lora_plus_ratio=plus)
    train(cfg.updated(lr=0.05), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())}
    assert lrs[2] == pytest.approx(1e-2 * lr_factor(1, 4, 0))
    assert lrs[3] == pytest.approx(0.05 * lr_factor(2, 4, 0)) and lrs[4] == pytest.approx(0.05 * lr_factor(3, 4, 0))
    assert "lr: 0.05" in (tmp_path / "run" / "train_config.yaml").read_text()


def test_resume_with_fewer_steps_than_done_is_refused_and_keeps_the_checkpoint(tmp_path, tok, data_files):
    cfg, _ = _stopped_at(tmp_path, tok, data_files, 3)
    ckpt = find_checkpoint(tmp_path / "run")
    before = (ckpt / "trainer_state.json").read_text(), (tmp_path / "run" / "train_config.yaml").read_text()
    with pytest.raises(ValueError, match="checkpoint is at step 3, past the 2 steps this run now has"):
        train(cfg.updated(max_steps=2), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
              log=_quiet)
    assert find_checkpoint(tmp_path / "run") == ckpt
    assert ((ckpt / "trainer_state.json").read_text(), (tmp_path / "run" / "train_config.yaml").read_text()) == before
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == cfg.max_steps and not res.interrupted


def test_saved_files_have_ordinary_permissions(tmp_path, tok, data_files):
    from lorakit.io import default_mode

    res = train(_cfg(tmp_path, data_files, max_steps=1), model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
                log=_quiet)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (res.run_dir / name).stat().st_mode & 0o777 == default_mode(), name

    def ctrl_c(step, _loss):  # a checkpoint too (mkdtemp made its directory private, safetensors its tensors)
        os.kill(os.getpid(), signal.SIGINT)
    res = train(_cfg(tmp_path, data_files, "run2", max_steps=3), model=tiny_llama_lm(tok), tokenizer=tok,
                progress=False, on_step=ctrl_c, log=_quiet)
    ckpt = find_checkpoint(res.run_dir)
    assert ckpt.stat().st_mode & 0o777 == default_mode(directory=True)
    for path in ckpt.rglob("*"):
        assert path.stat().st_mode & 0o777 == default_mode(directory=path.is_dir()), path


def _gemma_like_tokenizer():
    """Turns end with <end_of_turn>, which is not the tokenizer's eos (<eos>), as in Gemma-it."""
    from tiny_lm import tiny_tokenizer

    template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    tok = tiny_tokenizer(template)
    tok.add_special_tokens({"eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def test_generation_stops_at_the_templates_end_of_turn_token():
    from tiny_lm import tiny_llama_lm

    from lorakit.train.data import encode_prompt
    from lorakit.train.generate import greedy_generate, stop_token_ids

    tok = _gemma_like_tokenizer()
    model = tiny_llama_lm(tok).eval()
    model.resize_token_embeddings(len(tok))
    model.generation_config.eos_token_id = tok.eos_token_id  # the model's own config names only <eos>
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert set(stop_token_ids(model, tok)) >= {tok.eos_token_id, eot}
    script = [tok.convert_tokens_to_ids("positive"), eot]  # then "negative" forever

    def scripted(module, args, out):
        step = module.__dict__.setdefault("_calls", 0)
        module._calls = step + 1
        target = script[step] if step < len(script) else tok.convert_tokens_to_ids("negative")
        out = out.clone()
        out[:, -1, :] = -1e4
        out[:, -1, target] = 1e4
        return out

    model.lm_head.register_forward_hook(scripted)
    prompt = encode_prompt(tok, [{"role": "user", "content": "good film"}])
    assert greedy_generate(model, tok, [prompt], max_new_tokens=6).__getitem__(0).strip() == "positive"


def test_an_end_of_turn_token_that_is_not_special_is_not_in_the_answer():
    """A tokenizer whose end-of-turn is an added but not special token: generation stops there, and
    the answer's text ends before it (it kept the token's text, and evaluation graded 'positive
    <end_of_turn>' wrong against 'positive')."""
    from tokenizers import AddedToken
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    from lorakit.train.data import Example, encode_prompt
    from lorakit.train.generate import evaluate, greedy_generate, stop_token_ids

    template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    tok = tiny_tokenizer(template)
    tok.add_special_tokens({"eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>"]})
    tok.add_tokens([AddedToken("<end_of_turn>", special=False, normalized=False)])
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot not in tok.all_special_ids
    model = tiny_llama_lm(tok).eval()
    model.resize_token_embeddings(len(tok))
    assert eot in stop_token_ids(model, tok)
    positive = tok.convert_tokens_to_ids("positive")

    def scripted(module, args, out):  # "positive" until it is there, then the end of turn
        out = torch.full_like(out, -1e4)
        out[..., positive] = 1e4
        return out

    hook = model.lm_head.register_forward_hook(scripted)
    ids_in = []
    model.register_forward_pre_hook(lambda mod, args, kw: ids_in.append(kw["input_ids"]), with_kwargs=True)

    def then_stop(module, args, out):
        if out.dim() == 3 and ids_in and ids_in[-1][0, -1] == positive:
            out = out.clone()
            out[:, -1, eot] = 2e4
        return out

    model.lm_head.register_forward_hook(then_stop)
    example = Example(messages=[{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}])
    prompt = encode_prompt(tok, example.prompt_messages)
    assert greedy_generate(model, tok, [prompt], 4) == ["positive"]
    assert greedy_generate(model, tok, [prompt], 4, stop_ids=eot) == ["positive"]  # one id, as transformers takes
    result = evaluate(model, tok, [example], 64, 1, shortcut=False)
    assert [p["generated"] for p in result["predictions"]] == ["positive"] and result["accuracy"] == 1.0
    hook.remove()


def test_prompt_longer_than_the_models_positions_is_a_clear_error():
    from tiny_lm import tiny_gpt2_lm, tiny_tokenizer

    from lorakit.train.generate import greedy_generate

    tok = tiny_tokenizer()
    model = tiny_gpt2_lm(tok).eval()  # 128 positions
    prompt = tok(" ".join(["good film"] * 70), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        greedy_generate(model, tok, [prompt], max_new_tokens=4)


def _stopped_at(tmp_path, tok, data_files, at: int, **kw):
    """A 4-step run stopped by Ctrl-C after step ``at`` (checkpointed): its config and the text of
    its train_config.yaml."""
    def ctrl_c(step, _loss):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
    cfg = _cfg(tmp_path, data_files, max_steps=4, **kw)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    return cfg, (tmp_path / "run" / "train_config.yaml").read_text()


@pytest.mark.parametrize("change", [{"alpha": 64.0}, {"use_rslora": True}, {"method": "qlora"}, {"rank": 16},
                                    {"lora_plus_ratio": 4.0}, {"batch_size": 4}, {"max_length": 10}, {"weight_decay": 0.1}])
def test_resume_refuses_options_that_define_the_model_and_keeps_the_run_resumable(tmp_path, tok, data_files, change):
    # a resumed run with another alpha / rsLoRA / method trained on as a different model (loss 14.9
    # instead of 2.05); a refused --rank rewrote train_config.yaml, so the run could not resume at all
    cfg, saved = _stopped_at(tmp_path, tok, data_files, 2, save_steps=0)
    name = next(iter(change))
    with pytest.raises(ValueError, match=f"cannot resume .* different {name}"):
        train(cfg.updated(**change), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert (tmp_path / "run" / "train_config.yaml").read_text() == saved
    assert train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet).steps == 4


@pytest.mark.parametrize("change", ["eval_samples", "eval_data", "edited"])
def test_resume_keeps_the_held_out_set_the_before_numbers_were_measured_on(tmp_path, tok, data_files, change):
    """(Another set on resume compared 'before' on 24 examples with 'after' on 10, and eval.jsonl
    kept the 24; so did the same --eval-data file edited in place.) A run without held-out data may
    still be given some on resume (test_cli_train), and options naming the same examples are fine."""
    held = write_jsonl(toy_records(24, seed=1), tmp_path / "held.jsonl")
    cfg, saved = _stopped_at(tmp_path, tok, data_files, 2, save_steps=0, eval_data=str(held))
    new = {}
    if change == "eval_samples":
        new = {"eval_samples": 3}
    elif change == "eval_data":
        new = {"eval_data": str(write_jsonl(toy_records(10, seed=2), tmp_path / "other.jsonl"))}
    else:
        write_jsonl(toy_records(7, seed=3), held)
    with pytest.raises(ValueError, match="cannot resume .* another held-out set than its eval.jsonl"):
        train(cfg.updated(**new), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert (tmp_path / "run" / "train_config.yaml").read_text() == saved
    write_jsonl(toy_records(24, seed=1), held)
    # eval_samples 0 (all) names the same 24 examples as the default 200
    res = train(cfg.updated(eval_samples=0), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
                log=_quiet)
    assert res.steps == 4 and res.before["n"] == 24


@pytest.mark.parametrize("damage", ["", '{"messages": [\n'])
def test_a_resume_with_a_damaged_eval_jsonl_names_the_file_and_changes_nothing(tmp_path, tok, data_files, damage):
    held = write_jsonl(toy_records(6, seed=1), tmp_path / "held.jsonl")
    cfg, saved = _stopped_at(tmp_path, tok, data_files, 2, save_steps=0, eval_data=str(held))
    record = tmp_path / "run" / "eval.jsonl"
    good = record.read_bytes()
    record.write_text(damage, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(record))):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert (tmp_path / "run" / "train_config.yaml").read_text() == saved and record.read_text() == damage
    record.write_bytes(good)
    assert train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet).steps == 4


def test_a_refused_resume_for_a_checkpoint_mismatch_leaves_the_config_alone(tmp_path, tok, data_files, monkeypatch):
    import lorakit.train.loop as loop

    cfg, saved = _stopped_at(tmp_path, tok, data_files, 2, save_steps=0)

    def broken(*_a, **_k):
        raise ValueError("checkpoint does not fit")
    monkeypatch.setattr(loop, "load_checkpoint", broken)
    with pytest.raises(ValueError, match="does not fit"):
        train(cfg.updated(max_steps=6), resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert (tmp_path / "run" / "train_config.yaml").read_text() == saved


def test_dora_with_a_pissa_or_olora_init_is_refused_before_training():
    # it trained every step, then failed to save (convert_to_lora cannot express DoRA), forever
    for init in ("pissa", "olora", "pissa_niter_4"):
        with pytest.raises(ValueError, match="use_dora cannot be combined with init"):
            TrainConfig(use_dora=True, init=init)
    TrainConfig(use_dora=True, init="gaussian")
    assert TrainConfig(init="DEFAULT").init == "default" and TrainConfig(init="PiSSA").init == "pissa"


def test_qlora_before_column_total_and_method_line(tmp_path, tok, data_files):
    # the "before" eval ran on the dense base (QLoRA trains on the NF4 one), the total left out the
    # quantised weights (7.93% "trainable" on SmolLM2), and the method line hid every variant
    from lorakit.train.loop import method_summary

    kw = dict(max_steps=1, use_dora=True, eval_data=str(data_files[1]))
    q = train(_cfg(tmp_path, data_files, "q", method="qlora", **kw), model=tiny_llama_lm(tok), tokenizer=tok,
              progress=False, log=_quiet)
    d = train(_cfg(tmp_path, data_files, "d", **kw), model=tiny_llama_lm(tok), tokenizer=tok, progress=False,
              log=_quiet)
    assert q.before["loss"] != d.before["loss"]  # NF4 rounding moves the base's loss
    assert q.total_params == d.total_params and q.trainable_params == d.trainable_params
    assert method_summary(TrainConfig(use_rslora=True, init="pissa", lora_plus_ratio=16, dropout=0.1)) == (
        "lora r=8 alpha=16 on all-linear, rsLoRA, init pissa, LoRA+ ratio 16, dropout 0.1")
    assert method_summary(TrainConfig(method="qlora", use_dora=True)) == "qlora r=8 alpha=16 on all-linear, DoRA"


def test_eval_steps_without_eval_data_warns(tmp_path, tok, data_files):
    messages: list[str] = []
    train(_cfg(tmp_path, data_files, max_steps=1, eval_steps=1, eval_data=None), model=tiny_llama_lm(tok),
          tokenizer=tok, progress=False, log=messages.append)
    assert any("eval_steps 1 has nothing to evaluate" in m for m in messages)


def test_eval_loss_between_steps_records_no_graph(tok, monkeypatch):
    """--eval-steps evaluates between training steps, where autograd is on: the eval loss must not
    record a graph (memory and time for nothing)."""
    import lorakit.train.generate as gen

    model = tiny_llama_lm(tok)  # every weight requires grad
    seen = []
    real = gen.loss_sum

    def spy(m, batch, *a, **kw):
        loss, n = real(m, batch, *a, **kw)
        seen.append(loss.requires_grad)
        return loss, n

    monkeypatch.setattr(gen, "loss_sum", spy)
    data = [tokenize_example(tok, parse_record(r, "x"), 64) for r in toy_records(6)]
    total, count = gen.eval_loss_sum(model, data, 4, tok.pad_token_id, "fp32")
    assert seen == [False, False] and count == sum(t.n_labels for t in data) and total > 0
    assert gen.eval_loss(model, data, 4, tok.pad_token_id, "fp32") == pytest.approx(total / count)


def test_sigterm_stops_after_the_step_with_a_checkpoint_like_ctrl_c(tmp_path, tok, data_files, capsys):
    # a batch scheduler's pre-emption (and torchrun stopping its workers) sends SIGTERM: it killed
    # the run at once, losing every step since the last --save-steps checkpoint
    def term(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    cfg = _cfg(tmp_path, data_files, max_steps=5)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=term, log=_quiet)
    assert res.interrupted and res.steps == 2
    assert "SIGTERM: finishing this step and saving a checkpoint" in capsys.readouterr().err
    assert json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 5 and not res.interrupted


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_before_the_loop_cleans_up_like_ctrl_c(tmp_path, tok, data_files, monkeypatch, sig):
    # while the model loaded (or the first evaluation ran), SIGTERM killed the process at once and
    # left the new run's directory claimed: the same command was then refused ("delete it")
    real = loop.tokenize_all

    def stop_while_loading(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*args, **kwargs)

    def stop_mid_loop(step, _loss):
        if step == 2:
            os.kill(os.getpid(), getattr(signal, sig))

    signum = getattr(signal, sig)
    inherited = signal.getsignal(signum)
    if inherited is signal.SIG_IGN:  # started under nohup, and a run keeps ignoring an ignored signal
        signal.signal(signum, signal.SIG_DFL)
    try:
        before = signal.getsignal(getattr(signal, sig))
        cfg = _cfg(tmp_path, data_files, max_steps=3)
        monkeypatch.setattr(loop, "tokenize_all", stop_while_loading)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        assert not (tmp_path / "run").exists() and signal.getsignal(getattr(signal, sig)) is before
        monkeypatch.setattr(loop, "tokenize_all", real)
        res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=stop_mid_loop, log=_quiet)
        assert res.interrupted and res.steps == 2  # in the loop: finish the step, keep a checkpoint
        res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        assert res.steps == 3 and not res.interrupted and signal.getsignal(getattr(signal, sig)) is before
    finally:
        signal.signal(signum, inherited)


def test_a_run_in_progress_locks_its_directory(tmp_path, tok, data_files):
    # two --resume of one run at once both trained and both said "saved" (the second over the
    # first); a new run on a live run's directory was told to delete it
    def ctrl_c(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(tmp_path, data_files, max_steps=4)
    assert train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet).interrupted
    run = tmp_path / "run"
    state = (find_checkpoint(run) / "trainer_state.json").read_text()
    held = loop.lock_run_dir(run)  # as another process training in it holds it
    try:
        with pytest.raises(FileExistsError, match="is in use: another lorakit process is training in it"):
            train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        with pytest.raises(FileExistsError, match="is in use"):
            train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
        assert (find_checkpoint(run) / "trainer_state.json").read_text() == state
    finally:
        os.close(held)
    seen = []

    def still_locked(step, _loss):
        seen.append(loop._locked(run))
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=still_locked,
                log=_quiet)
    assert res.steps == 4 and seen == [True, True] and not loop._locked(run)  # held while it trains, then given back


def test_a_file_system_without_flock_trains_and_resumes_unlocked(tmp_path, tok, data_files, monkeypatch):
    # NFS refuses an exclusive flock on a directory opened read-only (ENOLCK / EBADF); every such error
    # was read as "another process holds it", so --resume there was always refused as "in use"
    import errno
    import fcntl

    def no_flock(_fd, _op):
        raise OSError(errno.ENOLCK, "No locks available")

    def ctrl_c(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(fcntl, "flock", no_flock)
    cfg = _cfg(tmp_path, data_files, max_steps=3)
    assert train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet).interrupted
    assert loop.lock_run_dir(tmp_path / "run") is None and not loop._locked(tmp_path / "run")
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 3 and not res.interrupted


def test_a_kill_while_the_run_record_is_written_leaves_a_resumable_run(tmp_path, tok, data_files, monkeypatch):
    # lorakit_run.json was written in place: a kill inside the write left half a file, and --resume
    # and lorakit eval both refused the finished run ("is not valid JSON") without saying what to do
    import lorakit.train.loop as loop

    cfg = _cfg(tmp_path, data_files, max_steps=3)
    train(_cfg(tmp_path, data_files, "full", max_steps=3), model=tiny_llama_lm(tok), tokenizer=tok,
                 progress=False, log=_quiet)
    real = loop.atomic_write_bytes

    def killed(path, data):
        if path.name == "lorakit_run.json":
            raise SimulatedKill
        real(path, data)
    monkeypatch.setattr(loop, "atomic_write_bytes", killed)
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    monkeypatch.setattr(loop, "atomic_write_bytes", real)
    run = tmp_path / "run"
    assert not (run / "lorakit_run.json").exists()  # no half file
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 3 and json.loads((run / "lorakit_run.json").read_text())["finished"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (run, tmp_path / "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a record cut by an older version: the refusal says what to do
    (run / "lorakit_run.json").write_text('{"finished": tr')
    with pytest.raises(ValueError, match="record is damaged; if .*checkpoint.* is there, delete .*lorakit_run.json"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_run_killed_before_its_first_checkpoint_is_not_sent_to_resume(tmp_path, tok, data_files):
    # the same command said "pass --resume", and --resume said "delete it and start again"
    cfg = _cfg(tmp_path, data_files, max_steps=3)

    def kill_at_1(step, _loss):
        raise SimulatedKill
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=kill_at_1, log=_quiet)
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint, so there is nothing to resume: "
                                              "delete"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_full_fine_tunes_model_directory_is_written_whole(tmp_path, tok, data_files, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    cfg = _cfg(tmp_path, data_files, max_steps=2, method="full", save_steps=1)

    def killed(self, *args, **kwargs):
        raise SimulatedKill
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    with pytest.raises(SimulatedKill):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    run = tmp_path / "run"
    assert not (run / "model").exists()  # weights without a tokenizer were left there, as if whole
    assert not list(run.glob(".model.*.tmp"))
    monkeypatch.undo()
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.steps == 2 and (run / "model" / "config.json").is_file()
    assert (run / "model" / "tokenizer.json").is_file()


@pytest.mark.parametrize("field, value, problem", [
    ("warmup_ratio", 1.0, r"warmup_ratio must be in \[0, 1\)"),   # C2: all-warmup runs never reach the peak lr
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),              # C3: drops every input of the branch
    ("grad_accum", 0, "grad_accum must be a positive integer"),   # C4: zero micro-batches per step
])
def test_config_refuses_boundary_values(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**{field: value})


def test_config_accepts_the_values_just_inside():
    TrainConfig(warmup_ratio=0.0, dropout=0.0, grad_accum=1)
    TrainConfig(warmup_ratio=0.99, dropout=0.99)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# L1: find_checkpoint must prefer the new checkpoint over a leftover .checkpoint-old
def test_a_kill_after_the_new_checkpoint_is_in_place_resumes_from_it(tmp_path, tok, data_files, monkeypatch):
    """A kill between renaming the new checkpoint into place and deleting .checkpoint-old leaves
    both: the newer one (checkpoint/) is the resume point, not the older one."""
    real = shutil.rmtree

    def kill_on_old(path, *a, **kw):
        if os.path.basename(str(path)) == ".checkpoint-old" and os.path.isdir(path):
            raise SimulatedKill
        return real(path, *a, **kw)
    monkeypatch.setattr(loop.shutil, "rmtree", kill_on_old)
    cfg = _cfg(tmp_path, data_files, max_steps=6, save_steps=2)
    with pytest.raises(SimulatedKill):  # at the step-4 checkpoint, after checkpoint-2 became .checkpoint-old
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    monkeypatch.setattr(loop.shutil, "rmtree", real)
    run = tmp_path / "run"
    assert (run / ".checkpoint-old").is_dir() and (run / "checkpoint").is_dir()
    assert find_checkpoint(run) == run / "checkpoint"
    assert ckpt_step(run) == 4
    said: list[str] = []
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=said.append)
    assert any("at step 4/6" in line for line in said)
    assert res.steps == 6


# L4: --eval-steps evaluates between steps only (the last step gets the final evaluation instead)
def test_eval_steps_records_the_held_out_loss_between_steps_only(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=4, eval_steps=2, eval_data=str(data_files[1]), eval_samples=4)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    with_eval = [r["step"] for r in _log(res.run_dir) if "eval_loss" in r]
    assert with_eval == [2]


# L8: a checkpoint's wall_seconds counts the time of the runs before a resume too
def test_a_resumed_runs_checkpoint_keeps_counting_the_wall_time_before_it(tmp_path, tok, data_files):
    def ctrl_c_at(n):
        def hook(step, _loss):
            if step == n:
                os.kill(os.getpid(), signal.SIGINT)
        return hook
    cfg = _cfg(tmp_path, data_files, max_steps=6)
    train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c_at(2), log=_quiet)
    state_file = find_checkpoint(tmp_path / "run") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["wall_seconds"] = 1000.0  # as if the first part of the run had taken that long
    state_file.write_text(json.dumps(state))
    res = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c_at(4),
                log=_quiet)
    assert res.interrupted and res.steps == 4
    again = json.loads((find_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert again["step"] == 4 and again["wall_seconds"] >= 1000.0
    final = train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert final.wall_seconds >= 1000.0


# L14: a checkpoint replaces the previous one: only the newest stays on disk
def test_only_the_newest_checkpoint_is_kept(tmp_path, tok, data_files):
    def ctrl_c(step, _loss):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
    cfg = _cfg(tmp_path, data_files, max_steps=8, save_steps=2)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    assert res.interrupted
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert ckpt_step(run) == 5


# L19: log.jsonl's "epoch" is the epoch the step ended in (its last micro-batch's)
def test_the_log_records_the_epoch_each_step_ends_in(tmp_path, tok, data_files):
    # 96 examples in batches of 8: 12 micro-batches an epoch; a step of 5 micro-batches: step 3 takes
    # micro-batches 10..14, the last two of epoch 0 and the first three of epoch 1
    cfg = _cfg(tmp_path, data_files, max_steps=3, grad_accum=5)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert [(r["step"], r["epoch"]) for r in _log(res.run_dir)] == [(1, 0), (2, 0), (3, 1)]


def _interrupted_at(step, cfg, tok):
    """Run ``cfg`` and press Ctrl-C after optimizer step ``step`` (the run keeps its checkpoint)."""
    def ctrl_c(done, _loss):
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)
    return train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)


# L24: a trainer_state.json without its data position is refused as unreadable, by name
def test_a_trainer_state_without_its_data_position_is_a_clear_error(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=4)
    _interrupted_at(2, cfg, tok)
    state_file = find_checkpoint(tmp_path / "run") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["micro_batch"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"trainer_state.json: missing \['micro_batch'\]"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


# L25: the warm-up is ceil(warmup_ratio x steps): a short run with a warm-up ratio still warms up
def test_a_fractional_warmup_rounds_up_to_a_whole_step(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=4, warmup_ratio=0.1)  # 0.4 steps -> 1 step of warm-up
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    lrs = [r["lr"] for r in _log(res.run_dir)]
    assert lrs[0] == pytest.approx(cfg.learning_rate * 0.5)  # step 1 of a 1-step warm-up: 1/2 of the peak
    assert lrs[1] == pytest.approx(cfg.learning_rate)  # then the cosine decay starts at the peak


# L35: --max-train-samples N trains on the first N examples exactly
def test_max_train_samples_keeps_exactly_that_many_examples(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=1, max_train_samples=10)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)
    assert res.train_examples == 10


# L38: a new run into the directory of an interrupted run (it has a checkpoint) is pointed to --resume
def test_a_new_run_on_an_interrupted_runs_directory_says_resume(tmp_path, tok, data_files):
    cfg = _cfg(tmp_path, data_files, max_steps=4)
    _interrupted_at(1, cfg, tok)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_prompt_that_exactly_fills_the_positions_with_its_new_tokens_generates():
    """prompt + max_new_tokens == the model's 128 positions fits (the last position is usable); one
    token more is the clear error (the bug this catches: ``>=`` for ``>``)."""
    from lorakit.train.generate import greedy_generate

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_gpt2_lm(tok).eval()  # 128 positions
    prompt = tok(" ".join(["good film"] * 30), add_special_tokens=False)["input_ids"]
    room = 128 - len(prompt)
    assert 0 < room < 128
    texts = greedy_generate(model, tok, [prompt], max_new_tokens=room, stop_ids=[])
    assert len(texts) == 1 and isinstance(texts[0], str)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        greedy_generate(model, tok, [prompt], max_new_tokens=room + 1, stop_ids=[])


def _scripted_llama(tok, rule):
    """A tiny Llama whose next token at each position is ``rule(input token id)`` (the backbone's
    last hidden state is replaced by a one-hot code of that target, the head reads it back)."""
    from tiny_lm import tiny_llama_lm

    model = tiny_llama_lm(tok).eval()
    codes = sorted({rule(i) for i in range(len(tok))})
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for j, t in enumerate(codes):
            model.lm_head.weight[t, j] = 10.0
    ids_in = []
    model.model.register_forward_pre_hook(lambda mod, args, kw: ids_in.append(kw["input_ids"]), with_kwargs=True)

    def replace(mod, args, kwargs, out):
        ids = ids_in[-1]
        h = torch.zeros(*ids.shape, model.config.hidden_size)
        for j, t in enumerate(codes):
            h[..., j] = (ids.clone().apply_(rule) == t).float()
        out.last_hidden_state = h
        return out

    model.model.register_forward_hook(replace, with_kwargs=True)
    return model


def test_eval_shortcut_does_not_call_correct_an_answer_whose_end_is_no_stop_token():
    """The template ends an assistant turn with an ordinary word ("film"), not a stop token: a model
    that writes "positive film" and goes on ("positive film positive ...") matches every answer token
    under teacher forcing, but greedy decoding does not stop after the answer. The shortcut must give
    the accuracy generating gives (evaluate's docstring; the bug this catches: labels[-1] in stops dropped)."""
    from lorakit.train.data import Example
    from lorakit.train.generate import evaluate, stop_token_ids

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} film {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    tok = tiny_tokenizer(template)
    positive, film = tok.convert_tokens_to_ids("positive"), tok.convert_tokens_to_ids("film")
    model = _scripted_llama(tok, lambda i: film if i == positive else positive)
    assert film not in stop_token_ids(model, tok)
    example = Example(messages=[{"role": "user", "content": "good"}, {"role": "assistant", "content": "positive"}])
    generated = evaluate(model, tok, [example], 64, 1, shortcut=False)
    assert generated["accuracy"] == 0.0  # "positive film positive" is not "positive"
    shortcut = evaluate(model, tok, [example], 64, 1, shortcut=True)
    assert shortcut["accuracy"] == generated["accuracy"]


def test_eval_loss_gives_an_eval_mode_model_back_in_eval_mode():
    """eval_loss switches to eval and back to the mode it found (the bug this catches: always .train())."""
    from tiny_lm import tiny_llama_lm

    from lorakit.train.data import Example, tokenize_example
    from lorakit.train.generate import eval_loss

    tok = tiny_tokenizer()
    model = tiny_llama_lm(tok)
    data = [tokenize_example(tok, Example(messages=[{"role": "user", "content": "good film"},
                                                    {"role": "assistant", "content": "positive"}]), 64)]
    for mode in (False, True):
        model.train(mode)
        assert eval_loss(model, data, 1, tok.pad_token_id, "fp32") > 0
        assert model.training is mode
        assert all(m.training is mode for m in model.modules())


def test_max_length_equal_to_the_positions_fits_without_a_warning():
    """--max-length equal to the model's 128 learned positions fits: no warning."""
    from lorakit.train.generate import fit_to_positions

    tok = tiny_tokenizer()
    model = tiny_gpt2_lm(tok)
    warned = []
    assert fit_to_positions(model, 128, warn=warned.append) == 128 and warned == []
    assert fit_to_positions(model, 129, warn=warned.append) == 128 and len(warned) == 1


def test_a_qlora_run_loaded_with_merge_is_folded_into_the_dense_base(tmp_path):
    """load_for_inference(merge=True) of a QLoRA run folds the adapter into the dense base, not an
    NF4 copy (its docstring: "with merge it is folded into the dense base instead"); without merge
    the base is NF4 as in training (the bug this catches: quantised whether or not merging)."""
    import json

    import lorakit as lk
    from tiny_lm import tiny_llama_lm

    from lorakit.train.generate import load_for_inference

    tok = tiny_tokenizer()
    base_dir, run = tmp_path / "base", tmp_path / "run"
    model = tiny_llama_lm(tok)
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lk.save_adapter(model, run)
    (run / "lorakit_run.json").write_text(json.dumps({"method": "qlora", "model": str(base_dir), "precision": "fp32"}))

    def nf4(m):
        return [n for n, mod in m.named_modules() if callable(getattr(mod, "dequantize_weight", None))]

    m, _, info = load_for_inference(adapter=str(run), dtype="fp32", merge=False)
    assert info.get("quantized") == "nf4" and nf4(m)
    m, _, info = load_for_inference(adapter=str(run), dtype="fp32", merge=True)
    assert "quantized" not in info and nf4(m) == []
    assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_chat_reset_keeps_the_system_message(monkeypatch):
    """/reset clears the conversation but not the --system message (the bug this catches: history = [])."""
    import lorakit.train.generate as generate

    seen = []
    monkeypatch.setattr(generate, "encode_prompt", lambda tok, history: seen.append([dict(m) for m in history]) or [1])
    monkeypatch.setattr(generate, "greedy_generate", lambda *a, **k: ["ok"])
    monkeypatch.setattr(generate, "stop_token_ids", lambda *a: [])
    lines = iter(["hello", "/reset", "hi"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert generate.chat_loop(None, None, 4, "fp32", system="be brief", read=read, write=lambda s: None) == 0
    system = {"role": "system", "content": "be brief"}
    assert seen == [[system, {"role": "user", "content": "hello"}], [system, {"role": "user", "content": "hi"}]]


# ---- mutation round 6 (/tmp/mutants6)
def test_max_grad_norm_0_means_no_clipping_not_zero_gradients(tmp_path, tok, data_files):
    model = tiny_llama_lm(tok)
    train(_cfg(tmp_path, data_files, max_steps=2, max_grad_norm=0.0), model=model, tokenizer=tok,
          progress=False, log=_quiet)
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert bs and any(bool(p.abs().sum() > 0) for p in bs)  # B starts at 0: it moved


def test_a_ctrl_c_during_the_last_step_of_a_full_fine_tune_lets_it_finish(tmp_path, tok, data_files):
    # (LoRA runs stop after the loop with a resumable checkpoint; a full run has no such stop and
    # finishes: the loop's "step < total_steps" keeps it from breaking out as "interrupted")
    def ctrl_c(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    res = train(_cfg(tmp_path, data_files, method="full", lr=1e-4, max_steps=2), model=tiny_llama_lm(tok),
                tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    assert not res.interrupted and res.steps == 2


def test_a_checkpoint_missing_a_trainable_tensor_is_refused_on_resume(tmp_path, tok, data_files):
    def ctrl_c(step, _loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    cfg = _cfg(tmp_path, data_files, max_steps=4)
    res = train(cfg, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, on_step=ctrl_c, log=_quiet)
    assert res.interrupted
    f = find_checkpoint(tmp_path / "run") / "trainable.safetensors"
    sd = load_file(str(f))
    sd.pop(sorted(sd)[0])
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="does not fit"):
        train(cfg, resume=True, model=tiny_llama_lm(tok), tokenizer=tok, progress=False, log=_quiet)


def test_a_full_bf16_run_keeps_fp32_master_weights(tmp_path, tok, data_files):
    model = tiny_llama_lm(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(_cfg(tmp_path, data_files, method="full", precision="bf16", max_steps=1, lr=1e-30), model=model,
          tokenizer=tok, progress=False, log=_quiet)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())  # rotary inv_freq
    # (a step at lr 1e-30 leaves the weights: a round trip through bf16 would have rounded them)
    after = dict(model.named_parameters())
    assert all(torch.allclose(after[n], w, rtol=0, atol=1e-6) for n, w in before.items())


def test_find_checkpoint_skips_a_checkpoint_without_its_trainer_state(tmp_path):
    (tmp_path / loop.CHECKPOINT).mkdir()
    (tmp_path / ".checkpoint-old").mkdir()
    (tmp_path / ".checkpoint-old" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / ".checkpoint-old"


def test_the_smoothed_loss_is_the_mean_of_the_last_k_steps(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "loss": float(i + 1)}) + "\n" for i in range(40)))
    lines = {}
    real = Axes.plot

    def spy(self, *args, **kw):
        lines[kw.get("label")] = args
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    loop.plot_losses(log, tmp_path / "loss.png")
    (_, smooth), = [v for k, v in lines.items() if k and k.startswith("train loss (mean of 2")]
    assert smooth[0] == 1.0 and smooth[5] == 5.5  # mean of steps 5 and 6 (losses 5.0, 6.0)
