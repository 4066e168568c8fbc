"""Save and load adapters in Hugging Face PEFT's on-disk format.

A directory holds ``adapter_config.json`` (see ``LoraConfig.to_dict``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.<name>``:
``lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r) for linear-like layers (GPT-2 Conv1D
included), ``lora_embedding_A`` (r, num) / ``lora_embedding_B`` (dim, r) for embeddings, biases as
``<path>.base_layer.bias`` or ``<path>.bias``, and ``modules_to_save`` as full module tensors.
The adapter's name never appears in a key. Loading never unpickles, checks every key and shape
before touching the model, and leaves the model unchanged when anything is wrong.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lorakit.config import CONFIG_NAME, LoraConfig, read_json_object
from lorakit.inject import (ModulesToSave, _find_saved_module_names, _remove_adapter_everywhere,
                            find_target_modules, get_state, inject_adapter, iter_lora_layers,
                            iter_saved_modules, lora_and_saved_modules, mark_trainable, model_biases, require_state,
                            target_modules_for_file, with_task_heads)
from lorakit.layers import LoraLayer, lora_class_for
from lorakit.variants import variant_for

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` / ``mkdir`` would give a new file / directory under the umask
    (temporary files and ``safetensors.save_file`` make theirs private: 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def ordinary_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it ``default_mode`` permissions (after writing it
    through private temporary files), so an adapter or model can be read like any other file."""
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(directory=path.is_dir()))


def check_new_directory(out: str | Path) -> None:
    """Refuse an output directory that would overwrite something: ``out`` may not exist yet or be
    an empty directory (``--out`` of merge, extract and resize).

    Raises:
        FileExistsError: ``out`` is a file, or a directory that holds anything.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file, not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {str(out)!r} already exists and is not empty")


def _failed_write(exc: BaseException) -> bool:
    """Whether ``exc`` is a library's report of a failed file write: safetensors' ``SafetensorError``
    ("No space left on device" inside), torch.save's ``RuntimeError`` from its zip writer
    ("[enforce fail at inline_container.cc] unexpected pos")."""
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":  # (not its refusals of what it was given: shared tensors, ...)
        return "IoError" in text or "No space left" in text or "os error" in text.lower()
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                              or "No space left on device" in text)


@contextlib.contextmanager
def writing(where: str | Path) -> Any:
    """Report a failed write under ``where`` (a full disk, a lost mount) as an ``OSError`` naming it.

    safetensors and ``torch.save`` report a failed write with their own exception types, and an
    ``OSError`` from a plain write names no file ("[Errno 28] No space left on device"): the command
    line printed a traceback, or an error that did not say where. Other exceptions pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(where)) from exc
        raise
    except Exception as exc:
        if _failed_write(exc):
            raise OSError(f"could not write into {str(where)!r} ({exc}); is the disk full?") from exc
        raise


