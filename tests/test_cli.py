"""The ``lorakit`` entry point itself: exit codes and what reaches stderr."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_a_closed_pipe_stops_quietly():
    """``lorakit ... | head -1``: once the reader has gone, no BrokenPipeError traceback."""
    code = ("import os, sys\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"  # stdout: a pipe nobody reads
            "from lorakit.cli import main\n"
            "sys.exit(main(['lowrank', '--no-plot']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


@pytest.mark.parametrize("module", ["lorakit.cli", "lorakit"])  # (python -m lorakit: lorakit/__main__.py)
def test_user_errors_are_one_line_with_exit_2(tmp_path, module):
    proc = subprocess.run([sys.executable, "-m", module, "inspect", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lorakit inspect: error: ") and "Traceback" not in proc.stderr


def test_a_report_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys):
    from lorakit.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["lowrank", "--out", str(afile)]) == 2
    captured = capsys.readouterr()
    assert f"--out {str(afile)!r} is a file" in captured.err and "LoRA factors" not in captured.out
    assert afile.read_text() == "keep me"


def test_system_errors_name_the_path_without_the_errno(tmp_path, capsys):
    from lorakit.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["train", "--output", str(tmp_path / "afile" / "sub"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "[Errno" not in err and f"Not a directory: {str(tmp_path / 'afile' / 'sub')!r}" in err, err


def test_the_package_imports_without_torch_and_resolves_every_public_name():
    # `import lorakit` (and so the `lorakit` command's own module) must not import torch: the
    # command's Ctrl-C handling starts only once its module is imported
    code = ("import sys, lorakit, lorakit.cli; print('torch' in sys.modules); "
            "print(all(getattr(lorakit, n) is not None for n in lorakit.__all__)); "
            "print(set(lorakit.__all__) <= set(dir(lorakit)) and set(lorakit.__all__) == {*lorakit._EXPORTS, '__version__'})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
    import lorakit
    from lorakit.inject import get_lora_model

    assert lorakit.get_lora_model is get_lora_model
    try:
        lorakit.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_help_builds_every_parser_without_importing_torch():
    # `lorakit --help`, a command's --help and a mistyped option answer at once (importing torch
    # took ~1.4 s of every such call); lorakit.analysis still resolves every public name
    code = ("import sys, contextlib, io\n"
            "from lorakit.cli import build_parser\n"
            "parser = build_parser()\n"
            "commands = parser._subparsers._group_actions[0].choices\n"
            "for name in commands:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            parser.parse_args([name, '--help'])\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print(len(commands), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
            "import lorakit.analysis as a\n"
            "print(all(getattr(a, n) is not None for n in a.__all__), set(a.__all__) <= set(dir(a)),\n"
            "      set(a.__all__) == set(a._EXPORTS), a.lowrank.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert int(out[0].split()[0]) >= 10 and out[0].endswith(" []"), out
    # every public name is exported lazily, and submodules are attributes as an eager package has them
    assert out[1] == "True True True lorakit.analysis.lowrank", out


@pytest.mark.parametrize("where", ["parser", "torch"])
def test_ctrl_c_while_the_command_loads_says_interrupted(monkeypatch, capsys, where):
    import builtins

    from lorakit import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    if where == "parser":
        monkeypatch.setattr(cli, "build_parser", interrupted)
    else:  # the import of torch once the command is known (a second or more on a cold start)
        real_import = builtins.__import__
        monkeypatch.setattr(builtins, "__import__",
                            lambda name, *a, **k: interrupted() if name == "torch" else real_import(name, *a, **k))
    try:
        rc = cli.main(["estimate"])
    except KeyboardInterrupt:  # (raised on: pytest would stop the whole session)
        raise AssertionError("the KeyboardInterrupt escaped lorakit.cli.main") from None
    assert rc == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_command_gives_the_callers_thread_count_back(monkeypatch, capsys):
    """``lorakit generate`` / ``chat`` / ``eval`` pick their thread count from how busy the machine is
    (``auto_threads``); called in-process (``main([...])``) they lowered the caller's for good."""
    import torch

    import lorakit.train.generate as gen
    from lorakit.cli import main

    before = torch.get_num_threads()
    monkeypatch.setattr(gen, "auto_threads", lambda requested=0: torch.set_num_threads(1) or 1)
    assert main(["generate", "--max-new-tokens", "0", "hi"]) == 2  # refused after the threads were picked
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_an_ascii_only_stdout_gets_escapes_not_a_crash():
    # PYTHONIOENCODING=ascii: lowrank's table (a "‖" in it) raised UnicodeEncodeError: exit 2, no table
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "lowrank", "--size", "64", "--no-plot"], env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")
    out = proc.stdout.decode("ascii")  # only ASCII came out
    assert "\\u2016" in out and "rank" in out
    code = ("import sys\nfrom lorakit.cli import main\nmain([])\n")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii:surrogateescape"}
    proc = subprocess.run([sys.executable, "-c", code + "print(sys.stdout.errors)"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split()[-1] == "surrogateescape"  # a non-strict choice is kept (C locale's)


def test_chat_with_stdin_closed_says_so(monkeypatch):
    from lorakit.train.generate import chat_loop

    monkeypatch.setattr(sys, "stdin", None)  # `lorakit chat <&-`: AttributeError on None.isatty
    with pytest.raises(ValueError, match="standard input, which is closed"):
        chat_loop(None, None, 4, "fp32")


def test_a_relative_home_is_not_where_the_cache_goes(monkeypatch):
    import pwd

    from lorakit.models import cache_dir

    for name in ("LORAKIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "relative/home")  # built the 517 MB cache under the current directory
    assert cache_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "lorakit"
    monkeypatch.setenv("HOME", "/abs/home")
    assert cache_dir() == Path("/abs/home/.cache/lorakit")


def test_a_training_runs_messages_outlive_its_stdout(monkeypatch, capsys):
    # `lorakit train | head -4`: the failed write ended the run (a run without a checkpoint was
    # deleted); now its messages go to stderr and the run goes on
    import io

    from lorakit.train.cli import stdout_log

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("no fd")

    log = stdout_log()
    log("step 1")
    monkeypatch.setattr(sys, "stdout", Gone())
    log("step 2")
    log("step 3")
    err = capsys.readouterr().err
    assert "stdout cannot be written any more" in err and err.index("step 2") < err.index("step 3")
    assert "step 1" not in err


# ---- mutation round 7 (/tmp/mutants7): each test fails on a planted mutant


def test_help_lists_the_training_commands_before_the_analysis_ones(capsys):  # CL2
    from lorakit.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    assert listed.index("train") < listed.index("merge") < listed.index("lowrank") < listed.index("sweep")
