"""The sigma map: the per-SNR-bin recalibration of a per-star sigma against residuals r.

``sigma' = scale_b * ref_b * (sigma / ref_b) ** gamma`` per SNR bin b (:func:`sigma_map` fits it,
:func:`apply_sigma_map` applies it), then one factor for all bins from held-out residuals
(:func:`validation_check`); in between, a factor per cell of the standardised prediction within each bin
(:func:`cell_scales`, applied by :func:`apply_cells`). The target is z = r / sigma with 68.3% of |z| <= 1, 95.4% <= 2 and std 1,
as for a Gaussian. Misses are measured in units of their tolerance (``TOLERANCE``: 3 and 2 percentage
points, 0.1 in std), the std weighted down (``STD_WEIGHT``) because a few outliers move it. Numpy in,
numpy out (``apply_sigma_map`` also takes tensors); :mod:`moe.gates.calibration` holds the fitted map.
"""

from __future__ import annotations

import numpy as np

from moe.data import bins

MIN_ROWS = 20  # fewest residuals of a group to fit its factor to the targets; fewer: the RMS of z

GAUSS_1SIGMA, GAUSS_2SIGMA = 0.682689, 0.954500  # P(|z| <= 1), P(|z| <= 2) of a standard normal
TOLERANCE = (0.03, 0.02, 0.1)  # the calibration targets' tolerances: 1-sigma, 2-sigma coverage, z std
STD_WEIGHT = 0.3  # weight of the std miss against the coverage misses
MIN_MAP_ROWS = 200  # fewest residuals to fit the exponent of ``sigma_map``; fewer: the factors alone
POWERS = np.round(np.linspace(0.5, 2.5, 101), 4)  # the exponents searched by ``sigma_map``
POWER_PRIOR = 1.0  # penalty on (gamma - 1)^2 added to the mean miss: gamma leaves 1 only for a clear gain
N_CELLS = 5  # cells of the standardised prediction per group in ``cell_scales`` (quantiles: equal counts)
MIN_CELL_ROWS = 500  # fewest residuals per cell (on average) to fit the cells; fewer: one cell, factor 1


def _scale_fit(sorted_abs_z: np.ndarray, std_weight: float) -> tuple[float, float]:
    """(s, miss): the factor s for sigma whose z = |z| / s misses the targets least, and that miss
    (squared, in units of the tolerances), on ascending finite |z| [N]."""
    rms = float(np.sqrt(np.mean(sorted_abs_z**2)))
    if rms == 0:
        return 1.0, 0.0
    s = rms * np.geomspace(0.25, 4.0, 801)
    n = sorted_abs_z.size
    cover1 = np.searchsorted(sorted_abs_z, s, side="right") / n
    cover2 = np.searchsorted(sorted_abs_z, 2.0 * s, side="right") / n
    tol1, tol2, tol_std = TOLERANCE
    miss = ((cover1 - GAUSS_1SIGMA) / tol1) ** 2 + ((cover2 - GAUSS_2SIGMA) / tol2) ** 2
    miss = miss + std_weight * ((rms / s - 1.0) / tol_std) ** 2  # std of z about 0: its RMS
    i = int(np.argmin(miss))
    return float(s[i]), float(miss[i])


def coverage_scale(abs_z: np.ndarray, min_rows: int = MIN_ROWS, std_weight: float = STD_WEIGHT) -> float:
    """The factor s for sigma that brings |z| / s [N] closest to the targets (module docstring): the 1- and
    2-sigma coverage of a Gaussian and, weighted down, std 1. The RMS of z below ``min_rows`` values.

    Residuals of a mixture of experts are not Gaussian, so matching the RMS alone would leave the
    1-sigma interval too wide (heavy tails) or too narrow (light tails); matching the coverages balances
    the body and the tails.
    """
    abs_z = np.sort(np.asarray(abs_z, np.float64)[np.isfinite(abs_z)])
    if abs_z.size == 0:
        return 1.0
    if abs_z.size < min_rows:
        return float(np.sqrt(np.mean(abs_z**2))) or 1.0
    return _scale_fit(abs_z, std_weight)[0]


def apply_sigma_map(spread, scale, ref, power):
    """``scale * ref * (spread / ref) ** power``: the recalibrated sigma of raw spreads (numpy arrays or torch
    tensors, broadcast; the map :func:`sigma_map` fits)."""
    return scale * ref * (spread / ref) ** power


