"""Tests from mutation round 10 (/tmp/mutants10: 104 mutants of the model cache and its lock, the cache
command, precision / thread / JSON helpers, peak memory and quoting, run-directory claims and locks,
atomic writes and the merge blockers; 54 caught, 1 equivalent): one test per surviving mutant, each
checked to fail on it (named in the comment above it, with the file it mutated)."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorakit import models


# m01 models.py cache_dir: LORAKIT_CACHE_DIR's "~" expanded
def test_a_cache_dir_override_with_a_tilde_is_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAKIT_CACHE_DIR", "~/mine")
    assert models.cache_dir() == tmp_path / "home" / "mine"


# m04 / m05 models.py cache_dir: relative $HOME and no usable passwd entry
@pytest.mark.parametrize("entry", ["missing", "relative"])
def test_a_relative_home_without_a_usable_passwd_entry_is_a_clear_error(monkeypatch, entry):
    import pwd

    monkeypatch.delenv("LORAKIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "relative/home")

    def getpwuid(uid):
        if entry == "missing":  # (a container run as an arbitrary uid)
            raise KeyError(f"getpwuid(): uid not found: {uid}")
        return SimpleNamespace(pw_dir="")
    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    with pytest.raises(OSError, match="no home directory to keep lorakit's cache in"):
        models.cache_dir()


# m11 / m12 models.py entry_complete: a marker that is not JSON, or JSON but not an object
@pytest.mark.parametrize("marker", ["[1, 2]", '"config.json"', "{not json", "\xff"])
def test_a_completion_marker_that_is_not_an_object_of_sizes_is_a_damaged_entry(tmp_path, marker):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / models.COMPLETE_MARKER).write_text(marker, encoding="latin-1")
    assert models.entry_complete(tmp_path) is False
    (tmp_path / models.COMPLETE_MARKER).write_text('{"config.json": 2}')
    assert models.entry_complete(tmp_path) is True


# m14 models.py _remove_entry: an entry another process removed first is not counted as removed
def test_removing_an_entry_already_gone_reports_false(tmp_path, monkeypatch):
    assert models._remove_entry(tmp_path / "gone", "removing") is False
    entry = tmp_path / "models" / "SmolLM2-135M-Instruct-Q4_1-other"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "default_entry_path", lambda gguf=None: tmp_path / "models" / "mine")
    listed = models.cache_entries()

    def listed_then_removed_elsewhere():  # (another clean renamed it away after this one listed it)
        models._remove_entry(entry, "removing")
        return listed
    monkeypatch.setattr(models, "cache_entries", listed_then_removed_elsewhere)
    assert models.clean_cache() == ([], [])


# m18 models.py _entry_lock: a file system without flock (ENOLCK) loads and cleans unlocked
def test_a_cache_on_a_file_system_without_flock_loads_and_cleans_unlocked(fake_gguf, monkeypatch):
    import errno
    import fcntl

    import transformers

    version = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    other = models.default_model_path()
    monkeypatch.setattr(transformers, "__version__", version)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    model, tok = models.load_model_and_tokenizer()
    assert len(fake_gguf) == 2 and tok.pad_token is not None
    removed, failed = models.clean_cache()
    assert [e.path for e in removed] == [other] and failed == []


# m17 models.py _entry_lock: a load waits for a clean's exclusive lock rather than giving up
def test_a_load_waits_for_a_clean_holding_the_entry(fake_gguf):
    import fcntl
    import threading

    entry = models.default_model_path()
    fd = os.open(entry, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a clean deciding about it)
    timer = threading.Timer(0.5, lambda: os.close(fd))  # (it finds it in use and lets go)
    timer.start()
    try:
        tok = models.load_tokenizer()
    finally:
        timer.join()
    assert tok.pad_token is not None and len(fake_gguf) == 1


# m23 / m26 models.py cache_entries: what a damaged entry's removal left is a leftover; nested files count
def test_a_damaged_entry_s_leftover_goes_at_once_and_nested_files_are_counted(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "default_entry_path", lambda gguf=None: tmp_path / "models" / "mine")
    left = tmp_path / "models" / ".SmolLM2-135M-Instruct-Q4_1-x.broken-4242"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "model.safetensors").write_bytes(bytes(1000))
    (entry,) = models.cache_entries()
    assert entry.state == "leftover" and entry.bytes == 1000
    removed, failed = models.clean_cache()
    assert [e.path for e in removed] == [left] and failed == [] and not left.exists()


# m15 models.py _remove_entry: an entry that is a symlink to a directory: the link goes, not what it points at
def test_clean_removes_a_symlinked_entry_not_its_target(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_entry_path", lambda gguf=None: tmp_path / "cache" / "models" / "mine")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (tmp_path / "cache" / "models").mkdir(parents=True)
    link = tmp_path / "cache" / "models" / "SmolLM2-linked"
    link.symlink_to(target)
    removed, failed = models.clean_cache()
    assert [e.path for e in removed] == [link] and failed == []
    assert not os.path.lexists(link) and (target / "config.json").is_file()


# m29 models.py clean_cache: a temporary stays until an hour after its last change (a slow conversion runs now)
def test_clean_keeps_a_temporary_changed_ten_minutes_ago(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "default_entry_path", lambda gguf=None: tmp_path / "models" / "mine")
    tmp = tmp_path / "models" / ".mine.abc123"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(bytes(10))
    ten_minutes_ago = time.time() - 600
    for p in (tmp / "model.safetensors", tmp):
        os.utime(p, (ten_minutes_ago, ten_minutes_ago))
    assert models.clean_cache() == ([], []) and tmp.is_dir()
    hours_ago = time.time() - 3700
    for p in (tmp / "model.safetensors", tmp):
        os.utime(p, (hours_ago, hours_ago))
    assert [e.path for e in models.clean_cache()[0]] == [tmp]


# m31 models.py convert_gguf: a cache directory not writable is refused before the ~20 s conversion
def test_an_unwritable_cache_directory_is_refused_before_converting(fake_gguf, monkeypatch, tmp_path):
    access = os.access
    models_dir = tmp_path / "cache" / "models"
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == models_dir else access(p, mode, **k))
    with pytest.raises(OSError, match="the directory is not writable .*set LORAKIT_CACHE_DIR"):
        models.default_model_path()
    assert not fake_gguf


# m33 / m34 models.py convert_gguf: the entry is readable by other users of a shared cache
def test_a_converted_entry_has_ordinary_modes(fake_gguf):
    import stat

    entry = models.default_model_path()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in entry.iterdir()} == {0o644}


# m38 models.py resolve_model_path: a full fine-tune's run directory points at its model/
def test_a_full_fine_tune_run_directory_points_at_its_model(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="its model/ has one: give .*run/model"):
        models.resolve_model_path(tmp_path / "run")


# m35 models.py convert_gguf: another process finished the same conversion first: theirs is kept
def test_a_conversion_finished_first_elsewhere_is_kept(fake_gguf):
    entry = models.default_model_path()
    assert models.convert_gguf(models.default_gguf_path(), entry) == entry
    assert models.entry_complete(entry) and [p.name for p in entry.parent.iterdir()] == [entry.name]


# m37 models.py resolve_model_path: "default" names the embedded model
def test_default_is_the_embedded_model(fake_gguf):
    assert models.resolve_model_path("default") == models.default_model_path()


# m44 / m46 models.py _unreadable_model: a long reason is cut; the tokenizer hint only for a tokenizer's error
def test_an_unreadable_model_s_reason_is_cut_and_hints_only_what_applies(tmp_path):
    with pytest.raises(ValueError) as info, models._unreadable_model(tmp_path):
        raise OSError("x" * 1000)
    assert str(info.value).endswith("x ...") and len(str(info.value)) < 300 + len(str(tmp_path)) + 100
    with pytest.raises(ValueError) as info, models._unreadable_model(tmp_path):
        raise ValueError("the weights are truncated")
    assert "tokenizer" not in str(info.value)


# m45 models.py _unreadable_model: a damaged cache entry says to delete it
def test_an_unreadable_cache_entry_says_delete_it(tmp_path):
    (tmp_path / models.COMPLETE_MARKER).write_text("{}")
    with pytest.raises(ValueError, match="; delete .* and it is converted again"), models._unreadable_model(tmp_path):
        raise OSError("truncated")


# m48 models.py load_tokenizer: a tokenizer saved without a pad token gets eos, as with the pair
def test_load_tokenizer_gives_a_pad_token(tmp_path):
    from tiny_lm import save_tiny_model, tiny_tokenizer

    path = save_tiny_model(tmp_path / "m", kind="llama")
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    alone = models.load_tokenizer(path)
    assert alone.eos_token is not None and alone.pad_token == alone.eos_token


def _cache_with_a_running_conversion(fake_gguf, monkeypatch):
    import transformers

    version = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    other = models.default_model_path()
    monkeypatch.setattr(transformers, "__version__", version)
    current = models.default_model_path()
    fresh = current.parent / f".{current.name}.xyz789"  # (a conversion running now: stays)
    fresh.mkdir()
    return current, other, fresh


# c02 / c04 cli.py cmd_cache: paths relative to the cache; the --clean hint not after a clean
def test_cache_command_lists_relative_paths_and_gives_the_clean_hint_only_when_listing(fake_gguf, monkeypatch, capsys):
    from lorakit.cli import main

    current, other, fresh = _cache_with_a_running_conversion(fake_gguf, monkeypatch)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"\n  models/{current.name}  " in out and f"\n  models/{other.name}  " in out and "cache --clean deletes" in out
    assert main(["cache", "--clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed models/{other.name}" in out and f"\n  models/{fresh.name}  " in out
    assert "cache --clean deletes" not in out


# g02 / g03 generate.py cpu_supports_bf16: a failing probe is no answer; AMX's bf16 in /proc/cpuinfo counts
def test_bf16_detection_goes_past_a_failing_probe_and_reads_amx_from_cpuinfo(monkeypatch):
    import io

    import torch

    from lorakit.train import generate as gen

    def broken():
        raise RuntimeError("no cpuinfo")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert gen.cpu_supports_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(gen, "open", lambda *a, **k: io.StringIO("flags\t\t: fpu sse2 amx_bf16 amx_tile\n"), raising=False)
    assert gen.cpu_supports_bf16()


# g06 / g07 generate.py busy_cores: iowait is idle time; no time passing is no answer (not a ZeroDivisionError)
def test_busy_cores_counts_iowait_as_idle_and_needs_time_to_pass(monkeypatch):
    import io
    import time

    from lorakit.train import generate as gen

    samples = ["cpu  100 0 100 1000 500 0 0 0 0 0\n", "cpu  100 0 100 1000 1500 0 0 0 0 0\n"]
    monkeypatch.setattr(time, "sleep", lambda s: None)
    monkeypatch.setattr(gen, "open", lambda *a, **k: io.StringIO(samples.pop(0)), raising=False)
    assert gen.busy_cores() == 0.0  # (all of the window waiting on a disk: nothing busy)
    samples = ["cpu  100 0 100 1000 500 0 0 0 0 0\n"] * 2
    assert gen.busy_cores() is None


# g11 generate.py auto_threads: a requested count is set, not only returned
def test_auto_threads_sets_a_requested_count():
    import torch

    from lorakit.train import generate as gen

    before = torch.get_num_threads()
    try:
        assert gen.auto_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# g15 generate.py read_json_object: a file that is not UTF-8 is named as such
def test_a_json_file_that_is_not_utf8_is_named(tmp_path):
    from lorakit.train import generate as gen

    path = tmp_path / "lorakit_run.json"
    path.write_bytes(b'{"base": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"lorakit_run.json: not UTF-8 text \(.* at byte 13\)"):
        gen.read_run_info(tmp_path)


# l01 loop.py peak_memory_mb: macOS reports ru_maxrss in bytes, Linux in KiB
@pytest.mark.parametrize("platform, mb", [("darwin", 1024.0), ("linux", 2.0**20)])
def test_peak_memory_reads_ru_maxrss_in_the_platform_s_unit(monkeypatch, platform, mb):
    import resource
    import sys

    from lorakit.train import loop

    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=2**30))
    monkeypatch.setattr(sys, "platform", platform)
    assert loop.peak_memory_mb() == mb


# l02 loop.py peak_memory_mb: without resource, a psutil without peak_wset (not Windows) is NaN, not an error
def test_peak_memory_without_resource_and_without_peak_wset_is_nan(monkeypatch):
    import math
    import sys

    from lorakit.train import loop

    monkeypatch.setitem(sys.modules, "resource", None)
    fake = SimpleNamespace(Process=lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=1)))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert math.isnan(loop.peak_memory_mb())


# l03 / l04 loop.py shell_quote: Windows: ^ ( ) need quotes too; an argument list2cmdline quoted is not quoted twice
def test_windows_quoting_covers_caret_and_parentheses_and_never_doubles_quotes():
    from lorakit.train.loop import shell_quote

    assert shell_quote(r"C:\runs\a(1)", windows=True) == r'"C:\runs\a(1)"'
    assert shell_quote(r"C:\runs\a^b", windows=True) == r'"C:\runs\a^b"'
    assert shell_quote(r"C:\my runs\a&b", windows=True) == r'"C:\my runs\a&b"'


# l11 loop.py _claim_run_dir: an --output that became a file (after the CLI's checks) is refused as taken
def test_claiming_a_run_directory_that_is_a_file_is_refused(tmp_path):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import _claim_run_dir

    out = tmp_path / "run"
    out.write_text("not a directory")
    with pytest.raises(FileExistsError, match="already holds files"):
        _claim_run_dir(out, TrainConfig(output=str(out)), unique=False)


# i02 io.py default_mode: the process's umask is given back
def test_default_mode_leaves_the_umask_as_it_was():
    from lorakit.io import default_mode

    old = os.umask(0o027)
    try:
        assert default_mode() == 0o640 and default_mode(directory=True) == 0o750
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


# i04 / i05 io.py atomic_write_bytes: data reaches the disk before the rename; a Ctrl-C leaves no temporary
def test_atomic_write_syncs_and_a_ctrl_c_leaves_no_temporary(tmp_path, monkeypatch):
    from lorakit.io import atomic_write_bytes

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert synced and (tmp_path / "a.json").read_bytes() == b"{}"

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "a.json", b"{1}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# i08 / i09 / i10 / i12 io.py remove_stale_temporaries: stale files and directories go, even under a name
# with glob characters; a ten-minute-old one (a write running now) stays
def test_stale_temporaries_go_whatever_the_name_and_young_ones_stay(tmp_path):
    import time

    from lorakit.io import remove_stale_temporaries

    out = tmp_path / "merged[1]"
    stale_dir, stale_file, young = (tmp_path / ".merged[1].abc.tmp", tmp_path / ".merged[1].def.tmp",
                                    tmp_path / ".merged[1].ghi.tmp")
    stale_dir.mkdir()
    stale_file.write_bytes(b"x")
    young.mkdir()
    for p, age in ((stale_dir, 7200), (stale_file, 7200), (young, 600)):
        t = time.time() - age
        os.utime(p, (t, t))
    remove_stale_temporaries(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [young.name]


# l12 loop.py _claim_run_dir: train_config.yaml is created exclusively: a run that got there first keeps it
def test_a_run_directory_taken_between_mkdir_and_claim_is_refused(tmp_path, monkeypatch):
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import _claim_run_dir

    out = tmp_path / "run"
    mkdir = Path.mkdir

    def mkdir_then_another_run_claims(self, *a, **k):
        mkdir(self, *a, **k)
        if self == out:
            (out / "train_config.yaml").write_text("# the other run's\n")
    monkeypatch.setattr(Path, "mkdir", mkdir_then_another_run_claims)
    with pytest.raises(FileExistsError, match="was just taken by another run"):
        _claim_run_dir(out, TrainConfig(output=str(out)), unique=False)
    assert (out / "train_config.yaml").read_text() == "# the other run's\n"


# l14 loop.py lock_run_dir: a directory that cannot be opened is run unlocked (None), not an error
def test_lock_run_dir_of_a_directory_it_cannot_open_is_none(tmp_path):
    from lorakit.train.loop import lock_run_dir

    assert lock_run_dir(tmp_path / "missing") is None


# b02 / b03 / b04 / b05 layers/base.py: what is and is not an unwritable weight
def test_unwritable_weight_names_only_what_cannot_be_written():
    import torch
    from torch import nn

    from lorakit.layers.base import computed_weight, float8_weight, meta_weight, unwritable_weight

    on_meta = nn.Linear(4, 4, device="meta")
    assert "the model is not materialised" in meta_weight(on_meta, "unmerged")
    int8 = nn.Linear(4, 4)
    int8.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert float8_weight(int8, "unmerged") is None  # (not a float: not float8's refusal)
    buffered = nn.Linear(4, 4)
    w = buffered.weight.detach().clone()
    del buffered.weight
    buffered.register_buffer("weight", w)  # (a buffer is a tensor of its own: writable)
    assert unwritable_weight(buffered, "unmerged") is None

    class Quantised(nn.Module):  # (merges into a dense copy of its own)
        def __init__(self):
            super().__init__()
            self.packed = nn.Parameter(torch.zeros(8), requires_grad=False)

        @property
        def weight(self):
            return self.packed.view(2, 4)

        def dequantize_weight(self):
            return self.weight.float()
    assert computed_weight(Quantised(), "unmerged") is None


# b07 / b08 layers/base.py refuse_meta_adapters: lora_B alone on meta is refused; names without weights pass
def test_refuse_meta_adapters_checks_b_too_and_skips_unknown_names():
    import torch
    from torch import nn

    import lorakit as lk
    from conftest import tiny_llama

    model = tiny_llama()
    lk.get_lora_model(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    _, layer = next(iter(lk.iter_lora_layers(model)))
    layer.refuse_meta_adapters(["default", "not-an-adapter"])
    layer.lora_B["default"] = nn.Parameter(torch.empty_like(layer.lora_B["default"], device="meta"))
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['default'\] are on the meta device"):
        layer.refuse_meta_adapters(["default"])


# i06 / i07 io.py write_new_directory: something that appeared at out meanwhile is refused as such; the result
# gets ordinary modes (mkdtemp's is private)
def test_write_new_directory_refuses_what_appeared_meanwhile_and_gives_ordinary_modes(tmp_path):
    import stat

    from lorakit.io import default_mode, write_new_directory

    out = tmp_path / "merged"
    write_new_directory(out, lambda tmp: (tmp / "a.bin").write_bytes(b"x"))
    assert stat.S_IMODE(out.stat().st_mode) == default_mode(directory=True)
    assert stat.S_IMODE((out / "a.bin").stat().st_mode) == default_mode()

    def meanwhile(tmp):
        (tmp / "a.bin").write_bytes(b"x")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "theirs").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        write_new_directory(tmp_path / "other", meanwhile)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["theirs"]