def write_new_directory(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Create the directory ``out`` atomically: ``write(tmp)`` fills a temporary sibling, which gets
    ordinary permissions and is then renamed to ``out``, so a failure (or Ctrl-C) leaves no
    half-written directory. ``out`` must not exist or be empty (``check_new_directory``, checked
    again just before the rename). Returns ``out`` as a Path.
    """
    out = Path(out)
    check_new_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with writing(out.parent):
            write(tmp)
        ordinary_modes(tmp)  # mkdtemp and safetensors make theirs private
        check_new_directory(out)  # something may have appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone after the rename)
    return out


def remove_stale_temporaries(out: Path, age_s: float = 3600.0, suffix: str = ".tmp") -> None:
    """Delete the temporary siblings (``.<name>.*<suffix>``) that writes of ``out`` killed an hour or
    more ago left behind (a merge's can be the size of the model); a write running now is younger."""
    now = time.time()
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.*{suffix}"):
        try:
            if now - leftover.stat().st_mtime > age_s:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        except OSError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    atomic_write_file(path, lambda handle, _name: handle.write(data))


def atomic_write_file(path: str | Path, write: Callable[[Any, str], Any]) -> None:
    """Write ``path`` through a temporary file in the same directory, synced to disk, and a rename:
    ``write(handle, name)`` fills the temporary, through ``handle`` (open for writing in binary) or
    by its ``name`` (a writer that opens the file itself, as ``safetensors.torch.save_file``: 19.5 MB
    of tensors took 39 ms so, against 156 through ``save``'s bytes and a Python write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path.parent):
            with os.fdopen(fd, "wb") as handle:
                write(handle, tmp)
            # Synced and given its mode by name: a writer by name may have put a new file there
            # (save_file writes one of its own and renames it over the temporary).
            synced = os.open(tmp, os.O_RDWR | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(synced)
                if hasattr(os, "fchmod"):  # (not on Windows before Python 3.13, where modes are no matter)
                    os.fchmod(synced, default_mode())  # mkstemp's file is private
            finally:
                os.close(synced)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, atomically (``atomic_write_file``)."""
    from safetensors.torch import save_file

    atomic_write_file(path, lambda _handle, name: save_file(tensors, name, metadata=metadata))


def _bias_keys(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """State-dict names of the biases this adapter trains and saves (``bias="all"/"lora_only"``)."""
    if config.bias == "none":
        return []
    if config.bias == "all":
        return [n for n, _ in model_biases(model)]
    return [f"{path}.base_layer.bias" for path, layer in iter_lora_layers(model)
            if adapter_name in layer.lora_A and getattr(layer.base_layer, "bias", None) is not None]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under their PEFT on-disk names (copies, on the CPU)."""
    return _adapter_tensors(model, adapter_name, copies=True)


def _adapter_tensors(model: nn.Module, adapter_name: str, copies: bool) -> dict[str, torch.Tensor]:
    """``adapter_state_dict``; with ``copies=False`` a CPU tensor that is already contiguous is the
    adapter's own (detached), not a copy: for a caller that only reads them at once (``save_adapter``
    writing the file; a copy of every tensor was a tenth of its time on the embedded model)."""
    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(state.configs)}")
    config = state.configs[adapter_name]
    out = adapter_destinations(model, adapter_name)
    biases = _bias_keys(model, config, adapter_name)
    if biases:
        params = dict(model.named_parameters(remove_duplicate=False))
        for key in biases:
            out[PREFIX + key] = params[key]
    meta = [k for k, v in out.items() if v.is_meta]
    if meta:  # (torch's own error said "Cannot copy out of meta tensor")
        raise ValueError(f"adapter {adapter_name!r} has tensors on the meta device, with no data to save ({len(meta)}, "
                         f"first {meta[0]}): the model was moved to 'meta', or accelerate's cpu_offload / disk_offload "
                         "was applied after the adapters were added")
    tensors, storages = {}, set()
    for k, v in out.items():
        v = v.detach().to("cpu").contiguous()
        storage = v.untyped_storage().data_ptr()
        # (without copies, tensors sharing memory — one parameter in two layers, views of one
        # buffer — are still copied: safetensors refuses to write shared memory)
        tensors[k] = v.clone() if copies or storage in storages else v
        storages.add(storage)
    return tensors


def _warn_residual_of_others(model: nn.Module, adapter_name: str, convertible: bool) -> None:
    """Warn when another adapter's PiSSA/OLoRA initialisation changed a base weight this adapter sits
    on: the file is against that residual base, which loading this adapter alone does not rebuild."""
    from lorakit.variants.pissa import residual_owners

    owners = residual_owners(model, adapter_name)
    if owners:
        import warnings

        how = ("all saved with convert_to_lora=True" if convertible else
               "saved with convert_to_lora=True, or unconverted and loaded first")
        warnings.warn(f"adapter {adapter_name!r} shares base weights with the PiSSA/OLoRA adapter(s) {owners}, whose "
                      "initialisation changed them (W - s*B0*A0), so its file fits that residual base: load it "
                      f"together with {owners} ({how}); loaded alone on the original model it is off by their "
                      "initial update", stacklevel=3)


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 convert_to_lora: bool = False) -> Path:
    """Write adapter ``adapter_name`` to ``directory`` in PEFT's format (atomically, file by file).

    Args:
        model: A model with the adapter injected.
        directory: Created if needed; ``adapter_config.json`` and ``adapter_model.safetensors``
            inside it are replaced.
        adapter_name: Which adapter to save.
        convert_to_lora: For a PiSSA/OLoRA adapter (whose init changed the base weights), write a
            plain rank-2r LoRA against the *original* base instead: ΔW = s·[B, −B₀]·[A; A₀]
            (see ``lorakit/variants/pissa.py``; PEFT's ``path_initial_model_for_weight_conversion``).

    Returns:
        The directory as a ``Path``.

    Raises:
        ValueError: ``convert_to_lora`` on an adapter that was not initialised with PiSSA/OLoRA.
    """
    state = require_state(model)
    # (the adapter's own tensors where they are contiguous CPU ones: written to the file below and
    # dropped, and convert_to_lora builds new ones without writing these)
    tensors = _adapter_tensors(model, adapter_name, copies=False)
    config = LoraConfig(**{k: v for k, v in vars(state.configs[adapter_name]).items()})
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
        config.base_model_name_or_path = name or None
    if convert_to_lora:
        from lorakit.variants.pissa import convert_to_lora as _convert

        tensors, config = _convert(model, adapter_name, tensors, config)
    elif state.untied.get(adapter_name):
        raise ValueError(f"adapter {adapter_name!r} ({config.init_lora_weights}) was initialised on "
                         f"{state.untied[adapter_name]}, whose weight was tied to another module and got a copy of "
                         "its own; saved against its residual base, loading (in PEFT or lorakit) would rebuild that "
                         "residual in the shared weight and change the other module too: save it with "
                         "convert_to_lora=True (a plain LoRA against the original base)")
    elif isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower().startswith("pissa_niter_"):
        import warnings

        warnings.warn(f"adapter {adapter_name!r} ({config.init_lora_weights}) is saved against its residual base, "
                      "which loading rebuilds with a new randomised SVD, so the loaded model will differ: save it "
                      "with convert_to_lora=True (a plain LoRA against the original base)", stacklevel=2)
    elif isinstance(config.init_lora_weights, str) and config.init_lora_weights.lower() in ("pissa", "olora"):
        import warnings

        # (llama.cpp's converter reads only A, B and lora_alpha: 5.8x the adapter's own effect off,
        # greedy tokens agreeing at 31% of positions on a tiny Llama)
        warnings.warn(f"adapter {adapter_name!r} ({config.init_lora_weights}) is saved against its residual base: "
                      "PEFT and lorakit load it (they redo the initialisation on the base first), but vLLM refuses "
                      "it and llama.cpp adds it to the original base, which is wrong; for serving, save it with "
                      "convert_to_lora=True (a plain LoRA against the original base)", stacklevel=2)
    from lorakit.variants.pissa import is_convertible

    _warn_residual_of_others(model, adapter_name, is_convertible(state.configs[adapter_name].init_lora_weights))
    _warn_dilated_conv(model, adapter_name)
    config.target_modules = target_modules_for_file(model, config)
    directory = adapter_dir(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot save adapter: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory with a config always has complete weights next to it.
    atomic_save_tensors(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    config.save(directory)
    return directory


def _warn_dilated_conv(model: nn.Module, adapter_name: str) -> None:
    """Warn when the adapter holds a LoRA on a dilated Conv2d: PEFT 0.21 runs lora_A without the
    base's dilation, so such a file fails in PEFT for some shapes and, for others ('same' padding,
    a 1 x k kernel with stride), loads and runs with outputs ~7% off (an audit, 5 geometries)."""
    from lorakit.inject import iter_lora_layers
    from lorakit.layers.conv2d import LoraConv2d

    dilated = [name for name, layer in iter_lora_layers(model) if isinstance(layer, LoraConv2d)
               and adapter_name in layer.lora_A and tuple(layer.base_layer.dilation) != (1, 1)]
    if dilated:
        import warnings

        more = f" and {len(dilated) - 3} more" if len(dilated) > 3 else ""
        warnings.warn(f"adapter {adapter_name!r} has LoRA on dilated Conv2d layer(s) {dilated[:3]}{more}: lorakit "
                      "loads it exactly, but PEFT 0.21 leaves the dilation out of lora_A, so PEFT either fails on "
                      "this file or runs it with different outputs", stacklevel=3)


def adapter_dir(directory: Any) -> Path:
    """``directory`` as a Path; a TypeError naming what was given if it is not a path (None, a
    number: it was pathlib's "expected str, bytes or os.PathLike object")."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise TypeError(f"an adapter directory must be a path (str or os.PathLike), got {directory!r}")
    return Path(directory)


#: Float dtypes an adapter file may hold (float8 and others: torch has no finiteness check for them,
#: and no LoRA tool writes them)
_FILE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_fits(tensors: dict[str, torch.Tensor], dest: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
               source: str) -> None:
    """Refuse a file tensor whose values overflow the dtype of the tensor it loads into (a float64
    1e300 is finite in the file and inf in a float32 adapter), or that would load into a tensor on
    the meta device (an offloaded base layer's bias), before anything is copied. The
    tensor a key loads into: the adapter's (``dest``), else the model parameter it names (``params``,
    without ``PREFIX``), as the loaders' copy loops find it."""
    for key, tensor in tensors.items():
        target = dest.get(key, params.get(key[len(PREFIX):]))
        if target is not None and target.is_meta:  # (a copy into it does nothing, silently)
            raise ValueError(f"{source}: tensor {key!r} would load into a model tensor on the meta device (a base "
                             "layer accelerate offloads keeps its bias there, loading it per forward; a bias cannot "
                             "be loaded or trained there): load the model without offloading those layers")
        if target is None or not tensor.is_floating_point() or not target.is_floating_point():
            continue
        if tensor.dtype != target.dtype and not bool(torch.isfinite(tensor.to(target.dtype)).all()):
            big = float(tensor.abs().max())
            raise ValueError(f"{source}: tensor {key!r} holds values up to {big:.3g}, beyond the range of "
                             f"{target.dtype} that the model keeps it in")


def read_adapter_files(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model.

    Raises:
        FileNotFoundError: the directory, its config or its weights are missing.
        ValueError: the config is unusable, or the weights file is truncated or corrupt.
    """
    from safetensors.torch import load_file

    directory = adapter_dir(directory)
    config = LoraConfig.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(f"{directory} holds only adapter_model.bin (a pickle); lorakit never unpickles. "
                             "Re-save it as safetensors (PEFT: save_pretrained(..., safe_serialization=True)).")
        raise FileNotFoundError(f"{weights} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for bad headers / short files
        raise ValueError(f"{weights} is truncated or corrupt: {exc}") from None
    # PEFT's VeLoRA (velora_config) keeps a buffer per layer for its compressed backward pass only:
    # what the adapter computes is plain LoRA, so the buffer is not needed to load it
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".lora_velora_embed")}
    for key, tensor in tensors.items():  # (loaded, NaN made every output NaN; PEFT loads it)
        if tensor.is_floating_point() and tensor.dtype not in _FILE_FLOATS:
            raise ValueError(f"{weights}: tensor {key!r} is {tensor.dtype}; adapter weights are read from "
                             "float16, bfloat16, float32 or float64 tensors")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{weights}: tensor {key!r} holds NaN or inf ({bad} of {tensor.numel()} values), which "
                             "would make the model's outputs NaN; was it saved from a run that diverged?")
    return config, tensors


def _expected_tensors(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) on-disk keys -> shapes for loading ``config`` into ``model``."""
    required: dict[str, tuple[int, ...]] = {}
    optional: dict[str, tuple[int, ...]] = {}
    variant = variant_for(config)
    config = with_task_heads(config)
    targets = find_target_modules(model, config)
    for path in targets:
        module = model.get_submodule(path)
        shell = module if isinstance(module, LoraLayer) else lora_class_for(module)(module)
        r = config.rank_for(path)
        disk_a, disk_b = shell.disk_names
        required[f"{PREFIX}{path}.{disk_a}"] = tuple(shell.a_shape(r))
        required[f"{PREFIX}{path}.{disk_b}"] = tuple(shell.b_shape(r))
        if variant is not None:
            for disk, shape in variant.extra_shapes(shell, r).items():
                required[f"{PREFIX}{path}.{disk}"] = tuple(shape)
        base = shell.base_layer
        for pname, p in base.named_parameters(recurse=False):
            # PEFT may save a targeted embedding's base weight; biases when bias != "none".
            optional[f"{PREFIX}{path}.base_layer.{pname}"] = tuple(p.shape)
    for path in _find_saved_module_names(model, config, targets, strict=False):
        module = model.get_submodule(path)
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for key, tensor in source.state_dict().items():
            required[f"{PREFIX}{path}.{key}"] = tuple(tensor.shape)
        if config.bias == "all":
            # PEFT's bias="all" also saves the biases inside its wrapper of a modules_to_save module
            # (every one, in a container such as an nn.Sequential): the original module's, and the
            # trained copy's again (``_fold_copy_bias_alias`` reads those as the copy's own keys)
            optional.update(_original_bias_keys(path, source))
    if config.bias == "all":
        for name, p in model_biases(model):
            for key in (name, *_bias_aliases(name)):  # as saved where the module was (not) wrapped
                optional.setdefault(PREFIX + key, tuple(p.shape))
    return required, optional


def _bias_aliases(name: str) -> tuple[str, ...]:
    """The other name a module's bias has in a state dict while a LoRA layer wraps it or not
    (``<path>.bias`` / ``<path>.base_layer.bias``): a ``bias="all"`` file names every bias as it was
    on the model it was saved from, where other adapters may have wrapped other modules."""
    if name.endswith(".base_layer.bias"):
        return (name[: -len(".base_layer.bias")] + ".bias",)
    if name.endswith(".bias"):
        return (name[: -len(".bias")] + ".base_layer.bias",)
    return ()


def _model_bias_keys(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                     dest: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every bias key that names no parameter of the model renamed to its alias
    that does (see ``_bias_aliases``); a bias given under both names must have one value."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):]
        if key not in dest and name not in params:
            alias = next((a for a in _bias_aliases(name) if a in params), None)
            if alias is not None:
                key = PREFIX + alias
                if key in tensors and not torch.equal(tensors[key], tensor):
                    raise ValueError(f"{source}: {PREFIX + name} and {key} are the same bias of this model "
                                     "(with and without a LoRA layer around its module) but hold different values")
        out[key] = tensor
    return out


def _held_as_modules_to_save(model: nn.Module, tensors: dict, required: dict, optional: dict) -> str:
    """Why keys have no place when it is because another adapter holds their module whole (as
    ``modules_to_save``): a LoRA layer or a bias of this adapter cannot go into such a module."""
    wrapped = {path: list(w.modules_to_save) for path, w in iter_saved_modules(model)}
    for key in tensors:
        if key in required or key in optional:
            continue
        name = key[len(PREFIX):]
        path = next((p for p in wrapped if name.startswith(p + ".")), None)
        if path is not None:
            return (f"{path!r} is held whole as modules_to_save by adapter(s) {wrapped[path]} on this model: "
                    "this adapter's LoRA layers or biases cannot go into it; load it on a model without that "
                    "adapter")
    return ""


def _sets_weight_tying(directory: Path) -> bool:
    """Whether the adapter's config sets PEFT's ``ensure_weight_tying`` (ignored on load: it changes
    nothing lorakit can load, but it explains a refusal of the tensors)."""
    try:
        return bool(read_json_object(directory / CONFIG_NAME).get("ensure_weight_tying"))
    except (OSError, ValueError):
        return False


def _original_bias_keys(path: str, original: nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys PEFT's ``bias="all"`` writes for the original module inside the modules_to_save wrapper
    at ``path`` (``<path>.original_module.<sub>.bias``), with their shapes."""
    return {f"{PREFIX}{path}.original_module.{name}": tuple(p.shape) for name, p in original.named_parameters()
            if name == "bias" or name.endswith(".bias")}


def _wrapper_bias_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``_original_bias_keys`` of every modules_to_save wrapper on ``model``."""
    out: dict[str, tuple[int, ...]] = {}
    for path, wrapper in iter_saved_modules(model):
        out.update(_original_bias_keys(path, wrapper.original_module))
    return out


def _fold_copy_bias_alias(tensors: dict[str, torch.Tensor], source: str, known: set[str]) -> dict[str, torch.Tensor]:
    """``<module>.modules_to_save.bias`` (PEFT, bias="all"), and in a container
    ``<module>.modules_to_save.<adapter>.<sub>.bias``, is a bias of the trained copy, which the file
    holds as ``<module>.bias`` / ``<module>.<sub>.bias`` too: keep one (they must agree). ``known``:
    the keys the model expects, which tell the two spellings apart."""
    out = dict(tensors)
    marker = ".modules_to_save."
    for key in [k for k in tensors if marker in k and k.endswith(".bias")]:
        path, _, rest = key.partition(marker)
        candidates = [f"{path}.{rest}"] + ([f"{path}.{rest.partition('.')[2]}"] if "." in rest else [])
        plain = next((c for c in candidates if c in known), None)
        if plain is None:
            continue  # (the key check names it)
        alias = out.pop(key)
        if plain not in out:
            out[plain] = alias
        elif not torch.equal(out[plain], alias):
            raise ValueError(f"{source}: {key} and {plain} are the same bias (a modules_to_save copy's) but "
                             "hold different values")
    return out


def _check_tensors(tensors: dict[str, torch.Tensor], required: dict, optional: dict, source: str) -> None:
    unexpected = sorted(k for k in tensors if k not in required and k not in optional)
    if unexpected:
        hint = "" if all(k.startswith(PREFIX) for k in unexpected) else f" (PEFT keys start with {PREFIX!r})"
        raise ValueError(f"{source}: {len(unexpected)} key(s) the model has no place for, e.g. {unexpected[:3]}{hint}; "
                         f"is this adapter for another model, or are its target_modules different?")
    missing = sorted(k for k in required if k not in tensors)
    if missing:
        raise ValueError(f"{source}: {len(missing)} key(s) missing, e.g. {missing[:3]}")
    for key, tensor in tensors.items():
        expected = required.get(key, optional.get(key))
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{source}: shape mismatch for {key}: the model expects {list(expected)}, the file has {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {key} has dtype {tensor.dtype}; expected a floating-point tensor")


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Inject the adapter saved in ``directory`` (PEFT format) into ``model`` and load its weights.

    Args:
        model: The base model (or a model that already carries other adapters).
        directory: An adapter directory written by lorakit or PEFT.
        adapter_name: Name to give the loaded adapter.
        is_trainable: Leave the adapter's parameters trainable (to continue training it).

    Returns:
        The same ``model`` object with the adapter injected and loaded.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: the config is unusable, the file is corrupt, or keys / shapes do not fit the
            model (the message names the key, the expected and the found shape). The model is then
            left exactly as it was.
    """
    config, tensors = read_adapter_files(directory)
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists on this model; pass another adapter_name")
    required, optional = _expected_tensors(model, config)
    tensors = _fold_copy_bias_alias(tensors, str(Path(directory) / WEIGHTS_NAME), set(required) | set(optional))
    try:
        _check_tensors(tensors, required, optional, str(Path(directory) / WEIGHTS_NAME))
    except ValueError as exc:
        held = _held_as_modules_to_save(model, tensors, required, optional)
        if held:
            raise ValueError(f"{exc} ({held})") from None
        if _sets_weight_tying(Path(directory)):
            raise ValueError(f"{exc} (its adapter_config sets ensure_weight_tying=true: PEFT then ties the output "
                             "head's adapter or copy to the input embedding's, which lorakit does not implement)") from None
        raise

    backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model tensor, its value before loading)
    # A PiSSA/OLoRA adapter saved without convert_to_lora holds A, B for the *residual* base: redo the
    # init on the base first (as PEFT does on load) so that W_res + s·B·A is what was trained. Exact for
    # the deterministic "pissa"/"olora"; "pissa_niter_K" is randomised, so save those converted.
    from lorakit.variants.pissa import is_convertible

    init = config.init_lora_weights if is_convertible(config.init_lora_weights) else False
    base_backups = []
    if init is not False:
        from lorakit.inject import tied_parameters

        weights = []  # (target path, its base weight), which the init rewrites
        for path in find_target_modules(model, with_task_heads(config)):
            module = model.get_submodule(path)
            weights.append((path, (module.base_layer if isinstance(module, LoraLayer) else module).weight))
        tied = tied_parameters(model)
        path = next((p for p, weight in weights if id(weight) in tied), None)
        if path is not None:
            raise ValueError(f"{directory}: an unconverted {init!r} adapter (trained against a residual base) "
                             f"targets {path}, whose weight is tied to another module: PEFT rebuilds the "
                             "residual in the shared weight (changing the other module too), lorakit in a copy, "
                             "and the two compute different models, so it is refused; save it converted (lorakit: "
                             "save_adapter(..., convert_to_lora=True); PEFT: save_pretrained(..., "
                             "path_initial_model_for_weight_conversion=...)) and load that")
        base_backups = [(weight, weight.detach().clone()) for _, weight in weights]
        if isinstance(init, str) and init.lower().startswith("pissa_niter_"):
            import warnings

            # (measured: 1.6e-1 relative off PEFT's load of the same file with three targets)
            warnings.warn(f"{directory}: an unconverted {init!r} adapter is trained against a residual base that a "
                          "randomised SVD made; loading redoes that SVD with new random numbers (as PEFT does), so "
                          "the loaded model differs from the trained one: save it with convert_to_lora=True (PEFT: "
                          "path_initial_model_for_weight_conversion) and load that", stacklevel=2)
    first = state is None
    inject_adapter(model, config, adapter_name, init_lora_weights=init, loading=True)
    try:
        with torch.no_grad():
            dest = adapter_destinations(model, adapter_name)
            params = dict(model.named_parameters(remove_duplicate=False))
            tensors = _model_bias_keys(tensors, params, dest, str(Path(directory) / WEIGHTS_NAME))
            check_fits(tensors, dest, params, str(Path(directory) / WEIGHTS_NAME))
            for key, tensor in tensors.items():
                target = dest.get(key)
                if target is None:  # an optional base tensor (bias / base weight) of the model
                    target = params.get(key[len(PREFIX):])
                    if target is None:
                        raise ValueError(f"no parameter for {key} after injection")
                    backups.append((target, target.detach().clone()))
                target.copy_(tensor.to(target.dtype))
    except BaseException:
        with torch.no_grad():
            for weight, value in backups + base_backups:
                weight.copy_(value)
        _remove_adapter_everywhere(model, adapter_name)
        raise
    state = require_state(model)
    if is_trainable:
        state.trainable.add(adapter_name)
    state.configs[adapter_name].inference_mode = not is_trainable
    mark_trainable(model, freeze_all=first, only=adapter_name)
    return model


def adapter_destinations(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """On-disk key -> the live tensor of adapter ``adapter_name`` that the key loads into."""
    out: dict[str, torch.Tensor] = {}
    layers, wrappers = lora_and_saved_modules(model)
    for path, layer in layers:
        if adapter_name not in layer.lora_A:
            continue
        disk_a, disk_b = layer.disk_names
        out[f"{PREFIX}{path}.{disk_a}"] = layer.lora_A[adapter_name]
        out[f"{PREFIX}{path}.{disk_b}"] = layer.lora_B[adapter_name]
        variant = layer.variants.get(adapter_name)
        if variant is not None:
            for attr, disk in variant.saved_stores.items():
                out[f"{PREFIX}{path}.{disk}"] = getattr(layer, attr)[adapter_name]
    for path, wrapper in wrappers:
        if adapter_name in wrapper.modules_to_save:
            module = wrapper.modules_to_save[adapter_name]
            for key, tensor in module.state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    return out


def load_adapter_weights(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Replace the weights of an adapter already on ``model`` with those saved in ``directory``.

    No re-injection: targets and ranks must be the same (a hot swap). Every key and shape is checked
    before anything is copied, so a mismatch leaves the adapter as it was. Only tensors are read:
    the adapter keeps its alpha / scaling; ``lorakit.hotswap_adapter`` also takes the new config's.

    Raises:
        ValueError: unknown adapter, merged adapter, or keys / shapes that differ (named in the message).
    """
    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(state.configs)}")
    if any(adapter_name in layer.merged_adapters for _, layer in iter_lora_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before replacing its weights")
    _, tensors = read_adapter_files(directory)
    copy_checked(checked_replacements(model, adapter_name, state.configs[adapter_name], tensors, directory))
    return model


def checked_replacements(model: nn.Module, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
                         directory: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live tensor, new value) for each tensor of an adapter file that replaces adapter
    ``adapter_name``'s weights in place (``load_adapter_weights``, ``lorakit.hotswap_adapter``).

    Keys are resolved as ``load_adapter`` resolves them (a bias under its name with or without a LoRA
    layer around its module; PEFT's ``bias="all"`` spellings inside a ``modules_to_save`` wrapper;
    ``config.bias`` says which biases the file may hold), and every key, shape and value is checked
    here, before the caller writes anything (``copy_checked``).
    """
    dest = adapter_destinations(model, adapter_name)
    params = dict(model.named_parameters(remove_duplicate=False))
    optional = {PREFIX + k: tuple(params[k].shape) for k in _bias_keys(model, config, adapter_name)}
    if config.bias == "all":
        optional.update({PREFIX + a: shape for k, shape in list(optional.items())
                         for a in _bias_aliases(k[len(PREFIX):])})
        optional.update(_wrapper_bias_keys(model))
    source = str(Path(directory) / WEIGHTS_NAME)
    tensors = _fold_copy_bias_alias(tensors, source, set(dest) | set(optional))
    _check_tensors(tensors, {k: tuple(v.shape) for k, v in dest.items()}, optional, source)
    tensors = _model_bias_keys(tensors, params, dest, source)
    check_fits(tensors, dest, params, source)
    return [(dest[key] if key in dest else params[key[len(PREFIX):]], tensor) for key, tensor in tensors.items()]


@torch.no_grad()
def copy_checked(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``checked_replacements``' values into their tensors (in their dtypes)."""
    for target, value in pairs:
        target.copy_(value.to(target.dtype))
