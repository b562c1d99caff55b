"""Physical (T_eff x M_H) and SNR bins.

Physical bins: T_eff edges 3750/4500/5250/6000 K, M_H edges -2/-1/0/0.5 dex;
``index = 3 * teff_bin + mh_bin`` (0 Cool-Poor ... 8 Hot-Rich). The outermost
edges are closed and values beyond them fall into the outer bins, so every
sample has a bin. Data rows whose labels lie outside ``LABEL_BOUNDS`` (the outer bin
edges, and log g in [1, 5]) are rejected or dropped before any work
(:mod:`moe.data.row_check`), so no row is mis-binned.

SNR bins (index in increasing SNR): X (<= 2), L (2, 4], M (4, 7], H (> 7).
A *cell* is the pair (physical bin, SNR bin): ``cell = 4 * phys_bin + snr_bin``.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

TEFF_EDGES = (3750.0, 4500.0, 5250.0, 6000.0)
MH_EDGES = (-2.0, -1.0, 0.0, 0.5)
LOG_G_RANGE = (1.0, 5.0)
# closed label ranges a row must lie in: the outer physical-bin edges, and the log g range of the experts
LABEL_BOUNDS = {"log_g": LOG_G_RANGE, "T_eff": (TEFF_EDGES[0], TEFF_EDGES[-1]), "M_H": (MH_EDGES[0], MH_EDGES[-1])}
TEFF_NAMES = ("Cool", "Mid", "Hot")
MH_NAMES = ("Poor", "Solar", "Rich")
PHYS_BIN_NAMES = tuple(f"{t}-{m}" for t in TEFF_NAMES for m in MH_NAMES)
N_PHYS_BINS = 9

SNR_EDGES = (2.0, 4.0, 7.0)
SNR_BIN_NAMES = ("X", "L", "M", "H")
N_SNR_BINS = 4
# for figure labels: "X: ≤ 2", "L: 2–4", "M: 4–7", "H: > 7" and "X ≤ 2 < L ≤ 4 < M ≤ 7 < H"
SNR_BIN_LABELS = tuple(
    f"{name}: {span}"
    for name, span in zip(
        SNR_BIN_NAMES,
        (f"≤ {SNR_EDGES[0]:g}", *(f"{a:g}–{b:g}" for a, b in pairwise(SNR_EDGES)), f"> {SNR_EDGES[-1]:g}"),
    )
)
SNR_BIN_RULE = "".join(f"{name} ≤ {edge:g} < " for name, edge in zip(SNR_BIN_NAMES, SNR_EDGES)) + SNR_BIN_NAMES[-1]
N_CELLS = N_PHYS_BINS * N_SNR_BINS


def _closed_bin(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Index of the half-open interval [e_i, e_{i+1}) holding each value; outer edges closed."""
    inner = np.asarray(edges[1:-1])
    return np.searchsorted(inner, np.asarray(values, dtype=np.float64), side="right").astype(np.int64)


def phys_bin(teff: np.ndarray, mh: np.ndarray) -> np.ndarray:
    """Physical bin index in 0..8 for arrays of T_eff [K] and M_H [dex]."""
    return 3 * _closed_bin(teff, TEFF_EDGES) + _closed_bin(mh, MH_EDGES)


def snr_bin(snr: np.ndarray) -> np.ndarray:
    """SNR bin index (0=X <= 2, 1=L (2,4], 2=M (4,7], 3=H > 7); right-closed intervals."""
    return np.searchsorted(np.asarray(SNR_EDGES), np.asarray(snr, dtype=np.float64), side="left").astype(np.int64)


def snr_slice_names(high_first: bool = False) -> list[str]:
    """The row names of an "all, then every SNR bin" table: "all", then the SNR bins X to H (H to X with
    ``high_first``); the names of :func:`snr_slices`."""
    order = range(N_SNR_BINS - 1, -1, -1) if high_first else range(N_SNR_BINS)
    return ["all"] + [SNR_BIN_NAMES[i] for i in order]


def snr_slices(snr_idx, high_first: bool = False, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """The rows of an "all, then every SNR bin" table: ("all", every row), then (``prefix`` + bin name, its rows)
    per SNR bin, X to H (H to X with ``high_first``). ``snr_idx`` [N] SNR bin indices (numpy array, or torch
    tensor for metrics computed on the device) -> boolean masks [N] of the same kind."""
    if isinstance(snr_idx, torch.Tensor):
        every = torch.ones_like(snr_idx, dtype=torch.bool)
    else:
        snr_idx = np.asarray(snr_idx)
        every = np.ones(snr_idx.shape, dtype=bool)
    _, *snr_names = snr_slice_names(high_first)
    return [("all", every)] + [(prefix + name, snr_idx == SNR_BIN_NAMES.index(name)) for name in snr_names]


def cell(phys: np.ndarray, snr_idx: np.ndarray) -> np.ndarray:
    """Joint (physical, SNR) cell index in 0..35."""
    return N_SNR_BINS * np.asarray(phys, dtype=np.int64) + np.asarray(snr_idx, dtype=np.int64)


def edge_distance(teff: np.ndarray, mh: np.ndarray) -> np.ndarray:
    """Distance to the nearest interior T_eff or M_H bin edge, in units of that bin's width.

    Used to select *boundary samples* (e.g. within 0.1 of a bin width of an edge).
    """
    teff = np.asarray(teff, dtype=np.float64)
    mh = np.asarray(mh, dtype=np.float64)
    out = np.full(teff.shape, np.inf)
    for values, edges in ((teff, TEFF_EDGES), (mh, MH_EDGES)):
        idx = _closed_bin(values, edges)
        widths = np.diff(edges)[idx]
        for e in edges[1:-1]:
            out = np.minimum(out, np.abs(values - e) / widths)
    return out
