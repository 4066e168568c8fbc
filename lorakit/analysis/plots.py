"""PNG plots for the lab, rendered headless with matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display: always render to files).

    matplotlib's first import, where its config directory cannot be written (a read-only HOME),
    logged two warnings about it before every plot lorakit makes; it then works from a temporary
    directory it removes at exit, so those warnings are kept off lorakit's output."""
    import logging
    import sys

    if "matplotlib" not in sys.modules:
        log = logging.getLogger("matplotlib")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            import matplotlib
        finally:
            log.setLevel(level)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` as a PNG at ``path``: whole or not at all (an error or Ctrl-C while rendering
    left a truncated file under the final name)."""
    import io

    from lorakit.io import atomic_write_bytes

    out = Path(path)
    try:
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
    finally:
        pyplot().close(fig)
    atomic_write_bytes(out, png.getvalue())
    return out


def plot_param_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """LoRA parameters and compression ratio against rank (log-log)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [r["rank"] for r in rows]
    ax.loglog(ranks, [r["lora_params"] for r in rows], "o-", label="LoRA parameters r(d+k)")
    ax.axhline(rows[0]["full_params"], color="gray", ls="--", label="full matrix d·k")
    ax.set_xlabel("rank r")
    ax.set_ylabel("parameters")
    ax2 = ax.twinx()
    ax2.semilogx(ranks, [r["compression"] for r in rows], "s:", color="tab:red", label="compression")
    ax2.set_yscale("log")
    ax2.set_ylabel("compression ratio (x)", color="tab:red")
    ax.legend(loc="center left")
    ax.set_title("LoRA factor size vs rank")
    return _save(fig, path)


def plot_error_vs_rank(series: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path,
                       true_rank: int | None = None, title: str = "Truncated-SVD reconstruction error") -> Path:
    """Relative reconstruction error against rank, one line per matrix."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (ranks, errs) in series.items():
        ax.plot(ranks, [max(e, 1e-17) for e in errs], "o-", label=label)
    if true_rank is not None:
        ax.axvline(true_rank, color="gray", ls="--", label=f"true rank {true_rank}")
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("‖W − W_r‖ / ‖W‖")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_spectra(spectra: dict[str, Sequence[float]], path: str | Path, title: str = "Singular-value spectrum") -> Path:
    """Normalised singular values (left) and cumulative energy (right) per matrix."""
    import numpy as np

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, s in spectra.items():
        s = np.asarray(s, dtype=float)
        if s.size == 0 or s[0] == 0:
            continue
        idx = np.arange(1, s.size + 1)
        a1.semilogy(idx, s / s[0], label=label, lw=1)
        a2.plot(idx, np.cumsum(s**2) / np.sum(s**2), label=label, lw=1)
    a1.set_xlabel("index i")
    a1.set_ylabel("σᵢ / σ₁")
    a1.set_title(title)
    for level in (0.9, 0.99):
        a2.axhline(level, color="gray", ls=":", lw=0.8)
    a2.set_xscale("log")
    a2.set_xlabel("rank r")
    a2.set_ylabel("energy captured (top-r σ² / all σ²)")
    a2.set_title("Energy captured")
    if len(spectra) <= 12:
        a2.legend(fontsize=7)
    return _save(fig, path)


def plot_memory_breakdown(estimates: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Stacked bars of what is live at each method's peak: weights, gradients, optimizer states,
    activations, temporaries (they sum to the peak)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    parts = ("weights", "gradients", "optimizer_states", "activations", "transient")
    labels = [e["method"] for e in estimates]
    bottom = [0.0] * len(estimates)
    for part in parts:
        vals = [e["at_peak"][part] / 2**30 for e in estimates]
        ax.bar(labels, vals, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, e in enumerate(estimates):
        ax.annotate(f"peak {e['peak'] / 2**30:.1f} GiB", (i, e["peak"] / 2**30), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB live at the peak")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_module_bars(names: Sequence[str], values: dict[str, Sequence[float]], path: str | Path,
                     ylabel: str, title: str) -> Path:
    """Grouped bars per module (e.g. effective rank at 90% / 99%, or relative error)."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.8 / max(1, len(values))
    for i, (label, vals) in enumerate(values.items()):
        ax.bar(x + i * width, vals, width, label=label)
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in names],
                       rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
