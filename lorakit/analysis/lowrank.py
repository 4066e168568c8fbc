"""The low-rank decomposition demo: LoRA's parameter arithmetic and truncated-SVD reconstruction.

LoRA replaces the update of a d x k matrix W by B @ A with B (d x r) and A (r x k)
(Hu et al. 2021, section 4.1), so it trains r(d + k) numbers instead of d*k. How much of a
matrix a rank-r product can hold is answered by the SVD: the best rank-r approximation in
Frobenius norm is the truncated SVD (Eckart-Young), with relative error
sqrt(Σ_{i>r} σᵢ²) / sqrt(Σ σᵢ²) and "energy captured" Σ_{i≤r} σᵢ² / Σ σᵢ².
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from lorakit.analysis.adapter_tools import energy_rank, natural_key, svdvals_tall, truncation_error
from lorakit.analysis.names import LESSON_RANKS, LESSON_SYNTHETIC, MAX_MATRICES  # noqa: F401 (the lab's names, here too)
from lorakit.analysis.weights import LazyWeights, check_finite, open_weights, source_label

DEFAULT_MODULES = r"layers\.0\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _check_ranks(ranks: Sequence[int], *sizes: int) -> None:
    """Ranks (and sizes) are integers, not bools: a float rank was truncated or made fractional
    counts. (Each caller then checks they are >= 1 and fit its matrix.)"""
    for what, values in (("ranks", ranks), ("sizes", sizes)):
        bad = [r for r in values if isinstance(r, bool) or not isinstance(r, int)]
        if bad:
            raise ValueError(f"{what} must be integers, got {bad}")


def parameter_table(d: int = 1000, k: int = 1000, ranks: Sequence[int] = LESSON_RANKS) -> list[dict[str, Any]]:
    """The lesson's table: parameters of A (r x k) and B (d x r) against the full d x k matrix.

    Args:
        d: rows of W (output features).
        k: columns of W (input features).
        ranks: ranks r to tabulate.

    Returns:
        One row per rank: rank, params_A, params_B, lora_params = r(d+k), full_params = d*k,
        compression = d*k / (r(d+k)), removed_pct = 100 * (1 - r(d+k) / (d*k)).

    Raises:
        ValueError: if d, k or a rank is < 1, or a rank exceeds min(d, k) (the matrix's own rank limit).
    """
    _check_ranks(ranks, d, k)
    if d < 1 or k < 1:
        raise ValueError(f"matrix dimensions must be >= 1, got {d} x {k}")
    too_big = [r for r in ranks if r > min(d, k)]
    if too_big:
        raise ValueError(f"rank(s) {too_big} exceed min(d, k) = {min(d, k)} of a {d} x {k} matrix")
    rows = []
    for r in ranks:
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
        lora = r * (d + k)
        rows.append({"rank": r, "params_A": r * k, "params_B": d * r, "lora_params": lora, "full_params": d * k,
                     "compression": d * k / lora, "removed_pct": 100.0 * (1 - lora / (d * k))})
    return rows


def synthetic_low_rank(rows: int = 100, cols: int = 100, true_rank: int = 5, seed: int = 0) -> torch.Tensor:
    """A random (rows x cols) matrix of exactly ``true_rank``: a product of Gaussian factors.

    Raises:
        ValueError: if rows or cols is < 1, or the rank is < 1 or exceeds min(rows, cols).
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"matrix dimensions must be >= 1, got {rows} x {cols}")
    if not 1 <= true_rank <= min(rows, cols):
        raise ValueError(f"true_rank must be in [1, {min(rows, cols)}], got {true_rank}")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, true_rank, generator=g, dtype=torch.float64) @ torch.randn(
        true_rank, cols, generator=g, dtype=torch.float64)


