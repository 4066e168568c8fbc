"""Read model weights and configs for analysis without building the model.

A local model directory is read straight from its safetensors files (one file, or shards with an
index). ``None`` / "default" means lorakit's embedded default model: :mod:`lorakit.models` turns it
into a cached transformers directory, read the same way; a ``.gguf`` file is loaded through
:mod:`lorakit.models`. Pickled checkpoints (``*.bin``, ``*.pt``) are refused: loading never unpickles.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from lorakit.config import read_json_object

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


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """``safe_open`` a file, turning a short or corrupt file (on opening or reading) into a ValueError."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            yield fh
    except SafetensorError as exc:
        raise ValueError(f"{file} is truncated or corrupt: {exc}") from None


def safetensors_files(source: str | Path) -> list[Path]:
    """The safetensors files holding a model's weights, chosen as transformers chooses them:
    ``model.safetensors`` where there is one, else the shards an index names, else (no index) every
    shard of one sharded save.

    Args:
        source: a model directory or a single ``.safetensors`` file.

    Raises:
        FileNotFoundError: if the path does not exist, holds no safetensors weights, or lacks shards
            of a sharded save without an index (named).
        ValueError: if it holds only pickled weights, or several safetensors files that are neither
            ``model.safetensors`` nor one save's shards.
    """
    path = resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(source)!r} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{str(source)!r} is not a .safetensors file (pickled weights are not loaded)")
        return [path]
    if (path / "model.safetensors").is_file():  # (transformers loads it first: before an index, beside any copy)
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, bom=False).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
        return [path / n for n in sorted(set(weight_map.values()))]
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if len(files) > 1:
        return _shards_without_index(path, files)
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"model directory {str(source)!r} has only pickled weights, which the lab does not read "
                         "(unpickling runs code); save it with safetensors: load it with transformers and "
                         "save_pretrained (safetensors is its default)")
    raise FileNotFoundError(f"no safetensors weights in {str(source)!r}")


def _shards_without_index(path: Path, files: list[Path]) -> list[Path]:
    """Several safetensors files and no index: all the shards of one sharded save
    (``<name>-00001-of-0000N.safetensors`` ... every one of the N), else refused. Reading whatever
    files were there took 5 shards of 6 for the whole model, or let an extra copy's tensors
    (``model_ema.safetensors``) overwrite the model's, silently.

    Raises:
        FileNotFoundError: shards of the save are missing (named).
        ValueError: the files are not the shards of one save.
    """
    import re

    parts = [re.fullmatch(r"(.+)-(\d+)-of-(\d+)\.safetensors", f.name) for f in files]
    if all(parts) and len({(m.group(1), m.group(3)) for m in parts}) == 1:
        total, width = int(parts[0].group(3)), len(parts[0].group(3))
        missing = sorted(set(range(1, total + 1)) - {int(m.group(2)) for m in parts})
        if missing:
            names = [f"{parts[0].group(1)}-{i:0{width}d}-of-{parts[0].group(3)}.safetensors" for i in missing]
            raise FileNotFoundError(f"model directory {str(path)!r} lacks {len(missing)} of its {total} weight shards: "
                                    f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
        return files
    raise ValueError(f"model directory {str(path)!r} holds several safetensors files and neither "
                     f"model.safetensors nor an index (model.safetensors.index.json) saying which are the model: "
                     f"{', '.join(f.name for f in files[:4])}{' ...' if len(files) > 4 else ''}; give the model's file's path, or move the other files out")


def load_state_dict(source: str | Path | None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load weights as a name -> tensor dict.

    Args:
        source: model directory, ``.safetensors`` file, or None / "default" for the embedded model.
        keys: only these tensors (all when None).

    Raises:
        FileNotFoundError: see :func:`safetensors_files`.
        ValueError: a weights file is truncated or corrupt.
    """
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        sd = _gguf_state_dict(path)
        return {k: sd[k] for k in keys if k in sd} if keys is not None else sd
    wanted = set(keys) if keys is not None else None
    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with open_safetensors(file) as fh:
            for name in fh.keys():
                if wanted is None or name in wanted:
                    out[name] = fh.get_tensor(name)
    return out


class LazyWeights(Mapping):
    """Name -> tensor of a model's safetensors files, each tensor read from its file when it is
    asked for: a loop over a model's weights holds one at a time, not the whole model (a 7B model's
    tuned and base weights, both in memory, were ~56 GB in fp32 for ``extract``)."""

    def __init__(self, source: str | Path | None) -> None:
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in safetensors_files(resolve(source)):
            with open_safetensors(file) as fh:
                for name in fh.keys():
                    self._files[name] = file
                    self._shapes[name] = tuple(fh.get_slice(name).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        with open_safetensors(self._files[key]) as fh:
            return fh.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, from its file's header (read once, with the names)."""
        return self._shapes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def open_weights(source: str | Path | None) -> Mapping:
    """A model's weights as a name -> tensor mapping that reads each tensor when asked for
    (``LazyWeights``); a ``.gguf`` file is converted whole, as ``load_state_dict`` does.

    Raises:
        FileNotFoundError / ValueError: as :func:`load_state_dict` (a corrupt tensor: when it is read).
    """
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_state_dict(path)
    return LazyWeights(path)


def weight_shapes(source: str | Path | None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, read from safetensors headers (no data loaded)."""
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        return {k: tuple(v.shape) for k, v in _gguf_state_dict(path).items()}
    lazy = LazyWeights(path)
    return {name: lazy.shape(name) for name in lazy}


def load_config(source: str | Path | None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (the embedded model's config for None / "default").

    Raises:
        FileNotFoundError: if a directory has no config.json.
        ValueError: if config.json is not a valid JSON object.
    """
    path = resolve(source)
    if path.suffix == ".gguf" and path.is_file():
        from transformers import AutoConfig  # reads the GGUF's metadata only, no tensors

        return AutoConfig.from_pretrained(str(path.resolve().parent), gguf_file=path.name).to_dict()
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json next to model {str(source)!r}")
    return read_json_object(cfg, bom=False)


def source_label(source: str | Path | None) -> str:
    """How messages name a model: its path, or "the embedded default model"."""
    return "the embedded default model" if is_default(source) else repr(str(source))


def check_finite(tensor: torch.Tensor, source: str | Path | None, name: str) -> None:
    """Refuse a weight holding NaN or inf (an SVD of it would fail with a linear-algebra error).

    Raises:
        ValueError: naming the model and the tensor.
    """
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"model {source_label(source)}: weight {name!r} holds NaN or inf")


def module_matches(module: str, targets: list[str] | tuple[str, ...] | str) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list matches a name or a ``.name`` suffix."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)
