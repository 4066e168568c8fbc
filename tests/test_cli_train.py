"""``lorakit train / generate / chat / eval / merge`` end to end on tiny saved models, plus one
integration run on the real embedded SmolLM2-135M-Instruct."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import lorakit.train.loop as loop
from lorakit.cli import main
from lorakit.train.config import TrainConfig
from tiny_lm import one_thread, save_tiny_model, toy_records, write_jsonl

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

PROMPT = "Review : a tender funny film Is this review positive or negative ?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, data files, and a run trained on them via the CLI."""
    d = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model(d / "model")
    train_file = write_jsonl(toy_records(64), d / "train.jsonl")
    eval_file = write_jsonl(toy_records(16, seed=1), d / "eval.jsonl")
    run = d / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(train_file), "--eval-data", str(eval_file),
                 "--max-steps", "12", "--batch-size", "8", "--lr", "1e-2", "--precision", "fp32",
                 "--output", str(run), "--no-progress", "--save-steps", "5", "--target-modules", "q_proj,v_proj,up_proj"])
    assert code == 0
    return {"dir": d, "model": model_dir, "train": train_file, "eval": eval_file, "run": run}


def test_train_cli_writes_run_and_table(trained, capsys):
    run = trained["run"]
    info = json.loads((run / "lorakit_run.json").read_text())
    assert info["model"] == str(trained["model"]) and info["steps"] == 12
    assert info["config"]["target_modules"] == "q_proj,v_proj,up_proj"
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    for name in ("log.jsonl", "loss.png", "train_config.yaml", "eval.jsonl", "adapter_model.safetensors"):
        assert (run / name).is_file(), name


def test_train_help_documents_every_flag_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        assert "--" + f.name.replace("_", "-") in out, f.name
    for flag in ("--config", "--resume"):
        assert flag in out
    assert out.count("(default:") >= len(fields(TrainConfig)) - 1
    assert "(default: 8)" in out and "(default: all-linear)" in out


def test_train_cli_config_yaml_and_flag_precedence(trained, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {trained['model']}\ndata: {trained['train']}\nmax_steps: 50\nrank: 2\n"
                 f"precision: fp32\noutput: {tmp_path / 'r'}\n")
    assert main(["train", "--config", str(y), "--max-steps", "2", "--no-progress"]) == 0  # flag wins
    info = json.loads((tmp_path / "r" / "lorakit_run.json").read_text())
    assert info["steps"] == 2 and info["config"]["rank"] == 2


