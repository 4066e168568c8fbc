"""Adapter inspection and surgery on PEFT-format LoRA adapters: inspect, extract, resize.

These tools read and write the files directly (``adapter_config.json`` +
``adapter_model.safetensors``), so they work on any PEFT LoRA adapter without building a model.

Every LoRA module stores factors A (r, in) and B (out, r); its weight update is
ΔW = scaling * B @ A with scaling = alpha / r (alpha / sqrt(r) under rsLoRA). The SVD of such a
product never needs the full (out, in) matrix: with B = Q_b R_b and Aᵀ = Q_a R_a (thin QR),
B @ A = Q_b (R_b R_aᵀ) Q_aᵀ, so the singular values are those of the r x r core (Eckart-Young then
gives the best rank-k approximation for resizing).
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from lorakit.analysis.weights import (
    check_finite,
    is_default,
    load_config,
    module_matches,
    open_weights,
    resolve,
    source_label,
    weight_shapes,
)
from lorakit.config import LoraConfig
from lorakit.inject import ends_another
from lorakit.io import _check_tensors, _expected_tensors, check_new_directory, read_adapter_files, write_new_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?$"
)
# Names PEFT's "all-linear" leaves out, and the usual input/output embedding names.
_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "word_embeddings", "position_embeddings")


def target_filter(targets: list[str] | tuple[str, ...] | None) -> Callable[[str], bool]:
    """Which modules a ``--targets`` list selects, by module name (the weight's key less ``.weight``).

    None or an empty list selects the default: every linear except embeddings and the output head,
    as PEFT's "all-linear". Otherwise a module is selected when a name in the list matches it
    (PEFT's suffix rule, ``module_matches``), and "all-linear" in the list adds that default set:
    ``["all-linear", "embed_tokens"]`` is every linear plus the input embedding. ``extract``, the
    ``--tuned`` spectra and ``recommend --model`` all select with this one rule.
    """
    named = [t for t in (targets or ()) if t != "all-linear"]
    every_linear = not targets or len(named) < len(targets)

    def chosen(name: str) -> bool:
        return ((every_linear and not any(t in name for t in _NOT_LINEAR))
                or (bool(named) and module_matches(name, named)))
    return chosen


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def scaling_of(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA scaling: alpha / r (Hu et al. 2021, section 4.1), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraModule:
    """One adapted module read from disk.

    Attributes:
        name: module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        kind: "linear", "embedding", or "conv1d" / "conv2d" / "conv3d" (by A's dimensions).
        A: (r, in) — (r, num_embeddings) for embeddings, (r, in, *kernel) for convolutions.
        B: (out, r) — (dim, r) for embeddings, (out, r, 1, ...) for convolutions, (out, r/G, 1, ...)
            for a convolution with G groups (PEFT's layout there; ``groups``).
        alpha: lora_alpha for this module (alpha_pattern applied).
        scaling: the factor applied to B @ A.
        magnitude: DoRA magnitude vector, if any.
    """

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def r(self) -> int:
        """Rank, from A's first dimension."""
        return int(self.A.shape[0])

    @property
    def groups(self) -> int:
        """G of a grouped convolution's adapter (B holds r/G of the r rank channels per output), else 1."""
        return self.r // int(self.B.shape[1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (m, r), right (r, n)) in float64 with left @ right = ΔW as an (out, in*) matrix.

        With G groups ``left`` is block-diagonal: output group g holds its B rows at the rank
        columns g·r/G … (g+1)·r/G − 1 and zeros elsewhere, so left @ right is the dense ΔW.
        """
        B = self.B.reshape(self.B.shape[0], -1).double() * self.scaling
        groups = self.groups
        if groups > 1:
            B = torch.block_diag(*B.chunk(groups, dim=0))
        return B, self.A.reshape(self.r, -1).double()

    def delta_matrix(self) -> torch.Tensor:
        """ΔW as an (out, in*) matrix (embeddings: (dim, num_embeddings))."""
        left, right = self.factors()
        return left @ right

    def num_params(self) -> int:
        """Adapter parameters of this module."""
        n = self.A.numel() + self.B.numel()
        return n + (self.magnitude.numel() if self.magnitude is not None else 0)


@dataclass
class Adapter:
    """A PEFT LoRA adapter read from a directory.

    Attributes:
        path: the directory.
        config: ``adapter_config.json`` as lorakit's loader reads it (defaults filled in).
        modules: the LoRA modules, by module path.
        other: tensors that are not LoRA factors (modules_to_save, biases, embedding base weights).
        lora_config: the parsed config.
        tensors: every tensor of the weights file, under its on-disk name.
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_config: LoraConfig | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def size_on_disk(self) -> int:
        """Bytes of the adapter's files."""
        return sum(p.stat().st_size for p in (self.path / CONFIG_NAME, self.path / WEIGHTS_NAME) if p.exists())


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory, with the checks of lorakit's own loader
    (:func:`lorakit.io.read_adapter_files`).

    Raises:
        FileNotFoundError: if the directory, its config or its weights are missing.
        NotADirectoryError: if ``path`` is a file.
        ValueError: if the config is not valid JSON or not a usable LoRA config, the weights file is
            truncated or corrupt, a module lacks its A or B factor or their ranks differ, a tensor
            holds NaN or inf, or a module's scaling is not finite (the file or module is named).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    lora_config, tensors = read_adapter_files(root)  # (a file: NotADirectoryError, from LoraConfig.load)  # (which refuses NaN and inf, naming the tensor)
    w_path = root / WEIGHTS_NAME
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m.group("module"), {})[m.group("part")] = tensor
        else:
            other[key] = tensor
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items(), key=lambda kv: natural_key(kv[0])):
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if a_key not in p or b_key not in p:
            missing = a_key if a_key not in p else b_key
            raise ValueError(f"adapter {str(path)!r}: module {name!r} has no {missing}")
        A, B = p[a_key], p[b_key]
        kind = "embedding" if emb else (f"conv{A.dim() - 2}d" if A.dim() > 2 else "linear")
        if A.dim() < 2 or B.dim() < 2 or (A.shape[0] != B.shape[1] and not _grouped_conv(kind, A, B)):
            raise ValueError(f"{w_path}: module {name!r} has {a_key} of shape {list(A.shape)} and {b_key} of "
                             f"shape {list(B.shape)}; their ranks (A's first, B's second dimension) must agree"
                             f"{' (or B hold r/G of them, for a conv of G groups)' if kind.startswith('conv') else ''}")
        alpha = lora_config.alpha_for(name)
        scaling = scaling_of(alpha, int(A.shape[0]), lora_config.use_rslora)
        if not math.isfinite(scaling):
            raise ValueError(f"adapter {str(path)!r}: module {name!r} has scaling {scaling} (lora_alpha {alpha}); "
                             f"it must be finite")
        modules[name] = LoraModule(name, kind, A, B, alpha, scaling, p.get("lora_magnitude_vector"))
    return Adapter(root, lora_config.to_dict(), modules, other, lora_config, tensors)


def _grouped_conv(kind: str, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether A (r, in, ...) and B (out, r/G, 1, ...) are PEFT's factors on a conv of G > 1 groups."""
    rank, share, out = int(A.shape[0]), int(B.shape[1]), int(B.shape[0])
    return (kind.startswith("conv") and 0 < share < rank and rank % share == 0
            and out % (rank // share) == 0)


def _bar(items: list[Any], progress: bool, desc: str) -> Any:
    """``items``, under a progress bar on stderr when ``progress`` (and stderr is a terminal)."""
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=None, dynamic_ncols=True, leave=False)


def svdvals_tall(m: torch.Tensor) -> torch.Tensor:
    """Singular values of ``m``, computed on its tall orientation: the same values, and LAPACK's
    divide-and-conquer was 1.3-1.5x slower on a wide matrix (192 x 576, 576 x 1536) than on its
    transpose."""
    return torch.linalg.svdvals(m if m.shape[0] >= m.shape[1] else m.T)


def svd_tall(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``m`` (U, S, Vh), computed on its tall orientation (``svdvals_tall``)."""
    if m.shape[0] >= m.shape[1]:
        return torch.linalg.svd(m, full_matrices=False)
    u, s, vh = torch.linalg.svd(m.T, full_matrices=False)
    return vh.T, s, u.T


def singular_values_of_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of left @ right (left (m, r), right (r, n)) from the r x r core of the two
    triangular QR factors alone (``spectrum_of_product`` without forming Q or the vectors)."""
    rb = torch.linalg.qr(left, mode="r")[1]
    ra = torch.linalg.qr(right.T, mode="r")[1]
    return torch.linalg.svdvals(rb @ ra.T)


def spectrum_of_product(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of left @ right (left (m, r), right (r, n)) via QR: returns U (m, k), S (k,), Vh (k, n)."""
    qb, rb = torch.linalg.qr(left)
    qa, ra = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # k = min(m, n, r) singular values
    return qb @ u, s, vh @ qa.T


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of Σσ² (0 for a zero matrix)."""
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(s.double() ** 2, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def truncation_error(s: torch.Tensor, k: int) -> float:
    """Relative Frobenius error ‖M − M_k‖ / ‖M‖ of the best rank-k approximation (Eckart-Young)."""
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(max(0.0, float((s.double()[k:] ** 2).sum())) / total)


def _base_key_shape(module: LoraModule, config: dict[str, Any]) -> tuple[int, ...]:
    if module.kind == "embedding":
        return (int(module.A.shape[1]), int(module.B.shape[0]))
    if module.kind.startswith("conv"):  # (out, in / groups, *kernel)
        return (int(module.B.shape[0]), int(module.A.shape[1]) // module.groups, *map(int, module.A.shape[2:]))
    out, inp = int(module.B.shape[0]), int(module.A.shape[1])
    return (inp, out) if config.get("fan_in_fan_out") else (out, inp)


def _meta_model(base: str | Path | None) -> torch.nn.Module:
    """The base model as lorakit loads it (``AutoModelForCausalLM``), built on the meta device: its
    modules and shapes without reading or allocating any weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve(base)
    if not path.exists():
        raise FileNotFoundError(f"base model {str(base)!r} does not exist")
    try:
        if path.is_file() and path.suffix == ".gguf":
            config = AutoConfig.from_pretrained(str(path.resolve().parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(str(path if path.is_dir() else path.parent))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot build base model {str(base)!r} to check the adapter against: {exc}") from None


def check_against_base(adapter: Adapter, base: str | Path | None) -> dict[str, Any]:
    """Whether lorakit's loader (:func:`lorakit.io.load_adapter`) would load the adapter into the base.

    The adapter goes through the loader's own checks (config, expected keys and shapes, dtypes)
    against the base model built on the meta device; when they fail, the loader's message comes
    first in "problems", followed by each adapted module missing from the base or of another shape.
    A base transformers cannot build as a causal LM gets the per-module shape check only.

    Returns:
        {"ok": bool, "problems": [str, ...]}.
    """
    problems = []
    try:
        model = _meta_model(base)
    except ValueError:
        model = None  # not a causal LM transformers can build: the per-module shape check below only
    if model is not None:
        try:
            config = adapter.lora_config or LoraConfig.from_dict(adapter.config, source=str(adapter.path / CONFIG_NAME))
            tensors = adapter.tensors or read_adapter_files(adapter.path)[1]
            required, optional = _expected_tensors(model, config)
            _check_tensors(tensors, required, optional, str(adapter.path / WEIGHTS_NAME))
        except (ValueError, TypeError) as exc:
            problems.append(f"lorakit's loader refuses it: {exc}")
        if not problems:
            return {"ok": True, "problems": []}
    shapes = weight_shapes(base)
    for name, mod in adapter.modules.items():
        key = f"{name}.weight"
        want = _base_key_shape(mod, adapter.config)
        if key not in shapes:
            problems.append(f"{name}: no {key!r} in the base model")
        elif tuple(shapes[key]) != want and not (
                mod.kind == "linear" and tuple(shapes[key]) == want[::-1]):  # (in, out) Conv1D layout
            problems.append(f"{name}: base weight has shape {tuple(shapes[key])}, adapter expects {want}")
    return {"ok": not problems, "problems": problems}


def inspect_adapter(path: str | Path, base: str | Path | None = None, check_base: bool = False) -> dict[str, Any]:
    """Summarise an adapter: config, per-module rank/alpha/scaling/parameters, ‖ΔW‖ and effective rank.

    Args:
        path: adapter directory.
        base: base model to check the adapter against (directory, or None for the embedded model).
        check_base: run the base check (set automatically when ``base`` is given).

    Returns:
        A JSON-ready dict with "config", "modules" (list), "totals", "warnings" (modules whose tensors
        do not have the rank the config gives them) and, with a base, "loads".
    """
    ad = read_adapter(path)
    rows, warnings = [], []
    for name, mod in ad.modules.items():
        configured = ad.lora_config.rank_for(name) if ad.lora_config is not None else mod.r
        if configured != mod.r:
            warnings.append(f"{name}: the config gives r={configured} (r / rank_pattern) but its tensors "
                            f"have rank {mod.r}")
        s = singular_values_of_product(*mod.factors())
        rows.append({
            "module": name, "kind": mod.kind, "r": mod.r, "alpha": mod.alpha, "scaling": mod.scaling,
            "params": mod.num_params(), "delta_norm": float(torch.linalg.vector_norm(s)),
            "rank90": energy_rank(s, 0.90), "rank99": energy_rank(s, 0.99),
            "dora": mod.magnitude is not None,
        })
    targets = ad.config.get("target_modules")
    report: dict[str, Any] = {
        "path": str(ad.path),
        "config": {k: ad.config.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                                                  "target_modules", "rank_pattern", "alpha_pattern", "bias",
                                                  "fan_in_fan_out", "modules_to_save", "base_model_name_or_path")},
        "targets": sorted(targets) if isinstance(targets, list) else targets,
        "modules": rows,
        "warnings": warnings,
        "totals": {
            "modules": len(rows),
            "params": sum(r["params"] for r in rows) + sum(t.numel() for t in ad.other.values()),
            "other_tensors": sorted(ad.other),
            "size_on_disk": ad.size_on_disk(),
        },
    }
    if base is not None or check_base:
        report["loads"] = check_against_base(ad, base)
    return report


def _write_adapter(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write config + safetensors into a new directory ``out``, atomically (``write_new_directory``:
    a temporary sibling directory that is then renamed), so a failure leaves no half-written adapter.

    Raises:
        FileExistsError: ``out`` exists and is not an empty directory.
        ValueError: a tensor holds NaN or inf (nothing is written).
    """
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"refusing to write {str(out)!r}: {len(bad)} tensor(s) would hold NaN or inf, "
                         f"e.g. {bad[:3]}")

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        # fields sorted, rank / alpha patterns in their order (the first match wins: see LoraConfig.save)
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(sorted(config.items())), indent=2), encoding="utf-8", newline="\n")
    return write_new_directory(out, write)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors B (m, k), A (k, n) with scaling * B @ A = U_k S_k V_kᵀ (scaling non-zero;
    a negative one flips the sign of B)."""
    root = torch.sqrt(s[:k] / abs(scaling))
    return u[:, :k] * root * math.copysign(1.0, scaling), root[:, None] * vh[:k]


def _written_error(old: tuple[torch.Tensor, torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> float:
    """‖P Q − P' Q'‖ / ‖P Q‖ for ``old`` = (P, Q) and (P', Q') = (``left``, ``right``), float64, from
    r x k products only (‖X − Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩, ⟨P Q, P' Q'⟩ = tr((PᵀP')(Q'Qᵀ)))."""
    P, Q = old
    xx = float(((P.T @ P) * (Q @ Q.T)).sum())
    yy = float(((left.T @ left) * (right @ right.T)).sum())
    xy = float(((P.T @ left) * (Q @ right.T)).sum())
    return math.sqrt(max(0.0, xx + yy - 2 * xy) / xx) if xx > 0 else 0.0


def _factors_to_tensors(name: str, kind: str, B: torch.Tensor, A: torch.Tensor, conv_shape: tuple[int, ...] | None,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if kind == "embedding":
        return {f"{PREFIX}{name}.lora_embedding_A": A.to(dtype), f"{PREFIX}{name}.lora_embedding_B": B.to(dtype)}
    if kind.startswith("conv") and conv_shape is not None:  # A (r, in, *kernel), B (out, r, 1, ...)
        A = A.reshape(A.shape[0], *conv_shape[1:])
        B = B.reshape(B.shape[0], B.shape[1], *[1] * (len(conv_shape) - 2))
    return {f"{PREFIX}{name}.lora_A.weight": A.to(dtype), f"{PREFIX}{name}.lora_B.weight": B.to(dtype)}


def _base_config(base: str | None, r: int, alpha: float, targets: list[str], use_rslora: bool) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": use_rslora,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "base_model_name_or_path": base, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }


def _compact_targets(chosen: list[str], all_candidates: list[str]) -> list[str] | str:
    """Short target names (``q_proj``) when they select exactly ``chosen``, else the full paths; a
    regex of exactly those paths (PEFT and lorakit full-match a string) where a path is also the end
    of another candidate's (``fc`` and ``block.fc``), which the list entry would select too."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if sorted(n for n in all_candidates if n.rsplit(".", 1)[-1] in suffixes) == sorted(chosen):
        return suffixes
    if ends_another(chosen, all_candidates):
        return "|".join(re.escape(n) for n in sorted(chosen))
    return sorted(chosen)


def _embedding_modules(model_dir: str | Path | None) -> set[str]:
    """Names of the ``nn.Embedding`` modules of the model in ``model_dir`` (empty where transformers
    cannot build it): their LoRA factors have PEFT's embedding layout, not a Linear's."""
    try:
        model = _meta_model(model_dir)
    except (ValueError, FileNotFoundError, OSError):
        return set()
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}


def _rank_pattern(ranks: dict[str, int], r: int, names: list[str] | None = None) -> dict[str, int]:
    """rank_pattern keys for the modules whose rank is not ``r``: their paths, which PEFT and lorakit
    match at the end of a module's name (``(.*\\.)?(key)$``). Where a path is also the end of
    another one's among ``names`` (``fc`` and ``block.fc``), the keys are escaped and ``^``-anchored
    so that each matches its own module only."""
    exact = ends_another(list(ranks), list(ranks) if names is None else names)
    return {(f"^{re.escape(name)}" if exact else name): k for name, k in sorted(ranks.items()) if k != r}


def _check_rank(rank: Any) -> None:
    """A rank is a positive int (2.5 reached a slice as a bare TypeError; True was taken as rank 1)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def _check_energy(energy: Any) -> None:
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")


def _tied_head(base: str | Path | None) -> dict[str, str]:
    """``{output head weight key: input embedding weight key}`` for a base with tied embeddings, which
    saves the shared weight once, under the embedding's name (a merge that changed the head untied
    it: ``lorakit merge`` writes both); empty for an untied base or one transformers cannot build."""
    try:
        model = _meta_model(base)
    except (ValueError, FileNotFoundError, OSError):
        return {}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None or embedding is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(embedding)]}.weight"}


def extract_adapter(
    base: str | Path | None,
    tuned: str | Path,
    rank: int,
    out: str | Path,
    alpha: float | None = None,
    targets: list[str] | None = None,
    energy: float | None = None,
    min_rel_change: float = 0.0,
    fan_in_fan_out: bool | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Best rank-r LoRA approximation of (tuned − base), one truncated SVD per weight matrix.

    For each targeted linear weight D = W_tuned − W_base (out, in), the SVD D = U S Vᵀ gives
    B = U_r S_r^½ / √s and A = S_r^½ V_rᵀ / √s, so scaling * B @ A is the best rank-r
    approximation of D in Frobenius norm (Eckart-Young), with relative error
    sqrt(Σ_{i>r} σᵢ²) / ‖D‖. s is the scaling the written config gives the module: alpha / k for
    its own rank k (k < ``rank`` with ``energy`` or when min(out, in) < ``rank``; in rank_pattern).

    Args:
        base: base model directory (None / "default": the embedded model).
        tuned: fully fine-tuned model directory with the same tensor names.
        rank: LoRA rank r (per module, capped by min(out, in)).
        out: output adapter directory.
        alpha: lora_alpha (default: r, so scaling = 1 where a module keeps rank r; a module written
            at a lower rank k has scaling alpha / k).
        targets: module names or suffixes to extract (default: every 2-D weight that changed,
            except embeddings and lm_head, as PEFT's "all-linear"; "all-linear" in a list adds that
            set to the names: ``target_filter``).
        energy: if given, each module gets the smallest rank holding this fraction of ‖D‖², up to
            ``rank`` (written as a rank_pattern).
        min_rel_change: skip modules with ‖D‖ / ‖W_base‖ at or below this.
        fan_in_fan_out: weights are stored (in, out), as GPT-2's Conv1D (default: detected from
            the tuned model's config.json model_type).
        progress: show a progress bar over the tensors on stderr (when it is a terminal).

    Returns:
        A report: per-module rank, relative error, ‖D‖ and ‖D‖/‖W‖; skipped changed tensors.

    Raises:
        ValueError: if rank < 1, alpha is not a finite number > 0, the models share no tensor name,
            shapes differ, a weights file is corrupt, a targeted weight holds NaN or inf (model and
            tensor named), or nothing is left to extract.
        FileNotFoundError: if a model path is missing.
        FileExistsError: if ``out`` exists and is not an empty directory (nothing is overwritten).
    """
    _check_rank(rank)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not (math.isfinite(alpha) and alpha > 0)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    _check_energy(energy)
    check_new_directory(out)
    chosen = target_filter(targets)
    named = [t for t in (targets or ()) if t != "all-linear"]
    base_sd = open_weights(base)  # (each tensor read when the loop reaches it)
    tuned_sd = open_weights(tuned)
    alpha = float(rank if alpha is None else alpha)
    if fan_in_fan_out is None:
        try:
            fan_in_fan_out = load_config(tuned).get("model_type") == "gpt2"
        except FileNotFoundError:
            fan_in_fan_out = False
    if not set(tuned_sd) & set(base_sd):
        raise ValueError(f"{source_label(base)} and {source_label(tuned)} share no weights (no tensor name in "
                         f"common): they are not the same model architecture")
    rows, skipped, tensors, ranks, candidates = [], [], {}, {}, []
    embeddings = _embedding_modules(tuned) if named else set()  # the default set leaves them out
    tied = _tied_head(base)
    for key in _bar(sorted(tuned_sd, key=natural_key), progress, "extract"):
        source = key if key in base_sd else tied.get(key)
        if source is None or source not in base_sd:
            skipped.append({"tensor": key, "why": "not in base"})
            continue
        w0, w1 = base_sd[source], tuned_sd[key]
        if w0.shape != w1.shape:
            raise ValueError(f"tensor {key!r}: base shape {tuple(w0.shape)} != tuned shape {tuple(w1.shape)}")
        if not key.endswith(".weight") or w0.dim() != 2:
            if not torch.equal(w0, w1):
                skipped.append({"tensor": key, "why": "changed but not a 2-D weight (use modules_to_save)"})
            continue
        name = key[: -len(".weight")]
        if not chosen(name):
            if not torch.equal(w0, w1):
                skipped.append({"tensor": key, "why": "changed but not targeted"})
            continue
        candidates.append(name)
        check_finite(w0, base, key)
        check_finite(w1, tuned, key)
        d = w1.double() - w0.double()
        kind = "embedding" if name in embeddings else "linear"
        # (GPT-2's Conv1D layers store (in, out); its lm_head is an nn.Linear, (out, in))
        if (fan_in_fan_out and not name.endswith("lm_head")) or kind == "embedding":
            # LoRA factors are (out, r) and (r, in) whatever the weight layout; an embedding's
            # (num, dim) weight changes by (B A)ᵀ, B (dim, r), A (r, num), as PEFT stores them
            d = d.T
        dn, wn = float(torch.linalg.vector_norm(d)), float(torch.linalg.vector_norm(w0.double()))
        if dn == 0.0 or dn <= min_rel_change * wn:
            continue
        u, s, vh = svd_tall(d)
        k = min(rank, s.numel())
        if energy is not None:
            k = max(1, min(k, energy_rank(s, energy)))
        # the scaling the saved config gives this module: k goes into rank_pattern when it is not `rank`
        B, A = _split(u, s, vh, k, scaling_of(alpha, k, False))
        tensors.update(_factors_to_tensors(name, kind, B, A, None, torch.float32))
        ranks[name] = k
        rows.append({"module": name, "r": k, "rel_error": truncation_error(s, k), "delta_norm": dn,
                     "rel_change": dn / wn if wn else float("inf"), "rank90": energy_rank(s, 0.9),
                     "rank99": energy_rank(s, 0.99)})
    if not rows:
        raise ValueError(f"no targeted weight differs between {str(base)!r} and {str(tuned)!r}")
    config = _base_config(None if is_default(base) else str(base), rank, alpha,
                          _compact_targets(list(ranks), candidates), False)
    config["fan_in_fan_out"] = bool(fan_in_fan_out)
    config["rank_pattern"] = _rank_pattern(ranks, rank, candidates)
    _write_adapter(out, config, tensors)
    return {"out": str(out), "rank": rank, "alpha": alpha, "modules": rows, "skipped": skipped,
            "mean_rel_error": sum(r["rel_error"] for r in rows) / len(rows)}


def resize_adapter(
    path: str | Path,
    rank: int,
    out: str | Path,
    energy: float | None = None,
) -> dict[str, Any]:
    """Compress an adapter to rank ≤ ``rank`` by truncated SVD of each module's ΔW.

    The new factors absorb the new scaling (lora_alpha and alpha_pattern are kept, so scaling =
    alpha / r_new), hence scaling_new * B' @ A' is the best rank-r_new approximation of the old ΔW.
    A module already below ``rank`` keeps its rank, and one whose weight's min(out, in) is below
    ``rank`` gets that (its ΔW cannot have more); both are recorded in rank_pattern.

    Args:
        path: adapter directory.
        rank: target rank.
        out: output directory.
        energy: optionally, per module the smallest rank holding this fraction of ‖ΔW‖²
            (capped at ``rank``), written as a rank_pattern.

    Returns:
        A report with per-module old/new rank and relative error ‖ΔW − ΔW'‖ / ‖ΔW‖.

    Raises:
        ValueError: on rank < 1, a rank above the adapter's largest, a DoRA adapter (its magnitude
            depends on ΔW's column norms), a module whose scaling is zero (lora_alpha 0), or one on a
            grouped convolution (its B's layout is not that of a truncated SVD).
        FileExistsError: if ``out`` exists and is not an empty directory (so never the input itself).
    """
    _check_rank(rank)
    _check_energy(energy)
    check_new_directory(out)
    ad = read_adapter(path)
    if not ad.modules:
        raise ValueError(f"adapter {str(path)!r} holds no LoRA modules to resize")
    if ad.config.get("use_dora") or any(m.magnitude is not None for m in ad.modules.values()):
        raise ValueError(f"adapter {str(path)!r} is DoRA: resizing would change its magnitude normalisation")
    grouped = [m.name for m in ad.modules.values() if m.groups > 1]
    if grouped:
        raise ValueError(f"adapter {str(path)!r}: module {grouped[0]!r} is on a convolution of "
                         f"{ad.modules[grouped[0]].groups} groups, whose B reads the rank channels group by group; "
                         "a truncated SVD of its ΔW does not keep that layout, so it cannot be resized")
    largest = max(m.r for m in ad.modules.values())
    if rank > largest:
        raise ValueError(f"rank {rank} is above the adapter's largest rank ({largest}); resize only lowers ranks")
    for mod in ad.modules.values():
        if mod.scaling == 0:
            raise ValueError(f"adapter {str(path)!r}: module {mod.name!r} has scaling 0 (lora_alpha {mod.alpha:g}), "
                             f"so its ΔW is zero: there is nothing to resize")
    rslora = bool(ad.config.get("use_rslora", False))
    tensors: dict[str, torch.Tensor] = dict(ad.other)
    rows, ranks = [], {}
    for name, mod in ad.modules.items():
        u, s, vh = spectrum_of_product(*mod.factors())
        k = min(rank, s.numel())  # s.numel() = min(r, out, in): the rank the tensors can really have
        if energy is not None:
            k = max(1, min(k, energy_rank(s, energy)))
        new_scaling = scaling_of(mod.alpha, k, rslora)
        B, A = _split(u, s, vh, k, new_scaling)
        conv = tuple(mod.A.shape) if mod.kind.startswith("conv") else None
        tensors.update(_factors_to_tensors(name, mod.kind, B, A, conv, mod.A.dtype))
        ranks[name] = k
        error = truncation_error(s, k)
        if mod.A.dtype in (torch.float16, torch.bfloat16):  # the factors as written: rounding adds ~1e-3 there
            error = _written_error(mod.factors(), B.to(mod.A.dtype).double() * new_scaling, A.to(mod.A.dtype).double())
        rows.append({"module": name, "old_r": mod.r, "r": k, "rel_error": error,
                     "delta_norm": float(torch.linalg.vector_norm(s))})
    config = dict(ad.config)
    config["r"] = rank
    config["rank_pattern"] = _rank_pattern(ranks, rank)
    _write_adapter(out, config, tensors)
    errs = [r["rel_error"] for r in rows]
    old_params = sum(m.num_params() for m in ad.modules.values())
    new_params = sum(t.numel() for k, t in tensors.items() if k not in ad.other)
    return {"out": str(out), "rank": rank, "modules": rows, "max_rel_error": max(errs, default=0.0),
            "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
            "old_params": old_params, "new_params": new_params}


def delta_spectra(
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    tuned: str | Path | None = None,
    targets: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values of each module's ΔW, from an adapter or from a tuned model beside its base.
    Modules whose ΔW is exactly zero (an untrained adapter's B = 0, an unchanged weight) are left out.

    Raises:
        ValueError: if neither an adapter nor a tuned model is given, or a weight of the base or tuned
            model holds NaN or inf (the model and tensor are named).
    """
    return delta_spectra_details(adapter, base, tuned, targets).spectra


@dataclass
class DeltaSpectra:
    """``delta_spectra``'s singular values, with what a recommendation needs besides them.

    Attributes:
        spectra: module -> singular values of its ΔW (non-zero updates only).
        floors: module -> the largest singular value the storage rounding of the tuned and base
            weights would give (``rounding_floor``; 0 for an adapter, whose B @ A is exact).
        compared: how many 2-D weights (targeted, in both models) were compared; adapter: modules read.
        skipped: names of changed tensors left out for not being 2-D matrices (tuned mode).
        groups: module -> G of an adapter on a grouped convolution (its ranks are multiples of G).
    """

    spectra: dict[str, torch.Tensor]
    floors: dict[str, float] = field(default_factory=dict)
    compared: int = 0
    skipped: list[str] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)


def rounding_floor(*weights: torch.Tensor) -> float:
    """A bound on the largest singular value that rounding each of ``weights`` (m × n: the tuned and
    the base weight) once to its dtype can give: directions of their difference below it cannot be
    told from that rounding.

    Each element's rounding error is uniform over ± half its ulp, variance v = ulp²/12 (bf16: ~2⁻⁸
    of the weight), the tensors' errors independent. For a matrix of independent errors with that
    variance profile the largest singular value stays below √(max row Σ v) + √(max column Σ v) plus
    a term of order √(max v · log min(m, n)) (Bandeira–van Handel); that sum is the floor. For
    evenly spread errors it is the Marchenko–Pastur edge σ(√m + √n) with a margin (pure bf16 / fp16
    rounding of 16 × 32 … 576 × 1536 Gaussian weights, hundreds of draws, never exceeded it); rows or
    columns of outlier weights, whose ulps are larger, raise it as they raise the noise. Both
    tensors count: a base already on its dtype's grid (the tuned model trained from it) adds no
    rounding of its own, and the floor then overstates the noise by up to √2 — a margin kept
    because the files cannot tell that case from two separately rounded copies.
    """
    variance, shape = None, None
    for weight in weights:
        if not weight.is_floating_point() or weight.dim() != 2 or weight.numel() == 0:
            continue
        w = weight.detach().double()
        _, exponent = torch.frexp(w)  # |w| = mantissa · 2^exponent, mantissa in [0.5, 1)
        ulp = torch.ldexp(torch.full_like(w, torch.finfo(weight.dtype).eps / 2), exponent)
        v = torch.where(w == 0, torch.zeros_like(ulp), ulp).square() / 12
        variance, shape = (v if variance is None else variance + v), w.shape
    if variance is None:
        return 0.0
    rows, cols = float(variance.sum(dim=1).max()), float(variance.sum(dim=0).max())
    spread = float(variance.max()) * (math.log(min(shape)) + 1)
    return math.sqrt(rows) + math.sqrt(cols) + math.sqrt(spread)


def delta_spectra_details(
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    tuned: str | Path | None = None,
    targets: list[str] | None = None,
    progress: bool = False,
) -> DeltaSpectra:
    """``delta_spectra`` with each module's rounding floor and what was compared or skipped
    (``progress``: a progress bar over a tuned model's tensors on stderr, when it is a terminal)."""
    out: dict[str, torch.Tensor] = {}
    if adapter is not None:
        modules = read_adapter(adapter).modules
        for name, mod in modules.items():
            s = singular_values_of_product(*mod.factors())
            if bool((s > 0).any()):
                out[name] = s
        return DeltaSpectra(out, {name: 0.0 for name in out}, len(modules),
                            groups={name: modules[name].groups for name in out if modules[name].groups > 1})
    if tuned is None:
        raise ValueError("give an adapter, or a tuned model with its base")
    base_sd, tuned_sd = open_weights(base), open_weights(tuned)  # (read one tensor at a time)
    chosen = target_filter(targets)
    result = DeltaSpectra(out)
    for key in _bar(sorted(tuned_sd, key=natural_key), progress, "spectra"):
        if not key.endswith(".weight") or key not in base_sd:
            continue
        name = key[: -len(".weight")]
        if not chosen(name):
            continue
        if tuned_sd[key].dim() != 2:
            if base_sd[key].shape == tuned_sd[key].shape and not torch.equal(base_sd[key], tuned_sd[key]):
                result.skipped.append(key)
            continue
        if base_sd[key].shape != tuned_sd[key].shape:
            raise ValueError(f"tensor {key!r}: base shape {tuple(base_sd[key].shape)} != tuned shape "
                             f"{tuple(tuned_sd[key].shape)} ({source_label(tuned)} is not a fine-tune of "
                             f"{source_label(base)})")
        check_finite(base_sd[key], base, key)
        check_finite(tuned_sd[key], tuned, key)
        result.compared += 1
        d = tuned_sd[key].double() - base_sd[key].double()
        if torch.count_nonzero(d) == 0:
            continue
        out[name] = svdvals_tall(d)
        result.floors[name] = rounding_floor(tuned_sd[key], base_sd[key])
    return result


__all__ = [
    "Adapter", "LoraModule", "read_adapter", "inspect_adapter", "check_against_base", "extract_adapter",
    "resize_adapter", "delta_spectra", "delta_spectra_details", "rounding_floor", "energy_rank", "truncation_error", "spectrum_of_product",
]