def reconstruction_errors(W: torch.Tensor, ranks: Sequence[int]) -> list[dict[str, Any]]:
    """Reconstruct W from its truncated SVD at each rank and measure the error.

    The reconstruction W_r = U_r diag(S_r) V_rᵀ is built explicitly (this is the demo), and the
    error is measured on it, not taken from the formula.

    Args:
        W: a 2-D matrix of finite values.
        ranks: ranks to try, each in [1, min(W.shape)].

    Returns:
        Rows of rank, abs_error ‖W − W_r‖_F, rel_error (divided by ‖W‖_F), energy captured.

    Raises:
        ValueError: if W is not 2-D or holds NaN or inf, or a rank is < 1 or above min(W.shape).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("the matrix holds NaN or inf")
    _check_ranks(ranks)
    if any(int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {list(ranks)}")
    too_big = [int(r) for r in ranks if int(r) > min(W.shape)]
    if too_big:
        raise ValueError(f"rank(s) {too_big} exceed min(rows, cols) = {min(W.shape)} of a "
                         f"{W.shape[0]} x {W.shape[1]} matrix")
    W = W.double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    norm = float(torch.linalg.vector_norm(W)) or 1.0
    total = float((S**2).sum()) or 1.0
    rows = []
    for r in ranks:
        k = int(r)
        approx = (U[:, :k] * S[:k]) @ Vh[:k]
        err = float(torch.linalg.vector_norm(W - approx))
        rows.append({"rank": int(r), "abs_error": err, "rel_error": err / norm,
                     "energy": float((S[:k] ** 2).sum()) / total})
    return rows


def select_weights(source: str | None, module: str | None = None,
                   limit: int = MAX_MATRICES) -> dict[str, torch.Tensor]:
    """2-D weight matrices of a model whose module name matches ``module`` (a regex searched in the
    name; default: the attention and MLP projections of layer 0): the first ``limit`` of them, in the
    weights files' order (:func:`select_weights_counted` also says how many matched).

    Raises:
        ValueError: if nothing matches, or a selected weight holds NaN or inf (model and tensor named).
    """
    return select_weights_counted(source, module, limit)[0]


def select_weights_counted(source: str | None, module: str | None = None,
                           limit: int = MAX_MATRICES) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`select_weights` and the number of matching matrices (more than returned when over ``limit``).

    Raises:
        ValueError: as :func:`select_weights`.
    """
    try:
        pattern = re.compile(module or DEFAULT_MODULES)
    except re.error as exc:
        raise ValueError(f"--module {module!r} is not a valid regular expression: {exc}") from exc
    sd = open_weights(source)  # (one tensor at a time: only the matrices shown are read)
    shape = sd.shape if isinstance(sd, LazyWeights) else (lambda key: tuple(sd[key].shape))
    out, matched = {}, 0
    for key in sorted(sd, key=natural_key):  # (layer order, whatever the files': layers.2 before layers.10)
        if key.endswith(".weight") and pattern.search(key[: -len(".weight")]) and len(shape(key)) == 2:
            matched += 1
            if len(out) < limit:
                t = sd[key]
                check_finite(t, source, key)
                out[key[: -len(".weight")]] = t
    if not out:
        raise ValueError(f"no 2-D weight of {source_label(source)} matches module pattern "
                         f"{module or DEFAULT_MODULES!r}")
    return out, matched


def spectrum_report(weights: dict[str, torch.Tensor], ranks: Sequence[int] = LESSON_RANKS) -> dict[str, Any]:
    """Singular values of each matrix, energy captured and relative error at each rank, and the
    effective ranks at 90% / 99% energy (a rank above a matrix's size counts as its full rank; a
    zero matrix has relative error 0 and energy 0 at every rank, as in :func:`reconstruction_errors`).

    Raises:
        ValueError: if a rank is < 1, or a matrix holds NaN or inf (it is named).
    """
    _check_ranks(ranks)
    if any(int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {list(ranks)}")
    report: dict[str, Any] = {}
    for name, W in weights.items():
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"matrix {name!r} holds NaN or inf")
        S = svdvals_tall(W.double())
        total = float((S**2).sum()) or 1.0
        cum = torch.cumsum(S**2, 0) / total
        report[name] = {
            "shape": list(W.shape),
            "singular_values": S.tolist(),
            "energy": {int(r): float(cum[min(r, S.numel()) - 1]) for r in ranks},
            "rel_error": {int(r): truncation_error(S, min(int(r), S.numel())) for r in ranks},
            "rank90": energy_rank(S, 0.90),
            "rank99": energy_rank(S, 0.99),
            "full_rank": min(W.shape),
        }
    return report