def test_epochs_flag_and_a_config_files_max_steps(tmp_path, capsys):
    """--epochs does not silently drop a max_steps the --config file sets (the help: --epochs is
    ignored when --max-steps is set); a file's max_steps: 0, or none, lets --epochs decide."""
    import argparse

    from lorakit.train.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def cfg(text):
        (tmp_path / "c.yaml").write_text(text)
        return config_from_args(parser.parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"]))
    assert cfg("max_steps: 3\n").max_steps == 3
    assert "--epochs is ignored" in capsys.readouterr().err
    assert cfg("max-steps: 0\n").max_steps == 0 and cfg("rank: 4\n").max_steps == 0
    assert "ignored" not in capsys.readouterr().err
    assert config_from_args(parser.parse_args(["train", "--epochs", "2"])).max_steps == 0


def test_resume_with_an_empty_path_is_refused(capsys):
    assert main(["train", "--resume", ""]) == 2
    assert "--resume needs the run directory" in capsys.readouterr().err


def test_train_cli_bad_line_is_a_clean_error(trained, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"messages": "hi"}\n')
    code = main(["train", "--model", str(trained["model"]), "--data", str(bad), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2" in err and "'messages' must be a non-empty list" in err
    assert "Traceback" not in err


def test_train_cli_failed_new_run_can_be_rerun(trained, tmp_path, capsys):
    run = tmp_path / "r"
    args = ["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--eval-data",
            str(trained["eval"]), "--max-steps", "2", "--precision", "fp32", "--output", str(run), "--no-progress"]
    assert main(args + ["--target-modules", "nosuchmod"]) == 2  # fails after the model is loaded
    assert "nosuchmod" in capsys.readouterr().err and not run.exists()
    assert main(args + ["--target-modules", "q_proj"]) == 0


@pytest.mark.parametrize("flags, problem", [
    (["--init", "bogus"], "init must be one of"),
    (["--target-modules", "q_proj["], "is not a valid regex"),
    (["--weight-decay", "-5"], "weight_decay must be >= 0"),
    (["--lora-plus-ratio", "nan"], "lora_plus_ratio must be a finite number"),
    (["--alpha", "nan"], "alpha must be a finite number"),
    (["--alpha", "inf"], "alpha must be a finite number"),
    (["--epochs", "inf"], "epochs must be a finite number"),
])
def test_train_cli_rejects_bad_numbers_and_names_before_loading(trained, tmp_path, capsys, flags, problem):
    code = main(["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--output",
                 str(tmp_path / "r"), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rank, tag", [("1", "[rank 1] "), ("0", ""), (None, "")])
def test_a_later_torchrun_process_marks_its_errors(tmp_path, capsys, monkeypatch, rank, tag):
    """Under torchrun every process reports its own error; a later one's line says which it is."""
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert main(["train", "--epochs", "0", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{tag}lorakit train: error: epochs must be > 0"), err


def test_a_run_records_absolute_paths_and_loads_its_own_base_from_anywhere(tmp_path, monkeypatch):
    """Relative --model / --data are recorded as absolute paths: from another directory that has a
    different ./model, the run still loads its own base."""
    import yaml

    from lorakit.train.generate import load_for_inference

    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "model")
    write_jsonl(toy_records(24), tmp_path / "train.jsonl")
    assert main(["train", "--model", "model", "--data", "train.jsonl", "--max-steps", "2", "--save-steps", "1",
                 "--batch-size", "8", "--precision", "fp32", "--output", "run", "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    info = json.loads((tmp_path / "run" / "lorakit_run.json").read_text())
    base = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert saved["model"] == info["model"] == base == str(tmp_path / "model")
    assert saved["data"] == str(tmp_path / "train.jsonl")
    other = tmp_path / "other"
    save_tiny_model(other / "model", seed=7)  # another base under the same relative name
    monkeypatch.chdir(other)
    _, _, loaded = load_for_inference(None, "../run")
    assert loaded["model"] == str(tmp_path / "model")


def test_a_base_model_that_cannot_be_found_is_named_with_where_it_was_recorded(trained, tmp_path):
    from lorakit.train.generate import load_for_inference

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    info = json.loads((run / "lorakit_run.json").read_text())
    (run / "lorakit_run.json").write_text(json.dumps(dict(info, model="no/such/model")))
    with pytest.raises(FileNotFoundError, match="base model 'no/such/model' recorded in .*lorakit_run.json.*--model"):
        load_for_inference(None, str(run))
    peft_dir = tmp_path / "peft"  # a bare PEFT adapter: its config names a hub model that is not here
    peft_dir.mkdir()
    shutil.copy(run / "adapter_model.safetensors", peft_dir)
    config = json.loads((run / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="someorg/Other-7B")))
    with pytest.raises(FileNotFoundError, match="names the base model 'someorg/Other-7B'.*--model DIR"):
        load_for_inference(None, str(peft_dir))
    assert load_for_inference(str(trained["model"]), str(peft_dir))[2]["model"] == str(trained["model"])


def test_max_length_beyond_a_gpt2_position_table_is_cut_to_it(tmp_path, capsys):
    """GPT-2 indexes a table of learned positions (128 here): train and eval cut longer sequences
    there, with a warning, instead of an IndexError from the embedding."""
    model = save_tiny_model(tmp_path / "gpt2", kind="gpt2")
    long = [{"text": "good film " * 100}] * 4  # ~200 tokens, every one a label
    data = write_jsonl(toy_records(12) + long, tmp_path / "train.jsonl")
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--max-steps", "2",
                 "--batch-size", "8", "--precision", "fp32", "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "--max-length 256 is more than the model's 128 positions" in out.out + out.err
    assert main(["eval", "--model", str(model), "--data", str(data), "--precision", "fp32"]) == 0
    out = capsys.readouterr()
    assert "--max-length 512 is more than the model's 128 positions" in out.err and "Traceback" not in out.err


def test_train_and_merge_cli_output_that_is_a_file(trained, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--output", str(afile),
                 "--no-progress"]) == 2
    assert f"{str(afile)!r} is a file" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(trained["run"]), "--out", str(afile)]) == 2
    assert f"{str(afile)!r} is a file" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def test_cli_output_under_a_file_is_one_error_line(trained, tmp_path, capsys):
    """An --output / --out whose parent is a file: the system's message, no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for argv in (["train", "--model", str(trained["model"]), "--data", str(trained["train"]),
                  "--output", str(afile / "run"), "--no-progress"],
                 ["merge", "--adapter", str(trained["run"]), "--out", str(afile / "merged")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and str(afile) in err and "Traceback" not in err
    assert afile.read_text() == "keep me"


def test_train_cli_resume_refuses_config(trained, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("rank: 2\n")
    assert main(["train", "--resume", str(trained["run"]), "--config", str(y)]) == 2
    assert "--config cannot be combined with --resume" in capsys.readouterr().err
    # --output with --resume was taken as an override, then failed naming a directory that did not exist
    assert main(["train", "--resume", str(trained["run"]), "--output", str(tmp_path / "other")]) == 2
    assert "--output cannot be combined with --resume" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_train_cli_bad_config_file_names_it(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("rank: [\n")
    assert main(["train", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert str(y) in err and "not valid YAML" in err and "Traceback" not in err


def test_full_method_warns_about_adapter_flags(capsys):
    from lorakit.cli import build_parser
    from lorakit.train.cli import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--method", "full", "--rank", "4",
                                                      "--target-modules", "q_proj"]))
    assert cfg.method == "full"
    err = capsys.readouterr().err
    assert "warning: --method full" in err and "--rank, --target-modules" in err
    config_from_args(build_parser().parse_args(["train", "--method", "full"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags, problem", [
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-samples", "-6"], "--max-samples must be >= 0"),
    (["--max-length", "-1"], "--max-length must be >= 1"),
])
def test_eval_cli_rejects_bad_sizes_before_loading(trained, monkeypatch, capsys, flags, problem):
    import lorakit.train.generate as gen

    def no_load(*_a, **_k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(gen, "load_for_inference", no_load)
    assert main(["eval", "--model", str(trained["model"]), "--data", str(trained["eval"]), *flags]) == 2
    assert problem in capsys.readouterr().err


def test_chat_and_generate_check_their_input_before_loading(trained, monkeypatch, capsys):
    import lorakit.train.generate as gen

    def no_load(*_a, **_k):
        raise AssertionError("the model must not be loaded")
    monkeypatch.setattr(gen, "load_for_inference", no_load)
    assert main(["chat", "--model", str(trained["model"]), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--model", str(trained["model"]), "--raw", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_corrupt_adapter_and_run_metadata_name_the_file(trained, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained["run"] / name, adapter / name)
    (adapter / "adapter_config.json").write_text("[1, 2]")
    assert main(["generate", "--adapter", str(adapter), "hi"]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json: expected a JSON object" in err and "Traceback" not in err
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "lorakit_run.json").write_text("{oops")
    assert main(["generate", "--adapter", str(run), "hi"]) == 2
    assert "lorakit_run.json: not valid JSON" in capsys.readouterr().err


def test_merge_cli_full_finetune_run_is_explained(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "full"
    shutil.copytree(trained["model"], run / "model")  # what a --method full run holds
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "is a full fine-tune run" in err and "already a plain" in err
    assert not (tmp_path / "merged").exists()


def test_adapter_and_model_mix_ups_are_explained(trained, tmp_path, capsys):
    run = tmp_path / "full"
    shutil.copytree(trained["model"], run / "model")  # what a --method full run holds
    cases = [
        (["--adapter", str(trained["train"])], "is a file; give the directory that holds adapter_config.json"),
        (["--adapter", ""], "--adapter needs a directory, got an empty path"),
        (["--adapter", str(run), "--model", str(trained["model"])], "is a full fine-tune (its model/ holds the whole "
         "model), so it takes no --model"),
        (["--model", str(run)], "its model/ has one: give"),
    ]
    for flags, problem in cases:
        assert main(["generate", *flags, "hi"]) == 2, flags
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, (flags, err)


def test_generate_cli(trained, capsys):
    code = main(["generate", "--adapter", str(trained["run"]), PROMPT, "--max-new-tokens", "3", "--precision", "fp32"])
    out = capsys.readouterr().out.strip()
    assert code == 0 and out
    assert main(["generate", "--model", str(trained["model"]), "--raw", "a good", "--max-new-tokens", "2"]) == 0


def test_eval_cli_json_with_and_without_adapter(trained, capsys):
    assert main(["eval", "--adapter", str(trained["run"]), "--data", str(trained["eval"]), "--json",
                 "--precision", "fp32"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(trained["model"]), "--data", str(trained["eval"]), "--json",
                 "--precision", "fp32"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert tuned["n"] == base["n"] == 16 and base["adapter"] is None
    assert tuned["loss"] < base["loss"]
    # The run's own numbers are reproduced by `lorakit eval` on the eval.jsonl it wrote.
    info = json.loads((trained["run"] / "lorakit_run.json").read_text())
    assert tuned["loss"] == pytest.approx(info["after"]["loss"], rel=1e-4)
    assert tuned["accuracy"] == info["after"]["accuracy"]
    assert main(["eval", "--adapter", str(trained["run"]), "--data", str(trained["eval"])]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_merge_cli_gives_plain_transformers_model(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.generate import load_for_inference

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained["run"]), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    model, _, _ = load_for_inference(None, str(trained["run"]))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert main(["merge", "--adapter", str(trained["run"]), "--out", str(out)]) == 2  # not empty: refused
    assert "already exists" in capsys.readouterr().err


def test_merge_flag_of_generate_eval_and_chat(trained, capsys):
    from lorakit.inject import iter_lora_layers
    from lorakit.train.generate import load_for_inference

    merged, _, info = load_for_inference(None, str(trained["run"]), "fp32", merge=True)
    unmerged, tok, _ = load_for_inference(None, str(trained["run"]), "fp32")
    assert info["merged"] and not list(iter_lora_layers(merged)) and list(iter_lora_layers(unmerged))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-5)
    # eval reports the same loss merged and unmerged (fp32: to rounding), and says it merged
    reports = []
    for extra in ([], ["--merge"]):
        assert main(["eval", "--adapter", str(trained["run"]), "--data", str(trained["eval"]), "--json",
                     "--precision", "fp32", *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["merged"] and not reports[0]["merged"]
    assert reports[1]["loss"] == pytest.approx(reports[0]["loss"], rel=1e-4)
    args = ["generate", "--adapter", str(trained["run"]), PROMPT, "--max-new-tokens", "3", "--precision", "fp32"]
    assert main(args) == 0
    unmerged_reply = capsys.readouterr().out
    assert main(args + ["--merge"]) == 0
    assert capsys.readouterr().out == unmerged_reply
    # what --merge cannot do is refused with a message naming why
    assert main(["generate", "--model", str(trained["model"]), "--merge", PROMPT]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(["generate", "--adapter", f"a={trained['run']}", "--adapter", f"b={trained['run']}",
                 "--use", "a", "--use", "b", "--merge", "x", "y"]) == 2
    assert "one --adapter" in capsys.readouterr().err
    assert main(["chat", "--merge", "--model", str(trained["model"])]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_chat_cli_handles_eof_and_ctrl_c(trained, monkeypatch, capsys):
    replies = iter(["hello", "/reset", "good film"])

    def fake_input(prompt=""):
        try:
            return next(replies)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)  # as on a terminal, which echoes the typing
    assert main(["chat", "--adapter", str(trained["run"]), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model>") == 2

    def interrupted(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "--model", str(trained["model"])]) == 0


def test_resume_cli_after_kill(trained, tmp_path, capsys):
    from lorakit.train.loop import SimulatedKill, train

    run = tmp_path / "r"
    cfg = TrainConfig(model=str(trained["model"]), data=str(trained["train"]), output=str(run), max_steps=4,
                      save_steps=2, precision="fp32")

    def kill(step, _loss):
        if step == 3:
            raise SimulatedKill
    with pytest.raises(SimulatedKill):
        train(cfg, progress=False, on_step=kill, log=lambda _m: None)
    assert not (run / "adapter_config.json").exists()
    assert main(["generate", "--adapter", str(run), "hi"]) == 2  # an unfinished run: clear error
    assert "checkpoint" in capsys.readouterr().err
    assert not (run / "eval.jsonl").exists()
    # held-out data added on resume: the run keeps the examples its table was measured on
    assert main(["train", "--resume", str(run), "--no-progress", "--eval-data", str(trained["eval"])]) == 0
    assert json.loads((run / "lorakit_run.json").read_text())["steps"] == 4
    assert (run / "eval.jsonl").read_text().count("\n") == Path(trained["eval"]).read_text().count("\n")


def test_gpt2_model_without_chat_template(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "gpt2", kind="gpt2")
    data = write_jsonl(toy_records(16), tmp_path / "t.jsonl")
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "2", "--no-progress",
                 "--output", str(tmp_path / "run"), "--batch-size", "4"]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_real_embedded_model_few_steps(tmp_path, capsys):
    """The embedded SmolLM2-135M-Instruct: a few LoRA steps on the bundled task, then generate."""
    pytest.importorskip("gguf")
    from lorakit.models import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    run = tmp_path / "run"
    code = main(["train", "--max-steps", "3", "--batch-size", "4", "--eval-samples", "8", "--output", str(run),
                 "--no-progress", "--max-train-samples", "64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out accuracy" in out and "trainable parameters" in out
    info = json.loads((run / "lorakit_run.json").read_text())
    assert info["trainable_params"] > 0 and info["before"]["n"] == 8
    assert all(x > 0 and x == x for x in (info["before"]["loss"], info["after"]["loss"]))
    assert main(["generate", "--adapter", str(run), "Review: a tender, funny film. Sentiment?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_sigkilled_cli_run_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """A real ``lorakit train`` process killed with SIGKILL two steps after its first checkpoint (its
    log then holds steps the checkpoint does not), then resumed. The kill comes from inside the run,
    at a fixed step: a test that polled for the checkpoint and then killed the process lost the race
    whenever it was kept off the CPU for the ~5 s the run took to finish after it."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--max-steps", "40",
            "--batch-size", "4", "--save-steps", "3", "--dropout", "0.1", "--precision", "fp32", "--threads", "1",
            "--no-progress"]
    killed = tmp_path / "killed"
    die_at_step_6 = (
        "import os, signal, sys\n"
        "import lorakit.train.loop as loop\n"
        "step_of = loop._accumulate_gradients\n"
        "def killing(model, micro, amp, dist, step, run_dir):\n"
        "    if step == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step_of(model, micro, amp, dist, step, run_dir)\n"
        "loop._accumulate_gradients = killing\n"
        "from lorakit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", die_at_step_6, *args, "--output", str(killed)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # killed before the end
    logged = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # (two steps past the checkpoint, which resume drops and redoes)
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert main([*args, "--output", str(tmp_path / "straight")]) == 0
    a = load_file(str(killed / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_eval_defaults_to_the_runs_max_length(trained, tmp_path, monkeypatch, capsys):
    """`lorakit eval --adapter RUN` evaluates as the run did (its max_length), so its table is reproduced."""
    import shutil

    import lorakit.train.generate as G

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    info = json.loads((run / "lorakit_run.json").read_text())
    info["config"]["max_length"] = 37
    (run / "lorakit_run.json").write_text(json.dumps(info))
    seen = []
    real = G.evaluate

    def spy(model, tok, examples, max_length, batch_size, *a, **k):
        seen.append(max_length)
        return real(model, tok, examples, max_length, batch_size, *a, **k)

    monkeypatch.setattr(G, "evaluate", spy)
    base = ["eval", "--model", str(trained["model"]), "--adapter", str(run), "--data", str(trained["eval"]), "--json"]
    assert main(base) == 0 and main(base + ["--max-length", "64"]) == 0
    assert main(["eval", "--model", str(trained["model"]), "--data", str(trained["eval"]), "--json"]) == 0
    assert seen == [37, 64, 512]


def test_an_answer_cut_away_by_max_length_counts_in_neither_metric(trained):
    from lorakit.train.data import load_examples, tokenize_example
    from lorakit.train.generate import evaluate, load_for_inference

    model, tok, _ = load_for_inference(str(trained["model"]), str(trained["run"]), "fp32")
    examples = load_examples(str(trained["eval"]), "test")[:6]
    long = type(examples[0])(messages=[{"role": "user", "content": " ".join(["good film"] * 40)},
                                       {"role": "assistant", "content": "positive"}])
    assert tokenize_example(tok, long, 48).n_labels == 0
    res = evaluate(model, tok, examples + [long], 48, 4)
    assert res["n"] == res["n_accuracy"] == 6


def test_chat_with_piped_input_echoes_each_line(trained, monkeypatch, capsys):
    """From a pipe nothing echoes the typed line: chat writes it, so the transcript has one turn a line."""
    import io

    lines = iter(["good film", "/exit"])

    def fake_input(prompt=""):
        print(prompt, end="")
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--adapter", str(trained["run"]), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "you> good film" in out and any(line.startswith("model> ") for line in out)


def test_eval_of_a_run_uses_its_precision_and_reproduces_its_table(trained, capsys):
    # the run trained and evaluated itself in fp32; eval without --precision used to take auto (bf16
    # where the CPU has it: 2.0763 instead of 1.9629 on the embedded model)
    info = json.loads((trained["run"] / "lorakit_run.json").read_text())
    assert info["precision"] == "fp32"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(trained["run"]), "--data", str(trained["run"] / "eval.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss"] == pytest.approx(info["after"]["loss"], rel=1e-6)


def test_a_qlora_run_is_evaluated_on_its_nf4_base(trained, tmp_path, capsys):
    from lorakit.layers.nf4_linear import LinearNF4
    from lorakit.train.generate import load_for_inference

    run = tmp_path / "qrun"
    assert main(["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--eval-data",
                 str(trained["eval"]), "--method", "qlora", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2",
                 "--precision", "fp32", "--output", str(run), "--no-progress", "--save-steps", "0"]) == 0
    info = json.loads((run / "lorakit_run.json").read_text())
    model, _, loaded = load_for_inference(None, str(run))
    assert loaded.get("quantized") == "nf4" and any(isinstance(m, LinearNF4) for m in model.modules())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(run / "eval.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(info["after"]["loss"], rel=1e-5)
    merged, _, _ = load_for_inference(None, str(run), merge=True)  # folded into the dense base
    assert not any(isinstance(m, LinearNF4) for m in merged.modules())
    # lorakit merge writes the same: the adapter in the dense base (it folded it into the NF4-rounded
    # weights before, unlike --merge)
    from transformers import AutoModelForCausalLM
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "qmerged")]) == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "qmerged").state_dict()
    expected = merged.state_dict()
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def test_eval_of_a_bf16_full_fine_tune_reproduces_its_table_and_refuses_model(trained, tmp_path, capsys):
    # a full fine-tune trains (and evaluates itself) with fp32 weights under bf16 autocast; eval loaded
    # bf16 weights (2.6380 vs the run's 2.6108) and ignored --model, even a missing one
    from lorakit.train.generate import load_for_inference

    run = tmp_path / "full"
    assert main(["train", "--model", str(trained["model"]), "--data", str(trained["train"]), "--eval-data",
                 str(trained["eval"]), "--method", "full", "--max-steps", "2", "--batch-size", "8",
                 "--precision", "bf16", "--output", str(run), "--no-progress", "--save-steps", "0"]) == 0
    info = json.loads((run / "lorakit_run.json").read_text())
    model, _, loaded = load_for_inference(None, str(run), None)
    assert loaded["amp"] == "bf16" and next(model.parameters()).dtype == torch.float32
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(run / "eval.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"loss      {info['after']['loss']:.4f}" in out and "+ adapter" not in out
    assert main(["eval", "--adapter", str(run), "--model", str(tmp_path / "nowhere"), "--data",
                 str(run / "eval.jsonl")]) == 2
    assert "so it takes no --model" in capsys.readouterr().err


def test_named_adapters_from_runs_of_different_precisions_ask_for_one(trained, tmp_path, capsys):
    # all adapters share one base: the precision used to be the first run's, so an adapter's reply
    # changed with its place in the list
    other = tmp_path / "bf16run"
    shutil.copytree(trained["run"], other)
    info = json.loads((other / "lorakit_run.json").read_text())
    (other / "lorakit_run.json").write_text(json.dumps(dict(info, precision="bf16")))
    args = ["generate", "--adapter", f"a={trained['run']}", "--adapter", f"b={other}", "--use", "a", "--use", "b",
            "x", "y", "--max-new-tokens", "2"]
    assert main(args) == 2
    assert "different precisions" in capsys.readouterr().err
    assert main(args + ["--precision", "fp32"]) == 0


def test_chat_refuses_an_unknown_command_and_sends_a_doubled_slash(trained, monkeypatch, capsys):
    # "/bogus" used to go to the model as a message
    import lorakit.train.generate as gen

    sent = []
    real = gen.encode_prompt
    monkeypatch.setattr(gen, "encode_prompt", lambda tok, msgs: sent.append(msgs[-1]["content"]) or real(tok, msgs))
    lines = iter(["/bogus", "//r/movies", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["chat", "--adapter", str(trained["run"]), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "unknown command /bogus" in out and out.count("model>") == 1
    assert sent == ["/r/movies"]


def test_chat_keeps_the_session_after_a_message_it_cannot_take(tmp_path, monkeypatch, capsys):
    """A message that is not Unicode text, or that overflows a GPT-2's 128 positions, is an error for that
    message; the session goes on (it used to end the chat, losing the conversation)."""
    model = save_tiny_model(tmp_path / "gpt2", kind="gpt2")
    lines = iter(["good \udcff film", "word " * 150, "hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["chat", "--model", str(model), "--max-new-tokens", "2", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "error: the message is not valid Unicode text" in out
    assert "exceeds the model's 128 positions" in out and "/reset starts a new conversation" in out
    assert out.count("model>") == 1  # "hi" was answered


def test_generate_and_data_name_text_that_is_not_unicode(trained, tmp_path, capsys):
    assert main(["generate", "--model", str(trained["model"]), "good \udcff film"]) == 2
    assert "the prompt is not valid Unicode text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "completion": "positive"}\n{"prompt": "good \\ud800 film", "completion": "x"}\n')
    assert main(["train", "--model", str(trained["model"]), "--data", str(bad), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: 'prompt' is not valid Unicode text" in err and not (tmp_path / "r").exists()
    # --system too, before any model loads (it was a tokenizer's TypeError; chat died at the first message)
    for cmd in (["generate", "--model", str(trained["model"]), "--system", "a \udcff b", "hi"],
                ["chat", "--model", str(trained["model"]), "--system", "a \udcff b"]):
        assert main(cmd) == 2
        assert "--system is not valid Unicode text" in capsys.readouterr().err


def test_generate_refuses_more_new_tokens_than_a_rotary_models_positions(trained, capsys):
    # (the tiny Llama was made for 128 positions; 10**11 new tokens ran until killed)
    assert main(["generate", "--model", str(trained["model"]), "--max-new-tokens", str(10**11), "hi"]) == 2
    assert "exceeds the model's 128 positions" in capsys.readouterr().err


def test_eval_cli_warns_of_examples_cut_away(trained, tmp_path, capsys):
    # train warned of examples whose answers --max-length cut away; eval only printed a smaller count
    data = tmp_path / "eval.jsonl"
    long = {"prompt": "Review : " + "the plot " * 60 + "Is this review positive or negative ?", "completion": "negative"}
    data.write_text(trained["eval"].read_text() + json.dumps(long) + "\n")
    assert main(["eval", "--adapter", str(trained["run"]), "--data", str(data), "--json", "--precision", "fp32",
                 "--max-length", "512"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["n_dropped"] == 0 and json.loads(out.out)["n"] == 17 and "warning" not in out.err
    assert main(["eval", "--adapter", str(trained["run"]), "--data", str(data), "--json", "--precision", "fp32",
                 "--max-length", "64"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["n_dropped"] == 1 and json.loads(out.out)["n"] == 16
    assert "warning: eval data: dropped 1 examples with no answer tokens within max_length=64" in out.err


def test_chat_survives_a_line_that_is_not_utf8_in_a_strict_locale(trained):
    # in a locale where Python decodes stdin strictly, the bad byte raised UnicodeDecodeError: the
    # session ended, and the good line before it (in the same buffered chunk) was never answered
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lorakit.cli", "chat", "--adapter", str(trained["run"]), "--max-new-tokens", "2"]
    proc = subprocess.run(cmd, input=b"good film\nbad \xff\xfe film\ngood film\n", capture_output=True, env=env,
                          timeout=300)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.count("model>") == 2 and "is not valid Unicode text" in out
    assert "you> bad \ufffd\ufffd film" in out


def test_generate_refuses_system_with_raw_and_takes_an_empty_system_as_given(trained, capsys, monkeypatch):
    assert main(["generate", "--adapter", str(trained["run"]), "--raw", "--system", "be brief", "good"]) == 2
    assert "--system is a chat turn" in capsys.readouterr().err
    import lorakit.train.data as data

    seen = []
    real = data.encode_prompt
    monkeypatch.setattr(data, "encode_prompt", lambda tok, msgs: seen.append(msgs) or real(tok, msgs))
    assert main(["generate", "--adapter", str(trained["run"]), "--system", "", "--max-new-tokens", "1", "good"]) == 0
    assert seen[-1][0] == {"role": "system", "content": ""}  # was dropped: the template's default came back


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_mut")
    return save_tiny_model(d / "model"), write_jsonl(toy_records(32), d / "train.jsonl")


def _train_args(files, out):
    model, data = files
    return ["train", "--model", str(model), "--data", str(data), "--max-steps", "4", "--batch-size", "8",
            "--precision", "fp32", "--output", str(out), "--no-progress", "--target-modules", "q_proj,v_proj"]


def _at_step(n, action, monkeypatch):
    real = loop._accumulate_gradients

    def wrapped(model, micro, amp, dist, step, run_dir):
        if step == n:
            action(model)
        return real(model, micro, amp, dist, step, run_dir)
    monkeypatch.setattr(loop, "_accumulate_gradients", wrapped)


# C2: an interrupted run (Ctrl-C: checkpoint saved) exits with 130, as a shell expects of SIGINT
def test_train_cli_exits_130_when_interrupted(tmp_path, files, monkeypatch, capsys):
    _at_step(1, lambda _m: os.kill(os.getpid(), signal.SIGINT), monkeypatch)
    assert main(_train_args(files, tmp_path / "run")) == 130
    assert (tmp_path / "run" / "checkpoint").is_dir()


# C3: a diverged run exits with 1 (its message printed), not 2 (the code of a usage error)
def test_train_cli_exits_1_when_the_loss_diverges(tmp_path, files, monkeypatch, capsys):
    def poison(model):
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    _at_step(1, poison, monkeypatch)
    assert main(_train_args(files, tmp_path / "run")) == 1
    assert "non-finite" in capsys.readouterr().err


# C4: --dropout (and --alpha) mean nothing to a full fine-tune either: named in the warning
def test_full_method_warns_about_alpha_and_dropout_too(capsys):
    from lorakit.cli import build_parser
    from lorakit.train.cli import config_from_args

    config_from_args(build_parser().parse_args(["train", "--method", "full", "--alpha", "32", "--dropout", "0.1"]))
    err = capsys.readouterr().err
    assert "warning: --method full" in err and "--alpha, --dropout" in err


# C5: --resume continues in the directory it is given (a run directory moved since still resumes there)
def test_resume_continues_in_the_directory_given_even_after_a_move(tmp_path, files, monkeypatch, capsys):
    _at_step(1, lambda _m: os.kill(os.getpid(), signal.SIGINT), monkeypatch)
    assert main(_train_args(files, tmp_path / "first")) == 130
    monkeypatch.undo()
    os.rename(tmp_path / "first", tmp_path / "moved")
    assert main(["train", "--resume", str(tmp_path / "moved"), "--no-progress"]) == 0
    assert (tmp_path / "moved" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "first").exists()


# ---- mutation round 6 (/tmp/mutants6): configuration and command-line boundaries
def test_seed_2_pow_63_is_refused():
    with pytest.raises(ValueError, match="seed"):
        TrainConfig(seed=2**63).validate()
    TrainConfig(seed=2**63 - 1).validate()


def test_alpha_zero_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig(alpha=0).validate()


def test_a_yes_no_option_refuses_other_words():
    with pytest.raises(ValueError, match="use_rslora"):
        TrainConfig.from_dict({"use_rslora": "maybe"})
    assert TrainConfig.from_dict({"use_rslora": "yes"}).use_rslora is True


def test_an_integer_option_refuses_a_fraction():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.from_dict({"max_steps": 2.5})
    assert TrainConfig.from_dict({"max_steps": 3.0}).max_steps == 3


def test_resume_with_output_is_refused_by_name(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--output", str(tmp_path / "other")]) == 2
    assert "--output cannot be combined with --resume" in capsys.readouterr().err


def test_generate_refuses_zero_new_tokens_before_loading(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_one_use_takes_the_words_as_one_prompt(tmp_path, capsys):
    import lorakit as lk
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    base_dir = tmp_path / "base"
    tiny_llama_lm(tok).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    torch.manual_seed(1)
    m = lk.get_lora_model(tiny_llama_lm(tok), lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "pos")
    lk.save_adapter(m, tmp_path / "pos", adapter_name="pos")
    common = ["generate", "--model", str(base_dir), "--raw", "--precision", "fp32", "--max-new-tokens", "2",
              "--adapter", f"pos={tmp_path / 'pos'}", "--use", "pos"]
    assert main(common + ["good", "film"]) == 0  # one --use: the words form one prompt (as without --use)
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


@pytest.mark.parametrize("terminal", [False, True])
def test_the_progress_bar_only_on_a_terminal_else_log_lines(tmp_path, files, monkeypatch, capsys, terminal):
    """Redirected to a file, stderr got every redrawn tqdm frame; now the run prints a line every
    --logging-steps there instead, and the bar stays for a terminal."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    args = [a for a in _train_args(files, tmp_path / "run") if a != "--no-progress"]
    assert main([*args, "--logging-steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert ("step 2/4 loss" in out and "step 4/4 loss" in out) is not terminal
    assert ("train:" in err and "4/4" in err) is terminal


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


@pytest.mark.parametrize("stream", ["closed", "no_isatty"])
def test_stderr_that_cannot_say_is_not_a_terminal(monkeypatch, stream):  # T03, T04
    from lorakit.train.cli import _stderr_is_terminal

    if stream == "closed":
        s = io.StringIO()
        s.close()  # (isatty on a closed file: ValueError)
    else:
        s = object()  # (a stand-in without isatty: AttributeError)
    monkeypatch.setattr(sys, "stderr", s)
    assert _stderr_is_terminal() is False


def test_no_progress_on_a_terminal_prints_log_lines_and_no_bar(tmp_path, monkeypatch, capsys):  # T05, T06
    from tiny_lm import save_tiny_model, toy_records, write_jsonl

    from lorakit.cli import main

    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(toy_records(32), tmp_path / "train.jsonl")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    args = ["train", "--model", str(model), "--data", str(data), "--max-steps", "4", "--batch-size", "8",
            "--precision", "fp32", "--output", str(tmp_path / "run"), "--no-progress",
            "--target-modules", "q_proj,v_proj", "--logging-steps", "2"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "step 2/4 loss" in out and "step 4/4 loss" in out
    assert not ("train:" in err and "4/4" in err)
