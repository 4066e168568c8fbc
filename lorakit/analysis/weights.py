"""Read model weights and configs for analysis without building the model.

A local model directory is read straight from its safetensors files (one file, or shards with an
index). ``None`` / "default" means lorakit's embedded default model: :mod:`lorakit.models` turns it
into a cached transformers directory, read the same way; a ``.gguf`` file is loaded through
:mod:`lorakit.models`. Pickled checkpoints (``*.bin``, ``*.pt``) are refused: loading never unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

DEFAULT_NAMES = (None, "", "default", "embedded")


def is_default(source: str | Path | None) -> bool:
    """Whether ``source`` names the embedded default model."""
    return source is None or str(source) in DEFAULT_NAMES


def resolve(source: str | Path | None) -> Path:
    """The local path behind ``source``: the embedded model's cached directory for None / "default".

    Raises:
        FileNotFoundError: if the path (or the embedded model) is missing.
    """
    if not is_default(source):
        return Path(source)  # type: ignore[arg-type]
    try:
        from lorakit.models import resolve_model_path
    except ImportError as exc:  # pragma: no cover - lorakit.models ships with lorakit
        raise FileNotFoundError("the embedded default model needs lorakit.models; pass a model directory") from exc
    return Path(resolve_model_path(None))


def _gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from lorakit.models import load_model_and_tokenizer

    model, _tokenizer = load_model_and_tokenizer(path)
    return {k: v.detach() for k, v in model.state_dict().items()}


def safetensors_files(source: str | Path) -> list[Path]:
    """The safetensors files holding a model's weights.

    Args:
        source: a model directory or a single ``.safetensors`` file.

    Raises:
        FileNotFoundError: if the path does not exist or holds no safetensors weights.
        ValueError: if it holds only pickled weights.
    """
    path = resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(source)!r} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{str(source)!r} is not a .safetensors file (pickled weights are not loaded)")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"model directory {str(source)!r} has only pickled weights; save it with safetensors")
    raise FileNotFoundError(f"no safetensors weights in {str(source)!r}")


def load_state_dict(source: str | Path | None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load weights as a name -> tensor dict.

    Args:
        source: model directory, ``.safetensors`` file, or None / "default" for the embedded model.
        keys: only these tensors (all when None).

    Raises:
        FileNotFoundError: see :func:`safetensors_files`.
    """
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        sd = _gguf_state_dict(path)
        return {k: sd[k] for k in keys if k in sd} if keys is not None else sd
    wanted = set(keys) if keys is not None else None
    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                if wanted is None or name in wanted:
                    out[name] = fh.get_tensor(name)
    return out


def weight_shapes(source: str | Path | None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, read from safetensors headers (no data loaded)."""
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        return {k: tuple(v.shape) for k, v in _gguf_state_dict(path).items()}
    out: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                out[name] = tuple(fh.get_slice(name).get_shape())
    return out


def load_config(source: str | Path | None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (the embedded model's config for None / "default").

    Raises:
        FileNotFoundError: if a directory has no config.json.
    """
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        from transformers import AutoConfig  # reads the GGUF's metadata only, no tensors

        return AutoConfig.from_pretrained(str(path.resolve().parent), gguf_file=path.name).to_dict()
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json next to model {str(source)!r}")
    return json.loads(cfg.read_text())


def module_matches(module: str, targets: list[str] | tuple[str, ...] | str) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list matches a name or a ``.name`` suffix."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)