def sigma_map(
    abs_r: np.ndarray, sigma: np.ndarray, group: np.ndarray, n_groups: int = bins.N_SNR_BINS
) -> tuple[np.ndarray, np.ndarray, float]:
    """The recalibration ``sigma' = scale_g * ref_g * (sigma / ref_g) ** gamma`` of G groups (SNR bins)
    that brings |r| / sigma' closest to the targets in every group, from residuals |r|, sigma, group [N].

    ``ref_g`` is the group's median sigma. For each exponent ``gamma`` (one for all groups) each group
    gets its best factor; the ``gamma`` with the least mean miss (groups weighted by size) plus
    ``POWER_PRIOR (gamma - 1)^2`` wins (the miss is flat within sampling noise over a range of
    ``gamma``). It is an affine map of log sigma: ``gamma > 1`` widens the spread of sigma between
    stars, i.e. fattens the tails of z. Residuals whose sigma tracks them well are lighter-tailed
    than a Gaussian (log g is bounded; part of the error is a bias that depends on the true value):
    no factor alone then gives 68.3% within 1 sigma and 95.4% within 2, one exponent does. Returns
    ``scale [G], ref [G], gamma``; a group with no residuals keeps sigma, one with fewer than
    ``MIN_ROWS`` takes the RMS of its z, and with fewer than ``MIN_MAP_ROWS`` residuals in all
    ``gamma`` is 1.
    """
    abs_r, sigma, group = (np.asarray(a) for a in (abs_r, sigma, group))
    keep = np.isfinite(abs_r) & np.isfinite(sigma) & (sigma > 0)
    abs_r, sigma, group = abs_r[keep].astype(np.float64), sigma[keep].astype(np.float64), group[keep].astype(np.int64)
    ref = np.array([np.median(sigma[group == g]) if (group == g).any() else 1.0 for g in range(n_groups)])
    members = [np.flatnonzero(group == g) for g in range(n_groups)]
    log_ratio = np.log(sigma / ref[group])
    best = None
    for gamma in POWERS if abs_r.size >= MIN_MAP_ROWS else (1.0,):
        abs_z = abs_r / (ref[group] * np.exp(gamma * log_ratio))
        scale, total = np.ones(n_groups), 0.0
        for g, idx in enumerate(members):
            if idx.size >= MIN_ROWS:
                scale[g], miss = _scale_fit(np.sort(abs_z[idx]), STD_WEIGHT)
                total += miss * idx.size
            elif idx.size:
                scale[g] = float(np.sqrt(np.mean(abs_z[idx] ** 2))) or 1.0
        total = total / max(abs_r.size, 1) + POWER_PRIOR * (gamma - 1.0) ** 2
        if best is None or total < best[0]:
            best = (total, scale, float(gamma))
    return best[1], ref, best[2]


def cell_scales(
    abs_z: np.ndarray, x: np.ndarray, group: np.ndarray, n_groups: int = bins.N_SNR_BINS, n_cells: int = N_CELLS
) -> tuple[np.ndarray, np.ndarray]:
    """Edges [G, n_cells - 1] and factors [G, n_cells] for sigma per cell of the prediction x within each group,
    from recalibrated |z|, x and group [N]: the cells are the quantiles of x in the group (equal counts), each
    cell's factor the :func:`coverage_scale` of its |z|.

    Residuals are not alike across a bin's label range: at low SNR the prediction shrinks toward the label mean,
    so a star predicted near the middle may be any star and its error is larger than one predicted near an edge
    (on the embedded data, bin X's log g 1-sigma coverage by quintile of the prediction ran 76/62/57/63/73%; at
    high SNR T_eff's middle quintile 40%). A group with fewer than ``n_cells * MIN_CELL_ROWS`` residuals is one
    cell with factor 1 (edges +inf)."""
    abs_z, x, group = (np.asarray(a) for a in (abs_z, x, group))
    keep = np.isfinite(abs_z) & np.isfinite(x)
    abs_z, x, group = abs_z[keep].astype(np.float64), x[keep].astype(np.float64), group[keep].astype(np.int64)
    edges, scale = np.full((n_groups, n_cells - 1), np.inf), np.ones((n_groups, n_cells))
    for g in range(n_groups):
        sel = group == g
        if sel.sum() < n_cells * MIN_CELL_ROWS:
            continue
        edges[g] = np.quantile(x[sel], np.arange(1, n_cells) / n_cells)
        cell = cell_of(x[sel], edges[g])
        for c in range(n_cells):
            if (cell == c).any():
                scale[g, c] = coverage_scale(abs_z[sel][cell == c])
    return edges, scale


def cell_of(x, edges):
    """The cell of each prediction x [...]: how many of its ``edges`` [..., C - 1] (broadcast) it exceeds (numpy
    arrays or torch tensors)."""
    return (x[..., None] > edges).sum(-1)


def apply_cells(x, edges, scale):
    """The factor of each prediction x [N]'s cell, given its group's edges [N, C - 1] and factors [N, C], or one
    group's [C - 1] and [C] (numpy arrays or torch tensors; :func:`cell_scales` fits them)."""
    cell = cell_of(x, edges)
    if isinstance(scale, np.ndarray):
        scale = np.broadcast_to(scale, cell.shape + scale.shape[-1:])
        return np.take_along_axis(scale, cell[..., None], -1)[..., 0]
    return scale.expand(*cell.shape, scale.shape[-1]).gather(-1, cell[..., None]).squeeze(-1)


def validation_check(abs_z: np.ndarray, strictness: float = 4.0) -> float:
    """One factor for sigma from held-out |z| [N] (already recalibrated on other data), shrunk to 1 as far
    as the miss is within sampling noise.

    ``chi2`` of the 1- and 2-sigma coverage against a Gaussian's (binomial variances; about 2 when the
    sigma is calibrated) sets the shrinkage of ``log coverage_scale(abs_z)`` by ``max(0, 1 - strictness /
    chi2)``: a calibrated sigma is left alone, a clearly miscalibrated one (say, residuals of experts
    that overfit the training split) is rescaled nearly in full.
    """
    abs_z = np.asarray(abs_z, np.float64)
    abs_z = abs_z[np.isfinite(abs_z)]
    if abs_z.size < MIN_ROWS:
        return 1.0
    c1, c2 = np.mean(abs_z <= 1.0), np.mean(abs_z <= 2.0)
    p1, p2 = GAUSS_1SIGMA, GAUSS_2SIGMA
    chi2 = abs_z.size * ((c1 - p1) ** 2 / (p1 * (1 - p1)) + (c2 - p2) ** 2 / (p2 * (1 - p2)))
    shrink = max(0.0, 1.0 - strictness / chi2) if chi2 > 0 else 0.0
    return float(np.exp(shrink * np.log(coverage_scale(abs_z))))
