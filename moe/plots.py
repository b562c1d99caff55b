"""Figures shared by the gate module's TensorBoard logging and the experiment reports.

Plain matplotlib (Agg), English text, labelled axes; every function returns a Figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SNR_EDGES = (2.0, 4.0, 7.0)


def entropy_vs_snr(snr: np.ndarray, entropy: np.ndarray, n_experts: int, title: str = "Gate entropy vs SNR",
                   figsize=(6, 5)):
    """Scatter of per-spectrum gate entropy against SNR (log axis) with binned medians and the
    SNR-bin edges; the dashed line is the maximum entropy ln K."""
    snr = np.asarray(snr, float)
    entropy = np.asarray(entropy, float)
    fig, ax = plt.subplots(figsize=figsize)
    ok = np.isfinite(snr) & (snr > 0)
    ax.scatter(snr[ok], entropy[ok], s=3, alpha=0.25, color="tab:blue", rasterized=True, label="spectra")
    if ok.sum() > 10:
        edges = np.geomspace(snr[ok].min(), snr[ok].max() * 1.0001, 16)
        idx = np.digitize(snr[ok], edges) - 1
        centres, med = [], []
        for i in range(len(edges) - 1):
            sel = idx == i
            if sel.sum() >= 5:
                centres.append(np.sqrt(edges[i] * edges[i + 1]))
                med.append(np.median(entropy[ok][sel]))
        ax.plot(centres, med, "o-", color="tab:red", label="binned median")
    for e in SNR_EDGES:
        ax.axvline(e, color="grey", lw=0.8, ls=":")
    ax.axhline(np.log(max(n_experts, 1)), color="black", lw=0.8, ls="--", label=f"max entropy ln {n_experts}")
    ax.set_xscale("log")
    ax.set_xlabel("SNR  (||flux|| / ||noise_level · error||)")
    ax.set_ylabel("gate entropy [nats]")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def bar(labels: Sequence[str], values: Sequence[float], ylabel: str, title: str, hline: float | None = None,
        hline_label: str | None = None, annotate: Sequence[str] | None = None, colors=None, figsize=(6, 5)):
    """A labelled bar chart with optional reference line and per-bar annotations."""
    fig, ax = plt.subplots(figsize=figsize)
    x = np.arange(len(labels))
    bars = ax.bar(x, values, color=colors or "tab:blue")
    ax.set_xticks(x, labels, rotation=30 if max(len(s) for s in labels) > 6 else 0, ha="right" if max(len(s) for s in labels) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if hline is not None:
        ax.axhline(hline, color="red", ls="--", lw=1, label=hline_label)
        if hline_label:
            ax.legend(fontsize=8)
    texts = annotate if annotate is not None else [f"{v:.3f}" for v in values]
    for b, t in zip(bars, texts):
        h = b.get_height()
        ax.annotate(t, (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom" if h >= 0 else "top", fontsize=8)
    fig.tight_layout()
    return fig


def grouped_bar(groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, title: str,
                hline: float | None = None, hline_label: str | None = None, figsize=(6, 5), counts: Sequence[int] | None = None):
    """Bars of several series side by side per group (NaN bars are skipped)."""
    fig, ax = plt.subplots(figsize=figsize)
    x = np.arange(len(groups))
    k = len(series)
    w = 0.8 / max(k, 1)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x - 0.4 + w * (i + 0.5), np.nan_to_num(np.asarray(vals, float), nan=0.0), w, label=name)
    labels = list(groups) if counts is None else [f"{g}\n(n={c})" for g, c in zip(groups, counts)]
    long = max(len(s) for s in groups) > 6
    ax.set_xticks(x, labels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
    if hline is not None:
        ax.axhline(hline, color="red", ls="--", lw=1, label=hline_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def pred_vs_true(y: np.ndarray, pred: np.ndarray, color: np.ndarray | None = None, color_label: str = "",
                 title: str = "Predicted vs true log g", figsize=(6, 5), log_color: bool = False):
    """Scatter of predictions against truth with the 1:1 line and R^2 in the corner."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    fig, ax = plt.subplots(figsize=figsize)
    c = None if color is None else (np.log10(np.clip(color, 1e-3, None)) if log_color else color)
    sc = ax.scatter(y, pred, c=c, s=4, alpha=0.5, cmap="viridis", rasterized=True)
    if color is not None:
        cb = fig.colorbar(sc, ax=ax)
        cb.set_label(("log10 " if log_color else "") + color_label)
    lo, hi = min(y.min(), pred.min()), max(y.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    ax.text(0.04, 0.94, f"R² = {r2:.4f}\nn = {y.size}", transform=ax.transAxes, va="top", fontsize=9)
    ax.set_xlabel("true log g [dex]")
    ax.set_ylabel("predicted log g [dex]")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str, cbar_label: str,
            annotations: np.ndarray | None = None, figsize=(6, 5), cmap="RdYlGn", center: float | None = None):
    """Annotated heatmap (values, or the given annotation strings, in each cell)."""
    m = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=figsize)
    kw = {}
    if center is not None:
        span = np.nanmax(np.abs(m - center)) or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(m, cmap=cmap, aspect="auto", **kw)
    ax.set_xticks(np.arange(len(col_labels)), col_labels, fontsize=8)
    ax.set_yticks(np.arange(len(row_labels)), row_labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = annotations[i, j] if annotations is not None else (f"{m[i, j]:.3f}" if np.isfinite(m[i, j]) else "–")
            ax.text(j, i, str(text), ha="center", va="center", fontsize=8)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
