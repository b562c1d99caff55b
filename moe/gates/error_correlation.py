"""The correlation of two labels' errors per star: rho of z_a = (pred_a - true_a) / sigma_a and z_b, calibrated per
SNR bin as a linear function of the star's predicted labels.

A star's labels come out of one spectrum and one gate, so their errors are not independent, and how much
depends on the star: on the embedded data log g's and [M/H]'s z correlate by about -0.15 for predicted giants
and -0.5 for predicted dwarfs in the same SNR bin. The model, per label pair (a, b) (:func:`label_pairs`, in
``itertools.combinations`` order) and SNR bin g::

    rho = clip(c_0 + sum_l c_l x_l, -RHO_MAX, RHO_MAX),  x_l = the star's standardised prediction of label l

is the least-squares fit of the product of the bin's standardised z's, ``z~_a z~_b``, on x: E[z~_a z~_b | x] is
the correlation at x. With the slopes at 0 it is the bin's Pearson r exactly (``numpy.corrcoef``; the mean of
the fitted rho over the bin's stars always is, up to the clip). :func:`correlation_fit` fits it,
:func:`correlation_of` applies it, :func:`bin_correlation` is the per-bin r itself and
:func:`mahalanobis_coverage` the 2-D check: the share of stars whose (z_a, z_b) lies within the 68.3% and 95.4%
ellipses of a unit bivariate normal with their rho. Numpy in, numpy out (``correlation_of`` also takes
tensors); :class:`moe.gates.calibration.SigmaCalibration` holds the coefficients [P, S, 1 + L].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from moe.data import bins

MIN_ROWS = 20  # fewest stars of a bin to measure its correlation; fewer: rho 0 (no evidence of one)
MIN_SLOPE_ROWS = 1000  # fewest stars of a bin to fit rho's dependence on the predictions; fewer: the bin's r
RHO_MAX = 0.95  # |rho| is clipped here: a linear function of the predictions leaves [-1, 1] far out
COVERAGES = (0.682689, 0.954500)  # the 1- and 2-sigma probabilities of a normal, the 2-D check's levels


def label_pairs(n_labels: int) -> list[tuple[int, int]]:
    """The P = L (L - 1) / 2 pairs (a, b), a < b, of L labels, in the order of rho's first axis."""
    return list(itertools.combinations(range(n_labels), 2))


def pair_names(labels: Sequence[str]) -> list[str]:
    """Catalogue column of each pair's correlation, e.g. ``rho_log_g_M_H``."""
    return [f"rho_{labels[a]}_{labels[b]}" for a, b in label_pairs(len(labels))]


def _usable(z: np.ndarray, a: int, b: int, sel: np.ndarray) -> bool:
    return sel.sum() >= MIN_ROWS and np.ptp(z[sel, a]) > 0 and np.ptp(z[sel, b]) > 0


def _standardised(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / v.std()


def bin_correlation(z: np.ndarray, group: np.ndarray, n_groups: int = bins.N_SNR_BINS) -> np.ndarray:
    """Pearson's r [P, G] of every pair of columns of z [N, L] within each group (SNR bin) of ``group`` [N],
    over the rows where both are finite (``numpy.corrcoef``); 0 where a group has fewer than ``MIN_ROWS``
    such rows or a constant column."""
    z, group = np.asarray(z, np.float64), np.asarray(group, np.int64)
    pairs = label_pairs(z.shape[1])
    rho = np.zeros((len(pairs), n_groups))
    for p, (a, b) in enumerate(pairs):
        ok = np.isfinite(z[:, a]) & np.isfinite(z[:, b])
        for g in range(n_groups):
            sel = ok & (group == g)
            if _usable(z, a, b, sel):
                rho[p, g] = float(np.mean(_standardised(z[sel, a]) * _standardised(z[sel, b])))
    return rho


def correlation_fit(z: np.ndarray, x: np.ndarray, group: np.ndarray, n_groups: int = bins.N_SNR_BINS) -> np.ndarray:
    """Coefficients [P, G, 1 + L] of rho (module docstring) from z [N, L], the standardised predictions x [N, L]
    and the groups [N]: per pair and group, the least-squares fit of ``z~_a z~_b`` on (1, x) over the rows where
    both z's and every x are finite; the bin's r alone (slopes 0) with fewer than ``MIN_SLOPE_ROWS`` rows, 0 with
    fewer than ``MIN_ROWS`` or a constant z."""
    z, x, group = np.asarray(z, np.float64), np.asarray(x, np.float64), np.asarray(group, np.int64)
    pairs = label_pairs(z.shape[1])
    coef = np.zeros((len(pairs), n_groups, 1 + x.shape[1]))
    x_ok = np.isfinite(x).all(1)
    for p, (a, b) in enumerate(pairs):
        ok = np.isfinite(z[:, a]) & np.isfinite(z[:, b]) & x_ok
        for g in range(n_groups):
            sel = ok & (group == g)
            if not _usable(z, a, b, sel):
                continue
            product = _standardised(z[sel, a]) * _standardised(z[sel, b])
            coef[p, g, 0] = product.mean()  # the bin's r
            if sel.sum() >= MIN_SLOPE_ROWS:
                xs = x[sel] - x[sel].mean(0)  # centred: the intercept stays the bin's r
                slopes = np.linalg.lstsq(xs, product - product.mean(), rcond=None)[0]
                coef[p, g, 1:] = slopes
                coef[p, g, 0] -= slopes @ x[sel].mean(0)
    return coef


def correlation_of(coef, group, x):
    """rho [N, P] of stars in groups [N] with standardised predictions x [N, L] under coefficients [P, G, 1 + L]
    (numpy arrays or torch tensors)."""
    c = coef[:, group]  # [P, N, 1 + L]
    rho = c[..., 0] + (c[..., 1:] * x[None]).sum(-1)
    return rho.clip(-RHO_MAX, RHO_MAX).T


def mahalanobis_coverage(
    z_a: np.ndarray, z_b: np.ndarray, rho: np.ndarray | float, levels: Sequence[float] = COVERAGES
) -> list[float]:
    """Share of stars whose squared Mahalanobis distance ``(z_a^2 - 2 rho z_a z_b + z_b^2) / (1 - rho^2)``
    [N] (``rho`` a number or one per star) lies within the chi2(2) quantile ``-2 log(1 - p)`` of each level
    p: for calibrated sigma and rho, the levels themselves."""
    z_a, z_b, rho = (np.asarray(v, np.float64) for v in (z_a, z_b, rho))
    d2 = (z_a**2 - 2 * rho * z_a * z_b + z_b**2) / (1 - rho**2)
    return [float(np.mean(d2 <= -2 * np.log1p(-p))) for p in levels]
